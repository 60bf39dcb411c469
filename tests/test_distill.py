"""Distillation: feature KD with learned adapters, teachers by name from the local hub cache only, and the
fine-tune compared with and without the teacher in one run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from edgecv.compress.distill import DistillationLoss, DistillConfig, torchvision_teacher
from edgecv.compress.prune import PruneConfig, prune_model
from edgecv.errors import EdgecvError
from edgecv.models import build_model
from edgecv.stages.train import FinetuneConfig
from edgecv.train.config import TrainConfig
from edgecv.train.loop import fit
from tests.conftest import TINY, run_cli, write_recipe

EXAMPLE = torch.randn(2, 3, 16, 16)


def teacher_and_student():
    torch.manual_seed(0)
    teacher = build_model("edgecv:resnet8", num_classes=4, image_size=16, width=16).eval()
    student = prune_model(teacher, PruneConfig(ratio=0.5, importance="l1"), EXAMPLE[:1])[0].train()
    return teacher, student


def test_feature_kd_adapts_pruned_channels_and_trains_the_adapters():
    teacher, student = teacher_and_student()
    cfg = DistillConfig(features=["layer2", "layer3"], feature_weight=1.0)
    loss_fn = DistillationLoss(teacher, cfg, student=student, example_input=EXAMPLE[:1])
    adapters = dict(loss_fn.adapters.items())
    assert all(isinstance(a, torch.nn.Conv2d) for a in adapters.values())  # every channel count was cut
    assert adapters["layer3"].in_channels < adapters["layer3"].out_channels == 64
    before = {k: a.weight.detach().clone() for k, a in adapters.items()}
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(4)]
    train = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", schedule="constant", warmup_epochs=0)
    fit(student, data, data[:1], train, loss_fn=loss_fn)
    assert all(not torch.equal(before[k], a.weight) for k, a in adapters.items())  # the optimizer had them
    student.train()
    with torch.no_grad():
        loss_fn(student(data[0][0]), data[0][0], data[0][1])
        after = loss_fn.feature_loss().item()
    loss_fn.close()
    assert not student.layer3._forward_hooks  # close() removed the hooks
    s = teacher_and_student()[1].train()
    with torch.no_grad():
        fresh = DistillationLoss(teacher, cfg, student=s, example_input=EXAMPLE[:1])
        fresh(s(data[0][0]), data[0][0], data[0][1])
        untrained = fresh.feature_loss().item()
    assert after < untrained  # the student (and its adapters) moved towards the teacher's features


def test_feature_kd_names_a_missing_layer():
    teacher, student = teacher_and_student()
    with pytest.raises(EdgecvError, match="distill.features: the student has no layer 'layer9'"):
        DistillationLoss(teacher, DistillConfig(features=["layer9"]), student=student, example_input=EXAMPLE[:1])


def test_torchvision_teacher_comes_from_the_hub_cache_only(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "torchvision:mobilenet_v3_small:IMAGENET1K_V1"
    with pytest.raises(EdgecvError, match="weights not in the torch hub cache .*does not download") as err:
        torchvision_teacher(name)
    assert "\n" not in str(err.value)
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    reference = torchvision.models.mobilenet_v3_small()
    cached = Path(tmp_path) / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    teacher = torchvision_teacher(name)
    assert torch.equal(teacher.classifier[-1].weight, reference.classifier[-1].weight)
    with pytest.raises(EdgecvError, match="has no weights 'NOPE'"):
        torchvision_teacher("torchvision:mobilenet_v3_small:NOPE")


def test_compare_without_distill_needs_a_distill_section():
    with pytest.raises(ValueError, match="no 'distill' section"):
        FinetuneConfig(epochs=1, compare_without_distill=True)


def test_compress_reports_both_fine_tunes_and_prune_steps(tmp_path):
    """A real run: prune in two steps (bn_scale, latency allocation measured in ONNX Runtime), then one
    fine-tune with feature + logit KD and the same without; the report shows both rows."""
    recipe = {**TINY, "stages": [
        {"prune": {"ratio": 0.5, "steps": 2, "importance": "bn_scale", "allocation": "latency",
                   "latency_widths": [0.5], "finetune_between": {"epochs": 1, "lr": 0.02}}},
        {"finetune": {"epochs": 1, "lr": 0.02, "compare_without_distill": True,
                      "distill": {"teacher": "baseline", "features": ["layer3"]}}},
    ], "bench": {"backends": ["torch"], "batch_sizes": [1], "warmup": 1, "runs": 3, "rounds": 1}}
    path = write_recipe(tmp_path / "tiny.yaml", recipe)
    proc = run_cli("compress", str(path), "--out", str(tmp_path / "runs"), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    stages = {s["name"]: s for s in yaml.safe_load((run / "manifest.json").read_text())["stages"]}
    prune = stages["prune"]["metrics"]
    assert [s["step"] for s in prune["steps"]] == [1, 2] and prune["steps"][1]["macs"] < prune["steps"][0]["macs"]
    assert set(prune["latency_weights"]) == set(prune["latency_table"])
    comparison = stages["finetune"]["metrics"]["distill_comparison"]
    assert [c["finetune"] for c in comparison] == ["with distillation", "without distillation"]
    report = (run / "report.md").read_text()
    assert "## Distillation" in report and "without distillation" in report
    assert "prune step 1/2" in proc.stdout
