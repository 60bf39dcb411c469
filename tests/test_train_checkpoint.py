"""The training loop, schedules, distillation, and checkpoints that rebuild in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import TINY

from edgecv.checkpoint import load_model, save_model
from edgecv.compress.distill import DistillConfig, distillation_loss
from edgecv.compress.prune import IMPORTANCES, PruneConfig, prune_model
from edgecv.data.config import DataConfig
from edgecv.data.datasets import build_data
from edgecv.errors import EdgecvError
from edgecv.models import build_model
from edgecv.models.complexity import count_macs_params
from edgecv.models.spec import ModelSpec
from edgecv.train.config import TrainConfig
from edgecv.train.loop import evaluate_model, fit
from edgecv.train.optim import lr_factor

SPEC = ModelSpec("edgecv:resnet8", num_classes=4, in_channels=3, image_size=16, width=8)


def tiny_data():
    return build_data(DataConfig.model_validate(TINY["data"]))


def tiny_model():
    torch.manual_seed(0)
    return build_model("edgecv:resnet8", 4, 3, 16, width=8)


def test_training_learns_and_resumes(tmp_path):
    data = tiny_data()
    model = tiny_model()
    before = evaluate_model(model, data.val)["top1"]
    cfg = TrainConfig(epochs=2, lr=0.1, schedule="onecycle")
    state = tmp_path / "state.pt"
    result = fit(model, data.train, data.val, cfg, state_path=state, log_path=tmp_path / "log.jsonl")
    assert result["top1"] > max(before, 60.0)
    assert state.is_file() and len(result["history"]) == 2
    # a second call with the same state has nothing left to do and keeps the weights
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    again = fit(model, data.train, data.val, cfg, state_path=state)
    assert again["top1"] == result["top1"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_then_schedule(schedule):
    factors = [lr_factor(s, 100, 10, schedule) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert (factors[-1] < 0.01) if schedule == "cosine" else (factors[-1] == 1.0)


def test_distillation_loss_prefers_the_teacher():
    labels = torch.tensor([0, 1])
    teacher = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    cfg = DistillConfig(alpha=1.0, temperature=2.0)
    assert distillation_loss(teacher.clone(), teacher, labels, cfg) == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(-teacher, teacher, labels, cfg) > 1.0


@pytest.mark.parametrize("importance", IMPORTANCES.names())
def test_every_importance_prunes(importance):
    model = tiny_model().eval()
    data = tiny_data()
    batches = [next(iter(data.train))]
    pruned, info = prune_model(model, PruneConfig(ratio=0.5, importance=importance), torch.zeros(1, 3, 16, 16), batches)
    assert info["macs_after"] < 0.5 * info["macs_before"]
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert pruned.fc.out_features == 4  # the classifier keeps its classes


def test_target_macs_and_round_to():
    model = tiny_model().eval()
    example = torch.zeros(1, 3, 16, 16)
    base, _ = count_macs_params(model, example)
    pruned, info = prune_model(model, PruneConfig(target_macs=0.5, round_to=2), example)
    assert info["macs_after"] <= 0.5 * base and info["macs_after"] > 0.3 * base
    assert all(m.out_channels % 2 == 0 for m in pruned.modules() if isinstance(m, torch.nn.Conv2d))


def test_prune_ignore_unknown_layer():
    with pytest.raises(EdgecvError, match="no module 'layer9'"):
        prune_model(tiny_model(), PruneConfig(ratio=0.3, ignore=["layer9"]), torch.zeros(1, 3, 16, 16))


def test_pruned_checkpoint_reloads_in_a_fresh_process(tmp_path):
    model = tiny_model().eval()
    pruned, _ = prune_model(model, PruneConfig(ratio=0.4), torch.zeros(1, 3, 16, 16))
    path = tmp_path / "model.pt"
    save_model(path, pruned, SPEC)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    torch.save(pruned(x).detach(), tmp_path / "y.pt")
    code = (
        "import torch, sys; from edgecv.checkpoint import load_model\n"
        f"m, h = load_model(r'{path}')\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}', weights_only=True); y = torch.load(r'{tmp_path / 'y.pt'}', weights_only=True)\n"
        "assert torch.equal(m(x), y), (m(x) - y).abs().max()\n"
        "print('identical', h.shapes['layer1.0.conv1']['out_channels'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("identical") and int(proc.stdout.split()[1]) < 8


def test_checkpoint_keeps_the_state_dict_metadata(tmp_path):
    """MNASNet checks the module version stored in state_dict._metadata when it loads; a checkpoint that
    drops the metadata cannot be reloaded ("version should be set to 1 or 2 instead of None")."""
    spec = ModelSpec("torchvision:mnasnet0_5", num_classes=4, in_channels=3, image_size=32)
    model = build_model(spec.name, **spec.build_kwargs()).eval()
    save_model(tmp_path / "m.pt", model, spec)
    again, header = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), model(x)) and header.spec == spec


def test_checkpoints_hold_no_pickled_code(tmp_path):
    path = tmp_path / "model.pt"
    save_model(path, tiny_model(), SPEC)
    ckpt = torch.load(path, weights_only=True)  # would raise on any pickled class
    assert ckpt["format"] == "edgecv.checkpoint/1" and set(ckpt["state_dict"]) == set(tiny_model().state_dict())
    model, _ = load_model(path)
    assert not model.training


def test_torchrun_ddp_trains_on_two_cpu_processes(tmp_path):
    import yaml
    from torchrun import torchrun

    recipe = {**TINY, "name": "ddp", "train": {**TINY["train"], "epochs": 1}, "stages": []}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = torchrun(2, "-m", "edgecv", "train", str(path), "--out", str(tmp_path / "runs"), "--device", "cpu",
                    timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "ddp" / "00-train" / "model.pt").is_file()
    assert proc.stdout.count("train epoch 1/1") == 1  # only rank 0 reports and writes
    assert proc.stdout.count(" 00-train ─") == 1  # the stage heading once: the other rank's console is quiet


def test_bn_momentum_lets_running_statistics_keep_up_with_a_short_schedule():
    """torchvision builds MobileNetV3 / EfficientNet with BatchNorm momentum 0.01: over a few hundred steps the
    running statistics lag the weights (a Fashion-MNIST MobileNetV3 evaluated at 10 %, one class). train.bn_momentum
    sets every BatchNorm's momentum before training."""
    data = tiny_data()
    moved = {}
    for momentum in (None, 0.5):
        model = tiny_model()
        for m in model.modules():  # as torchvision's MobileNetV3 builds them
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.01
        fit(model, data.train, data.val, TrainConfig(epochs=1, lr=0.05, schedule="constant", bn_momentum=momentum))
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(m.momentum == (momentum or 0.01) for m in bns)
        moved[momentum] = float(bns[0].running_mean.abs().mean())  # started at 0
    assert moved[0.5] > 5 * moved[None], moved
    with pytest.raises(ValueError):
        TrainConfig(bn_momentum=0.0)
