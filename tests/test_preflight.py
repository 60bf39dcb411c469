"""A model that cannot go through a recipe's stage is refused in one line, naming the model, the stage and
the layer, before any training; every stage's model is checked for the dataset's class count."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from conftest import ROOT, TINY, run_cli, write_recipe
from test_cli import one_error_line

from edgecv.errors import EdgecvError
from edgecv.models.spec import ModelSpec
from edgecv.pipeline import check_class_outputs


def _recipe(tmp_path, model: dict, stages: list, size: int = 32):
    recipe = json.loads(json.dumps(TINY))
    recipe.update(model=model, stages=stages)
    recipe["data"].update(image_size=size)
    return write_recipe(tmp_path / "r.yaml", recipe)


def test_a_channel_shuffle_is_refused_before_training(tmp_path):
    path = _recipe(tmp_path, {"name": "torchvision:shufflenet_v2_x0_5"}, [{"prune": {"target_macs": 0.5}}])
    line = one_error_line(run_cli("compress", str(path), "--out", str(tmp_path / "runs")))
    assert "stages[0].prune: torch-pruning cannot prune ShuffleNetV2 near layer 'stage" in line
    assert "channel shuffle" in line and "torchvision:shufflenet_v2_x0_5, checked before training" in line
    assert not (tmp_path / "runs").exists()  # no training, nothing written


def test_a_pooling_size_onnx_cannot_export_is_refused_before_training(tmp_path):
    (tmp_path / "poolnets.py").write_text(
        "import torch.nn as nn, torch.nn.functional as F\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.conv, self.fc = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Linear(8 * 36, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 6).flatten(1))\n"
        "def net(num_classes=10):\n"
        "    return Net(num_classes)\n"
    )
    path = _recipe(tmp_path, {"name": "poolnets:net"}, [{"export": {}}])
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    line = one_error_line(run_cli("compress", str(path), "--out", str(tmp_path / "runs"), env=env))
    assert line.startswith("error: stages[0].export: torch cannot export Net to ONNX at (32, 32) px")
    assert "output size does not divide its input size" in line and "checked before training" in line


def test_a_model_with_the_wrong_class_count_is_refused():
    spec = ModelSpec("torchvision:squeezenet1_1", num_classes=10, in_channels=3, image_size=64)
    unadapted = torchvision.models.squeezenet1_1()  # its convolution classifier still has 1000 outputs
    with pytest.raises(EdgecvError, match=r"stage 'prune' \(torchvision:squeezenet1_1\) returns \(2, 1000\) for 2"):
        check_class_outputs(unadapted, spec, "stage 'prune'")
    check_class_outputs(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 10)), spec, "x")
