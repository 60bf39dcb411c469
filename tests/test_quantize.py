"""prepare_qat, calibration, QAT switches, rebuild from quant_spec + state_dict, sensitivity."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgecv.compress.quantize import (
    CALIBRATORS,
    PROFILES,
    FakeQuantize,
    QuantSpec,
    TensorStats,
    apply_calibrator,
    collect_stats,
    freeze_bn_stats,
    layer_sensitivity,
    prepare_qat,
    quant_spec,
    quantizable_layers,
    resolve_skip_layers,
    set_learnable_ranges,
)
from edgecv.errors import EdgecvError
from edgecv.models import build_model


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model("edgecv:resnet8", num_classes=10, in_channels=3).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model, torch.randn(64, 3, 32, 32, generator=gen)


def _heavy_tailed_stats() -> TensorStats:
    gen = torch.Generator().manual_seed(0)
    stats = TensorStats()
    for _ in range(4):
        x = torch.distributions.StudentT(2.0).sample((20000,))  # many outliers
        stats.update(x * torch.rand(1, generator=gen))
    return stats


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", CALIBRATORS.names())
def test_each_calibrator_gives_a_finite_range_inside_max(method, symmetric):
    stats = _heavy_tailed_stats()
    options = {"percentile": 99.9} if "percentile" in CALIBRATORS.get(method).options else {}
    lo, hi = CALIBRATORS.get(method)(stats, symmetric, **options)
    assert math.isfinite(lo) and math.isfinite(hi) and lo < 0 < hi
    assert -stats.absmax - 1e-6 <= lo and hi <= stats.absmax + 1e-6


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_calibrators_clip_heavy_tails(method):
    stats = _heavy_tailed_stats()
    options = {"percentile": 99.9} if method == "percentile" else {}
    _, hi = CALIBRATORS.get(method)(stats, True, **options)
    assert hi < 0.5 * stats.absmax  # the max is an outlier; these must not follow it
    # mse weighs the squared error of outliers too, so on Student-t(2) it only has to stay within max
    assert CALIBRATORS.get("mse")(stats, True)[1] <= stats.absmax


def test_a_calibrator_refuses_an_option_it_does_not_take():
    model, x = _model()
    qmodel = prepare_qat(model, "onnxruntime", x[:2])
    stats = collect_stats(qmodel, [x])
    with pytest.raises(EdgecvError, match="calibrator 'max' takes no option 'percentile'"):
        apply_calibrator(qmodel, stats, "max", percentile=99.9)
    with pytest.raises(EdgecvError, match="percentile must be between 50 and 100"):
        apply_calibrator(qmodel, stats, "percentile", percentile=100.0)


def test_histogram_keeps_every_value_when_ranges_grow():
    stats = TensorStats()
    stats.update(torch.linspace(-1, 1, 1000))
    stats.update(torch.linspace(-500, 3000, 1000))  # forces growing and merging bins
    assert stats.counts.sum() == 2000 and len(stats.counts) <= 8192
    assert stats.min == -500 and stats.max == 3000


@pytest.mark.parametrize("target", PROFILES.names())
def test_every_calibrator_from_one_set_of_stats_stays_close_to_float(target):
    model, x = _model()
    qmodel = prepare_qat(model, target, x[:2]).eval()
    stats = collect_stats(qmodel, [x[:32], x[32:]])  # gathered once, shared by all calibrators
    with torch.no_grad():
        ref = model(x)
    for method in CALIBRATORS.names():
        apply_calibrator(qmodel, stats, method)
        with torch.no_grad():
            out = qmodel(x)
        sqnr = 10 * torch.log10((ref**2).sum() / ((ref - out) ** 2).sum())
        assert sqnr > 8, f"{method}: {sqnr:.1f} dB"  # entropy clips hardest (about 10 dB on this random net)
        assert all(bool(m.enabled) for m in qmodel.modules() if isinstance(m, FakeQuantize))


def test_percentile_range_below_max_on_a_real_model():
    model, x = _model()
    x = x.clone()
    x[0, 0, 0, 0] = 60.0  # one outlier pixel
    qmodel = prepare_qat(model, "onnxruntime", x[:2])
    stats = collect_stats(qmodel, [x])
    apply_calibrator(qmodel, stats, "max")
    hi_max = float(qmodel.x_aq.hi)
    apply_calibrator(qmodel, stats, "percentile", percentile=99.9)
    assert float(qmodel.x_aq.hi) < 0.2 * hi_max
    with pytest.raises(EdgecvError, match="'kl'"):
        apply_calibrator(qmodel, stats, "kl")


def test_prepare_folds_batchnorm_and_does_not_touch_the_float_model():
    model, x = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = prepare_qat(model, "onnxruntime", x[:2])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in qmodel.modules())
    with torch.no_grad():  # quantizers are off until calibrated: the folded model equals the float one
        torch.testing.assert_close(qmodel.eval()(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(quantizable_layers(qmodel)) == sorted(quantizable_layers(model))


def test_skip_layers_stay_float_and_are_validated():
    model, x = _model()
    qmodel = prepare_qat(model, "tensorrt", x[:2], skip_layers=["layer1.0.conv1", "fc"])
    assert "fc" not in quantizable_layers(qmodel) and "layer1.0.conv1" not in quantizable_layers(qmodel)
    assert quant_spec(qmodel) == QuantSpec("tensorrt", ("layer1.0.conv1", "fc"), freeze_bn=True)
    with pytest.raises(EdgecvError, match="'layer9.conv'"):
        prepare_qat(model, "tensorrt", x[:2], skip_layers=["layer9.conv"])
    with pytest.raises(EdgecvError, match="unknown quantization target 'tflite'"):
        prepare_qat(model, "tflite", x[:2])


REBUILD = """
import sys, torch
from edgecv.compress.quantize import prepare_qat
from edgecv.models import build_model
from edgecv.compress.quantize import QuantSpec, build_quantized
spec = QuantSpec.from_dict({spec})
state = torch.load(sys.argv[1], weights_only=True)
model = build_model("edgecv:resnet8", num_classes=10, in_channels=3)
qmodel = build_quantized(model, spec, torch.zeros(1, 3, 32, 32))
qmodel.load_state_dict(state)
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(qmodel.eval()(x), sys.argv[3])
"""


@pytest.mark.parametrize(("target", "freeze_bn"), [("onnxruntime", True), ("tensorrt", False)])
def test_rebuild_from_spec_and_state_dict_in_a_fresh_process(target, freeze_bn, tmp_path):
    model, x = _model()
    qmodel = prepare_qat(model, target, x[:2], skip_layers=["layer2.0.conv2"], freeze_bn=freeze_bn)
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "entropy")
    set_learnable_ranges(qmodel, True)  # one QAT step so ranges and weights differ from calibration
    qmodel.train()
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    qmodel(x).logsumexp(1).mean().backward()
    opt.step()
    qmodel.eval()
    with torch.no_grad():
        expected = qmodel(x)
    spec = quant_spec(qmodel).to_dict()
    json.dumps(spec)
    torch.save(qmodel.state_dict(), tmp_path / "state.pt")
    torch.save(x, tmp_path / "x.pt")
    code = REBUILD.format(spec=repr(spec))
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp_path / "state.pt"),
            str(tmp_path / "x.pt"),
            str(tmp_path / "y.pt"),
        ],
        check=True,
    )
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), expected)


def test_learnable_ranges_get_gradients_and_freeze():
    model, x = _model()
    qmodel = prepare_qat(model, "onnxruntime", x[:2])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    set_learnable_ranges(qmodel, True)
    qmodel.train()
    qmodel(x).square().mean().backward()
    assert qmodel.x_aq.hi.grad is not None and qmodel.x_aq.hi.grad.abs() > 0
    assert qmodel.get_submodule("conv1").weight_quant.amax.grad.abs().sum() > 0
    assert qmodel.get_submodule("conv1").weight.grad.abs().sum() > 0  # straight-through to the weights
    set_learnable_ranges(qmodel, False)
    assert not any(
        p.requires_grad for m in qmodel.modules() if isinstance(m, FakeQuantize) for p in m.range_parameters()
    )


def test_unfrozen_batchnorm_updates_until_frozen_and_exports_folded(tmp_path):
    from edgecv.export.onnx import check_parity, export_onnx

    model, x = _model()
    qmodel = prepare_qat(model, "onnxruntime", x[:2], freeze_bn=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in qmodel.modules())
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    bn = qmodel.get_submodule("conv1").bn
    qmodel.train()
    before = bn.running_mean.clone()
    qmodel(x)
    assert not torch.equal(before, bn.running_mean)  # batch statistics still update
    freeze_bn_stats(qmodel)
    qmodel.train()
    frozen = bn.running_mean.clone()
    qmodel(x)
    assert torch.equal(frozen, bn.running_mean)
    path = export_onnx(qmodel, tmp_path / "q.onnx", x[:2])
    assert check_parity(qmodel, path, x, int8=True)["ok"]
    import onnx

    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("metric", ["sqnr", "accuracy"])
def test_layer_sensitivity_rows_and_auto_skip(metric):
    model, x = _model()
    labels = model(x).argmax(1)
    rows = layer_sensitivity(
        model, "onnxruntime", x[:2], [x[:32]], [(x[:32], labels[:32]), (x[32:], labels[32:])], metric
    )
    assert [r["layer"] for r in rows] != [] and sorted(r["layer"] for r in rows) == sorted(
        quantizable_layers(model)
    )
    assert all(r["sqnr_db"] > 10 and r["top1_drop"] is not None for r in rows)
    key = [r["sqnr_db"] for r in rows] if metric == "sqnr" else [-r["top1_drop"] for r in rows]
    assert key == sorted(key)
    assert resolve_skip_layers("auto:2", rows) == [rows[0]["layer"], rows[1]["layer"]]
    assert resolve_skip_layers(["fc"], rows) == ["fc"]
    assert resolve_skip_layers("fc, conv1", None) == ["fc", "conv1"]
    with pytest.raises(EdgecvError, match="auto:x"):
        resolve_skip_layers("auto:x", rows)
    with pytest.raises(EdgecvError, match="'nope'"):
        resolve_skip_layers(["nope"], rows)


def test_collect_stats_leaves_quantizers_as_they_were():
    model, x = _model()
    qmodel = prepare_qat(model, "tensorrt", x[:2])
    stats = collect_stats(qmodel, [x[:16], x[16:]])
    assert stats.num_batches == 2 and not any(
        bool(m.enabled) for m in qmodel.modules() if isinstance(m, FakeQuantize)
    )
    assert all(np.isfinite(s.absmax) for s in stats.tensors.values())
    with pytest.raises(EdgecvError, match="no batches"):
        collect_stats(qmodel, [])
