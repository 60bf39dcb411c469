"""An INT8 graph ONNX Runtime can run: QLinearGlobalAveragePool refuses an input/output scale ratio outside
[2^-32, 256), which a pooled tensor whose calibrated range collapsed (scale 1) used to give it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat
from edgecv.export.onnx import check_parity, export_onnx


def _vanishing_pool_net() -> tuple[nn.Module, torch.Tensor]:
    """Conv -> ReLU -> global average pool -> Linear, with activations as small as in a deep randomly
    initialised net (1e-8): the pool's input range is just wide enough to get its own scale, the pooled
    range is not (it falls back to scale 1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net[0].bias.zero_()
        net[0].weight.mul_(2.5e-8 / net[:2](x).max())
        pooled = net[:3](x)
    assert 1e-8 < net[:2](x).max() and pooled.max() < 1e-8  # the case this test is about
    return net.eval(), x


def test_a_pooled_range_that_collapsed_still_runs_in_onnx_runtime(tmp_path):
    net, x = _vanishing_pool_net()
    qmodel = prepare_qat(net, "onnxruntime", x[:1])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    path = export_onnx(qmodel.eval(), tmp_path / "model.int8.onnx", x[:1])
    parity = check_parity(qmodel, path, x, int8=True)  # raised "parameter out of computation range!" before
    assert parity["ok"], parity


@pytest.mark.parametrize("calibrator", ["max", "percentile"])
def test_the_pooled_scale_never_exceeds_its_input_scale(calibrator):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(32, 3, 8, 8)
    qmodel = prepare_qat(net.eval(), "onnxruntime", x[:1])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), calibrator)
    def quantizer_after(layer: str):
        node = next(n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == layer)
        return qmodel.get_submodule(next(iter(node.users)).target)

    pooled, relu = quantizer_after("2"), quantizer_after("1")  # the pool's and the ReLU's output quantizers
    assert pooled.qparams()[0] <= relu.qparams()[0] * (1 + 1e-6)
