"""Export fake-quant models for every placement profile; ORT must agree with torch on real files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import random_batchnorm

from edgecv.compress.quantize import PROFILES, apply_calibrator, collect_stats, prepare_qat
from edgecv.errors import EdgecvError
from edgecv.export.lint import inspect_onnx
from edgecv.export.onnx import check_parity, export_onnx, model_size_bytes
from edgecv.models import build_model

# Every model the INT8 issue names (30 s for all of them at 64x64 on 2 cores: cheap enough for every run).
MODELS = [
    "edgecv:resnet8",
    "edgecv:resnet20",
    "torchvision:resnet18",
    "torchvision:resnet50",
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_large",
    "torchvision:efficientnet_b0",
    "torchvision:regnet_x_400mf",
]


def make_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random-weight model with non-trivial BatchNorm statistics, and 100 fixed inputs."""
    size = 32 if name.startswith("edgecv:") else 64
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=3, image_size=size).eval()
    random_batchnorm(model, gen)
    return model, torch.randn(100, 3, size, size, generator=gen)


def calibrated(model, target, x, method="max"):
    qmodel = prepare_qat(model, target, x[:2])
    apply_calibrator(qmodel, collect_stats(qmodel, [x[:32], x[32:64]]), method)
    return qmodel.eval()


@pytest.mark.parametrize("target", PROFILES.names())
@pytest.mark.parametrize("name", MODELS)
def test_int8_export_agrees_with_torch_and_obeys_tensorrt_rules(name, target, tmp_path):
    model, x = make_model(name)
    qmodel = calibrated(model, target, x)
    path = export_onnx(qmodel, tmp_path / "model.int8.onnx", x[:2])
    result = check_parity(qmodel, path, x, int8=True)
    assert result["ok"], result
    assert result["top1_agreement"] >= 0.99 and result["n"] == 100
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert proto.opset_import[0].version >= 13
    # weights are stored as int8: no float Conv weight initializer is left
    weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    assert not any(i.name in weights for i in proto.graph.initializer)
    if target == "tensorrt":
        report = inspect_onnx(path, "tensorrt")
        assert report["violations"] == []
        assert "Conv" not in report["float_op_counts"] and "Gemm" not in report["float_op_counts"]


def test_int8_file_is_about_four_times_smaller(tmp_path):
    model, x = make_model("torchvision:resnet18")
    float_path = export_onnx(model, tmp_path / "model.onnx", x[:2])
    int8_path = export_onnx(calibrated(model, "onnxruntime", x), tmp_path / "model.int8.onnx", x[:2])
    assert model_size_bytes(int8_path) < 0.3 * model_size_bytes(float_path)


def test_float_export_parity_and_dynamic_batch(tmp_path):
    model, x = make_model("edgecv:resnet8")
    path = export_onnx(model, tmp_path / "model.onnx", x[:2])
    assert check_parity(model, path, x[:7], int8=False)["ok"]  # batch 7 though exported with batch 2
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed


def test_int8_dynamic_batch(tmp_path):
    model, x = make_model("edgecv:resnet8")
    qmodel = calibrated(model, "onnxruntime", x)
    path = export_onnx(qmodel, tmp_path / "q.onnx", x[:4])
    for n in (1, 13):
        assert check_parity(qmodel, path, x[:n], int8=True)["n"] == n


def test_check_parity_catches_a_broken_model(tmp_path):
    model, x = make_model("edgecv:resnet8")
    path = export_onnx(model, tmp_path / "model.onnx", x[:2])
    with torch.no_grad():
        model.fc.weight.add_(torch.randn_like(model.fc.weight))
    result = check_parity(model, path, x, int8=False)
    assert not result["ok"] and result["max_abs_diff"] > 1e-4 * result["logit_range"]
    qmodel = calibrated(model, "onnxruntime", x)
    qpath = export_onnx(qmodel, tmp_path / "q.onnx", x[:2])
    with torch.no_grad():
        qmodel.fc.weight.copy_(torch.randn_like(qmodel.fc.weight))
    assert not check_parity(qmodel, qpath, x, int8=True)["ok"]


def test_export_failure_leaves_no_file(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        export_onnx(Broken(), tmp_path / "m.onnx", torch.zeros(1, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_int32_bias_for_onnxruntime_only(tmp_path):
    model, x = make_model("edgecv:resnet8")
    for target in PROFILES.names():
        path = export_onnx(calibrated(model, target, x), tmp_path / f"{target}.onnx", x[:2])
        inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
        int32 = [i for i in inits.values() if i.data_type == onnx.TensorProto.INT32]
        assert bool(int32) == PROFILES.get(target).int32_bias
        int8 = [onnx.numpy_helper.to_array(i) for i in inits.values() if i.data_type == onnx.TensorProto.INT8]
        assert int8 and all(np.abs(w.astype(int)).max() <= 127 for w in int8 if w.ndim > 1)


def test_parity_on_a_file_that_is_not_onnx(tmp_path):
    model, x = make_model("edgecv:resnet8")
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model")
    with pytest.raises(EdgecvError, match="model.onnx"):
        check_parity(model, bad, x[:2], int8=False)
