"""INT8-friendly surgery: activations swapped, squeeze-excitation removed, on every family that has them; the
change recorded in checkpoints and rebuilt in a fresh process (float and fake-quant)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from edgecv.checkpoint import load_model, save_model
from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat
from edgecv.compress.surgery import (
    ACTIVATIONS,
    REPLACED_ACTIVATIONS,
    SE_ACTIONS,
    SurgerySpec,
    apply_surgery,
    is_squeeze_excitation,
    surgery_of,
)
from edgecv.errors import EdgecvError
from edgecv.models import build_model
from edgecv.models.spec import ModelSpec
from edgecv.recipe import validate

# the smallest builder of each torchvision family with hard-swish, SiLU or squeeze-excitation
FAMILIES = [
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:efficientnet_v2_s",
    "torchvision:regnet_y_400mf",
]


def _spec(name: str, size: int = 32) -> ModelSpec:
    return ModelSpec(name=name, num_classes=10, in_channels=3, image_size=size)


def _count(model: nn.Module) -> tuple[int, int, int]:
    """(activations the surgery replaces, of them gating an SE block, SE blocks)."""
    gates = {id(getattr(m, "scale_activation", None)) for m in model.modules() if is_squeeze_excitation(m)}
    acts = [m for m in model.modules() if isinstance(m, REPLACED_ACTIVATIONS)]
    return len(acts), sum(id(m) in gates for m in acts), sum(is_squeeze_excitation(m) for m in model.modules())


@pytest.mark.parametrize("squeeze_excitation", SE_ACTIONS.names())
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS.names() if a != "keep"])
@pytest.mark.parametrize("name", FAMILIES)
def test_surgery_changes_every_family_that_has_the_layers(name, activation, squeeze_excitation):
    spec = _spec(name)
    model = build_model(name, **spec.build_kwargs()).eval()
    acts, gates, blocks = _count(model)
    target = ACTIVATIONS.get(activation)().__class__
    before = sum(type(m) is target for m in model.modules())
    if acts == gates and squeeze_excitation == "keep":  # regnet_y: ReLU already, nothing to change
        with pytest.raises(EdgecvError, match="has no hard-swish, SiLU or hard-sigmoid module to change"):
            apply_surgery(model, SurgerySpec(activation, squeeze_excitation))
        return
    counts = apply_surgery(model, SurgerySpec(activation, squeeze_excitation))
    left_acts, left_gates, left_blocks = _count(model)
    if squeeze_excitation == "remove":
        assert left_blocks == 0 and left_acts == 0 and counts["squeeze_excitation"] == blocks > 0
    else:
        assert left_blocks == blocks and left_acts == left_gates == gates  # SE gates stay gates
        assert sum(type(m) is target for m in model.modules()) == before + counts["activations"]
    assert surgery_of(model) == (SurgerySpec(activation, squeeze_excitation),)
    with torch.no_grad():
        assert model(spec.example_input(2)).shape == (2, 10)
    model.train()(torch.randn(2, *spec.input_shape)).square().sum().backward()  # trains (no in-place clash)


def test_surgery_on_a_model_without_the_layers_says_so():
    model = build_model("torchvision:mnasnet0_5", num_classes=10, image_size=32)
    with pytest.raises(EdgecvError, match="MNASNet has no hard-swish, SiLU or hard-sigmoid module and no "
                                          "squeeze-excitation block to change"):
        apply_surgery(model, SurgerySpec("relu", "remove"))


def test_surgery_of_a_custom_model_with_its_own_se_block():
    class SEBlock(nn.Module):  # named like one, with a sigmoid gate
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Conv2d(8, 8, 1)
            self.gate = nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), SEBlock(), nn.Hardswish())
    assert apply_surgery(model, SurgerySpec("relu6", "keep")) == {"activations": 2, "squeeze_excitation": 0}
    assert isinstance(model[2].gate, nn.Hardsigmoid)  # the gate of the kept SE block is untouched
    assert apply_surgery(model, SurgerySpec("keep", "remove")) == {"activations": 0, "squeeze_excitation": 1}
    assert isinstance(model[2], nn.Identity) and len(surgery_of(model)) == 2


RELOAD = """
import sys, torch
from edgecv.checkpoint import load_model
model, header = load_model(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
print([s.to_dict() for s in header.surgery])
with torch.no_grad():
    torch.save(model(x), sys.argv[3])
"""


@pytest.mark.parametrize("quantized", [False, True])
def test_checkpoint_rebuilds_the_changed_structure_in_a_fresh_process(quantized, tmp_path):
    name = "torchvision:mobilenet_v3_small"
    spec = _spec(name)
    torch.manual_seed(0)
    model = build_model(name, **spec.build_kwargs()).eval()
    apply_surgery(model, SurgerySpec("relu", "remove"))
    x = torch.randn(8, *spec.input_shape)
    if quantized:
        model = prepare_qat(model, "onnxruntime", spec.example_input())
        apply_calibrator(model, collect_stats(model, [x]), "max")
        model.eval()
        assert surgery_of(model) == (SurgerySpec("relu", "remove"),)
    save_model(tmp_path / "model.pt", model, spec)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "model.pt"), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, check=True)  # fmt: skip
    assert "'activation': 'relu', 'squeeze_excitation': 'remove'" in proc.stdout
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), model(x))
    reloaded, header = load_model(tmp_path / "model.pt")
    assert header.surgery == (SurgerySpec("relu", "remove"),)
    assert not any(isinstance(m, REPLACED_ACTIVATIONS) or is_squeeze_excitation(m) for m in reloaded.modules())


def _recipe(stages: list) -> dict:
    return {"name": "s", "model": {"name": "torchvision:mobilenet_v3_small"}, "stages": stages}


def test_surgery_options_are_validated_from_the_registries():
    recipe = validate(_recipe([{"surgery": {"activation": "relu6", "squeeze_excitation": "remove"}}]))
    assert recipe.stages[0].spec() == SurgerySpec("relu6", "remove")
    with pytest.raises(EdgecvError, match=r"activation.*'gelu'.*choose from: keep, relu, relu6"):
        validate(_recipe([{"surgery": {"activation": "gelu"}}]))
    with pytest.raises(EdgecvError, match="squeeze_excitation.*'drop'"):
        validate(_recipe([{"surgery": {"squeeze_excitation": "drop"}}]))
    with pytest.raises(EdgecvError, match="surgery changes nothing"):
        validate(_recipe([{"surgery": {"activation": "keep"}}]))
    with pytest.raises(EdgecvError, match="'ptq' must come after prune, surgery and finetune"):
        validate(_recipe([{"ptq": {}}, {"surgery": {}}]))


SURGERY_RUN = {
    "name": "surgery-run",
    "seed": 0,
    "data": {"dataset": "synthetic", "image_size": 16, "channels": 3, "num_classes": 4,
             "train_size": 256, "val_size": 128, "batch_size": 64, "eval_batch_size": 128},
    "model": {"name": "torchvision:mobilenet_v3_small"},
    "train": {"epochs": 1, "lr": 0.05, "schedule": "onecycle", "optimizer": "sgd"},
    "stages": [
        {"surgery": {"activation": "relu", "squeeze_excitation": "remove"}},
        {"finetune": {"epochs": 1, "lr": 0.01, "distill": {"teacher": "baseline"}}},
        {"ptq": {"compare": ["max"], "calib_batches": 2}},
        {"export": {"parity_samples": 64}},
    ],
    "bench": {"batch_sizes": [1], "warmup": 2, "runs": 5, "rounds": 1},
}  # fmt: skip


def test_surgery_recipe_end_to_end(tmp_path):
    """surgery -> distillation from the original -> INT8 -> export in `edgecv compress`; the changed model
    reloads in another process, and the report sets the original (float and INT8) beside the changed one."""
    import json

    from conftest import run_cli, write_recipe

    recipe = write_recipe(tmp_path / "surgery.yaml", SURGERY_RUN)
    proc = run_cli("compress", str(recipe), "--out", str(tmp_path / "runs"), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "surgery-run"
    assert "surgery (hard-swish/SiLU/hard-sigmoid -> relu, squeeze-excitation: remove): 19 activations replaced" \
        ", 9 squeeze-excitation blocks removed" in proc.stdout
    entry = next(e for e in json.loads((run / "manifest.json").read_text())["stages"] if e["name"] == "surgery")
    metrics = json.loads((run / entry["dir"] / "metrics.json").read_text())
    assert entry["status"] == "done" and metrics == entry["metrics"] and 0 <= metrics["top1"] <= 100
    assert metrics["changed"] == {"activations": 19, "squeeze_excitation": 9}
    assert metrics["macs_after"] < metrics["macs_before"] and metrics["params_after"] < metrics["params_before"]
    for stage_dir in (entry["dir"], "02-finetune", "03-ptq"):  # every later checkpoint rebuilds the change
        _, header = load_model(run / stage_dir / "model.pt")
        assert header.surgery == (SurgerySpec("relu", "remove"),)
    proc = run_cli("eval", str(run / "02-finetune" / "model.pt"), "--json", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    rows = {(r["stage"], r["format"]): r for r in report["rows"]}
    assert {("train", "onnx"), ("train", "onnx-int8"), ("finetune", "torch"), ("ptq", "onnx-int8")} <= set(rows)
    assert rows[("train", "onnx-int8")]["note"] == "the original model before surgery"
    assert rows[("surgery", "torch")]["deployable"] is False
    assert any("rows of 'train' are the original model" in n for n in report["notes"])
    summary = {(s["model"], s["baseline"]) for s in report["summary"]}
    assert ("train/onnx-int8", "train/onnx") in summary and ("ptq/onnx-int8", "train/onnx") in summary
