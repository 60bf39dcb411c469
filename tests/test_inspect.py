"""inspect_onnx: ORT's optimized graph for the onnxruntime target, NVIDIA's placement rules for tensorrt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgecv.compress.quantize import PROFILES, apply_calibrator, collect_stats, prepare_qat
from edgecv.errors import EdgecvError
from edgecv.export.lint import format_inspect, inspect_onnx
from edgecv.export.onnx import export_onnx
from edgecv.models import build_model


def _model(name: str, size: int = 64) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=size).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model, torch.randn(16, 3, size, size, generator=gen)


def _quantize_static_u8(float_path: Path, out: Path, x: torch.Tensor) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x[:8].numpy()}, {"input": x[8:].numpy()}])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_onnxruntime_graph_is_all_integer_like_quantize_static(name, tmp_path):
    model, x = _model(name)
    qmodel = prepare_qat(model, "onnxruntime", x[:2])
    apply_calibrator(qmodel, collect_stats(qmodel, [x[:8], x[8:]]), "max")
    ours = inspect_onnx(export_onnx(qmodel, tmp_path / "edgecv.onnx", x[:2]), "onnxruntime")
    float_path = export_onnx(model, tmp_path / "float.onnx", x[:2])
    reference = inspect_onnx(_quantize_static_u8(float_path, tmp_path / "static.onnx", x), "onnxruntime")
    assert ours["float_ops"] == [] and ours["float_op_counts"] == {}
    assert ours["int_op_counts"] == reference["int_op_counts"]
    assert ours["qdq_counts"] == reference["qdq_counts"]  # operators are counted apart from Q/DQ nodes
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(ours["int_op_counts"])
    assert ours["int_op_counts"]["QLinearConv"] == len(
        [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    )
    assert ours["int_op_counts"]["QGemm"] == 1
    float_report = inspect_onnx(float_path, "onnxruntime")
    assert float_report["float_op_counts"] and float_report["int_op_counts"] == {}


def test_skip_layers_keep_float_weights_in_the_exported_graph(tmp_path):
    """The skipped conv has a float weight in the file. (ONNX Runtime >= 1.20 may still quantize a float
    Conv that sits between DequantizeLinear and QuantizeLinear when it builds its session.)"""
    import onnx

    model, x = _model("edgecv:resnet8", 32)
    qmodel = prepare_qat(model, "onnxruntime", x[:2], skip_layers=["layer2.0.conv1"])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    proto = onnx.load(str(export_onnx(qmodel, tmp_path / "q.onnx", x[:2])))
    floats = {
        i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4
    }
    assert len([n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in floats]) == 1


@pytest.mark.parametrize("target", PROFILES.names())
def test_tensorrt_rules_flag_other_placements(target, tmp_path):
    """The onnxruntime placement (uint8, nonzero zero points) breaks TensorRT's rules; tensorrt's obeys them."""
    model, x = _model("edgecv:resnet8", 32)
    qmodel = prepare_qat(model, target, x[:2])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    report = inspect_onnx(export_onnx(qmodel, tmp_path / "q.onnx", x[:2]), "tensorrt")
    if target == "tensorrt":
        assert report["violations"] == []
        assert report["int_op_counts"]["Conv"] == 9 and report["int_op_counts"]["Add"] == 3
    else:
        assert any("UINT8" in v for v in report["violations"])


def test_tensorrt_rules_on_float_and_partly_quantized_graphs(tmp_path):
    model, x = _model("edgecv:resnet8", 32)
    float_report = inspect_onnx(export_onnx(model, tmp_path / "f.onnx", x[:2]), "tensorrt")
    assert float_report["violations"] == ["no Q/DQ: the model is not quantized (export a fake-quant model)"]
    qmodel = prepare_qat(model, "tensorrt", x[:2], skip_layers=["layer1.0.conv2"])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    report = inspect_onnx(export_onnx(qmodel, tmp_path / "q.onnx", x[:2]), "tensorrt")
    # the skipped conv runs in float (no Q/DQ on its input or weight); its residual Add still reads the skip
    # input quantized, but with a float conv to fuse with it runs in float
    assert report["violations"] == []
    assert [f["op_type"] for f in report["float_ops"]] == ["Conv", "Add"]
    assert report["int_op_counts"]["Add"] == 2 and report["int_op_counts"]["Conv"] == 8


def test_format_inspect_renders(tmp_path):
    from rich.console import Console

    model, x = _model("edgecv:resnet8", 32)
    qmodel = prepare_qat(model, "onnxruntime", x[:2])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    report = inspect_onnx(export_onnx(qmodel, tmp_path / "q.onnx", x[:2]), "onnxruntime")
    console = Console(record=True, width=120)
    console.print(format_inspect(report))
    text = console.export_text()
    assert "QLinearConv" in text and "onnxruntime" in text


def test_inspect_user_mistakes(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("hello")
    with pytest.raises(EdgecvError, match="notes.onnx: not an ONNX model"):
        inspect_onnx(bad, "onnxruntime")
    with pytest.raises(EdgecvError, match="missing.onnx"):
        inspect_onnx(tmp_path / "missing.onnx", "tensorrt")
    model, x = _model("edgecv:resnet8", 32)
    path = export_onnx(model, tmp_path / "f.onnx", x[:2])
    with pytest.raises(EdgecvError, match="'openvino'"):
        inspect_onnx(path, "openvino")


def test_a_skipped_first_layer_runs_in_float_in_onnxruntime(tmp_path):
    """The first conv reads the model input: when skipped, no Q/DQ goes in front of it, so ONNX Runtime
    keeps it in float (useful for a 1-channel stem, which its int8 conv kernels run slowly)."""
    model, x = _model("edgecv:resnet8", 32)
    qmodel = prepare_qat(model, "onnxruntime", x[:2], skip_layers=["conv1"])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    report = inspect_onnx(export_onnx(qmodel, tmp_path / "q.onnx", x[:2]), "onnxruntime")
    assert report["float_op_counts"] == {"Conv": 1}
    assert report["int_op_counts"]["QLinearConv"] == len([m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]) - 1


# One builder per family whose activations ONNX Runtime runs in integer only once edgecv writes them with its
# integer kernels: SiLU (efficientnet), hard-swish and hard-sigmoid squeeze-excitation (mobilenet_v3),
# a mean over H and W (mnasnet, shufflenet), a channel shuffle (shufflenet), ReLU + sigmoid SE (regnet_y).
FAMILIES = [
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:mnasnet0_5",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:regnet_y_400mf",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_onnxruntime_int8_has_no_float_island(name, tmp_path):
    """All integer between the input's QuantizeLinear and the logits' DequantizeLinear, and at least every op
    ONNX Runtime's own quantize_static U8 runs in integer."""
    model, x = _model(name)
    qmodel = prepare_qat(model, "onnxruntime", x[:2])
    apply_calibrator(qmodel, collect_stats(qmodel, [x[:8], x[8:]]), "max")
    ours = inspect_onnx(export_onnx(qmodel, tmp_path / "edgecv.onnx", x[:2]), "onnxruntime")
    float_path = export_onnx(model, tmp_path / "float.onnx", x[:2])
    reference = inspect_onnx(_quantize_static_u8(float_path, tmp_path / "static.onnx", x), "onnxruntime")
    assert ours["float_ops"] == [] and ours["float_islands"] == 0
    assert ours["qdq_counts"] == {"DequantizeLinear": 1, "QuantizeLinear": 1}
    for op, n in reference["int_op_counts"].items():
        assert ours["int_op_counts"].get(op, 0) >= n, (op, ours["int_op_counts"], reference["int_op_counts"])


def test_lint_names_ops_without_integer_kernel_and_counts_float_islands(tmp_path):
    """ONNX Runtime's quantize_static leaves hard-sigmoid in float on MobileNetV3 (no integer kernel): the lint
    says so by op, and counts the islands of float ops each entered and left through Q/DQ."""
    model, x = _model("torchvision:mobilenet_v3_small")
    float_path = export_onnx(model, tmp_path / "float.onnx", x[:2])
    report = inspect_onnx(_quantize_static_u8(float_path, tmp_path / "static.onnx", x), "onnxruntime")
    hard_sigmoids = len([m for m in model.modules() if isinstance(m, (torch.nn.Hardswish, torch.nn.Hardsigmoid))])
    assert report["float_op_counts"]["HardSigmoid"] == hard_sigmoids
    assert {f["reason"] for f in report["float_ops"] if f["op_type"] == "HardSigmoid"} == {
        "runs in float: ONNX Runtime has no integer kernel for HardSigmoid"
    }
    # x * hard-sigmoid(x) reads one float input: the Mul joins the hard-sigmoid's island
    assert {f["reason"] for f in report["float_ops"] if f["op_type"] == "Mul"} == {
        "runs in float: an input is not quantized"
    }
    assert report["float_islands"] == hard_sigmoids
    float_report = inspect_onnx(float_path, "onnxruntime")
    assert float_report["float_islands"] == 0 and float_report["int_op_counts"] == {}
