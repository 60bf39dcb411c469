"""INT8 parity that means something: a broken INT8 file is refused, near-tied logits of a random or freshly
pruned model are not."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgecv.compress.prune import PruneConfig, prune_model
from edgecv.compress.quantize import PROFILES, apply_calibrator, collect_stats, prepare_qat
from edgecv.export.onnx import check_parity, export_onnx
from edgecv.export.parity import INT8_MIN_AGREEMENT, INT8_MIN_SQNR_DB, int8_parity_ok, logit_agreement
from edgecv.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _int8(model: torch.nn.Module, target: str, x: torch.Tensor, path) -> tuple[torch.nn.Module, object]:
    qmodel = prepare_qat(model, target, x[:1])
    apply_calibrator(qmodel, collect_stats(qmodel, [x[:32]]), "max")
    return qmodel.eval(), export_onnx(qmodel, path, x[:1])


def _inputs(size: int, n: int = 128) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("target", PROFILES.names())
@pytest.mark.parametrize("name, pruned", [("mnasnet0_5", False), ("resnet18", True)])
def test_near_tied_logits_of_random_and_pruned_models_pass(name, pruned, target, tmp_path):
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", 10, 3, 64).eval()  # random weights: nearly tied logits
    x = _inputs(64)
    if pruned:
        model, _ = prune_model(model, PruneConfig(target_macs=0.5, round_to=8), x[:1])
    qmodel, path = _int8(model, target, x, tmp_path / "model.int8.onnx")
    parity = check_parity(qmodel, path, x, int8=True)
    assert parity["ok"], parity
    assert parity["worst_class_sqnr_db"] >= INT8_MIN_SQNR_DB and 0.0 <= parity["top1_agreement"] <= 1.0


def _broken_copy(path, tmp_path, how: str):
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = proto.graph.node
    if how == "scale x10":  # the weight scale of a conv in the middle of the network
        convs = [n for n in nodes if n.op_type == "Conv"]
        producer = {o: n for n in nodes for o in n.output}
        scale = inits[producer[convs[len(convs) // 2].input[1]].input[1]]
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 10, scale.name))
    else:  # two class outputs swapped: rows 0 and 1 of the classifier's int8 weight
        gemm = next(n for n in nodes if n.op_type == "Gemm")
        producer = {o: n for n in nodes for o in n.output}
        weight = inits[producer[gemm.input[1]].input[0]]
        w = numpy_helper.to_array(weight).copy()
        w[[0, 1]] = w[[1, 0]]
        weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    broken = tmp_path / f"broken-{how.replace(' ', '')}.onnx"
    onnx.save(proto, str(broken))
    return broken


@pytest.mark.parametrize("target", PROFILES.names())
@pytest.mark.parametrize("how", ["scale x10", "classes swapped"])
def test_a_broken_int8_file_is_refused(how, target, tmp_path):
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", 10, 3, 64).eval()
    x = _inputs(64)
    qmodel, path = _int8(model, target, x, tmp_path / "model.int8.onnx")
    assert check_parity(qmodel, path, x, int8=True)["ok"]
    parity = check_parity(qmodel, _broken_copy(path, tmp_path, how), x, int8=True)
    assert not parity["ok"], parity
    assert parity["worst_class_sqnr_db"] < INT8_MIN_SQNR_DB


def test_logit_agreement_ignores_near_ties_but_not_flips():
    gen = np.random.default_rng(0)
    logits = gen.normal(size=(400, 10))
    logits[:200, :2] = 5.0 + gen.normal(scale=1e-4, size=(200, 2))  # half the samples: two tied leaders
    noisy = logits + gen.normal(scale=1e-3, size=logits.shape)
    result = logit_agreement(logits, noisy)
    assert result["top1_agreement"] < 0.9  # the ties flip at random
    assert result["decided_agreement"] == 1.0 and result["decided"] >= 190 and result["sqnr_db"] > 40
    swapped = noisy.copy()
    swapped[:, [2, 3]] = swapped[:, [3, 2]]  # two class outputs swapped on every sample
    assert logit_agreement(logits, swapped)["worst_class_sqnr_db"] < INT8_MIN_SQNR_DB
    assert not int8_parity_ok(logit_agreement(logits, swapped))
    flipped = noisy.copy()
    rows = np.arange(200, 210)  # ten clear decisions turned over: too few to move the noise level
    top, bottom = logits[rows].argmax(1), logits[rows].argmin(1)
    flipped[rows, top], flipped[rows, bottom] = noisy[rows, bottom], noisy[rows, top]
    worse = logit_agreement(logits, flipped)
    assert worse["decided_agreement"] < INT8_MIN_AGREEMENT and not int8_parity_ok(worse)
