"""QAT trains the model that ships: after a few QAT steps on a squeeze-excitation net, the logits the learnable
training path computes are the logits of the exported INT8 file, run in a real ONNX Runtime session, for
both targets (the TensorRT target's Q/DQ file is run in ONNX Runtime, as the zoo does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_batchnorm
from torch import fx, nn

from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat, set_learnable_ranges
from edgecv.compress.quantize.fakequant import FakeQuantize, fake_quantizers
from edgecv.export.onnx import export_onnx, ort_session
from edgecv.export.parity import SIMULATION_MIN_SQNR_DB, int8_parity_ok, logit_agreement, sqnr_db

SIZE = 32


def _qat_steps(qmodel: nn.Module, gen: torch.Generator, steps: int = 3) -> None:
    """A few optimizer steps that learn weights and quantization ranges (LSQ), as the QAT stage does."""
    set_learnable_ranges(qmodel, True)
    qmodel.train()
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(8, 3, SIZE, SIZE, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(qmodel(x), y).backward()
        optimizer.step()


def _pooled_quantizers(qmodel: fx.GraphModule) -> list[tuple[FakeQuantize, FakeQuantize]]:
    """(input quantizer, output quantizer) of each average pool whose input and output are quantized."""
    def quantizer(node: object) -> FakeQuantize | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            m = qmodel.get_submodule(node.target)
            return m if isinstance(m, FakeQuantize) else None
        return None

    pairs = []
    for node in qmodel.graph.nodes:
        is_pool = node.target is F.adaptive_avg_pool2d or (
            node.op == "call_module" and isinstance(qmodel.get_submodule(node.target), nn.AdaptiveAvgPool2d)
        )
        outs = [quantizer(u) for u in node.users] if is_pool else []
        if is_pool and quantizer(node.args[0]) is not None and outs and outs[0] is not None:
            pairs.append((quantizer(node.args[0]), outs[0]))
    return pairs


def _training_path_logits(qmodel: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The logits QAT optimizes: every quantizer on its learnable training path; dropout and stochastic depth
    off, so the comparison is deterministic."""
    qmodel.eval()
    for _, q in fake_quantizers(qmodel):
        q.train()
    with torch.no_grad():
        logits = qmodel(x).double().numpy()
    qmodel.eval()
    return logits


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_qat_logits_are_the_exported_int8_logits(name, target, tmp_path):
    import torchvision

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = random_batchnorm(torchvision.models.get_model(name, weights=None, num_classes=10), gen)
    x = torch.randn(16, 3, SIZE, SIZE, generator=gen)
    qmodel = prepare_qat(model, target, x[:1])
    apply_calibrator(qmodel, collect_stats(qmodel, [torch.randn(8, 3, SIZE, SIZE, generator=gen)]), "max")
    _qat_steps(qmodel, gen)
    # Learned ranges drift: a pooled range wider than its input's (an average never leaves its input's range,
    # so export caps the pooled scale at the input's). Training must apply the same cap.
    pairs = _pooled_quantizers(qmodel) if target == "onnxruntime" else []
    assert pairs or target == "tensorrt"  # the TensorRT target quantizes a pool's input, not its output
    with torch.no_grad():
        for source, pooled in pairs:
            pooled.lo.copy_(torch.minimum(source.lo, pooled.lo) * 4)
            pooled.hi.copy_(torch.maximum(source.hi, pooled.hi) * 4)
    trained = _training_path_logits(qmodel, x)
    with torch.no_grad():
        exported = qmodel.eval()(x).double().numpy()  # the export path: what for_export freezes
    path = export_onnx(qmodel, tmp_path / f"{name}.{target}.int8.onnx", x[:1])
    got = ort_session(path).run(["logits"], {"input": x.numpy()})[0].astype(np.float64)
    parity = logit_agreement(trained, got)
    same = sqnr_db(exported, trained)
    print(f"{name} {target}: QAT logits vs INT8 file SQNR {parity['sqnr_db']} dB (worst class "
          f"{parity['worst_class_sqnr_db']} dB); QAT path vs export path {same} dB")
    assert int8_parity_ok(parity), parity  # the export gate (issue 7's rule)
    # and the training path computes the export path's integer model (equal but for float rounding)
    assert same >= SIMULATION_MIN_SQNR_DB, (same, parity)
