"""The ways pruning failed on torchvision families: grouped convolutions missing the asked MACs, a
convolution classifier losing classes, a channel shuffle and window attention breaking torch-pruning."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from edgecv.compress.prune import MACS_TOLERANCE, PruneConfig, analyse, prune_model
from edgecv.errors import EdgecvError
from edgecv.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name: str, classes: int = 10, size: int = 64) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(f"torchvision:{name}", classes, 3, size).eval(), torch.zeros(1, 3, size, size)


@pytest.mark.parametrize("name", ["regnet_x_400mf"])
def test_grouped_convolutions_meet_the_asked_macs_with_round_to(name):
    model, example = _model(name)
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruned, info = prune_model(model, PruneConfig(target_macs=0.5, round_to=8), example)
    assert abs(info["macs_kept"] / 0.5 - 1) <= MACS_TOLERANCE, info
    convs = {n: m for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    changed = [n for n, m in convs.items() if m.out_channels != before[n]]
    assert changed and all(convs[n].out_channels % 8 == 0 for n in changed)
    assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_a_convolution_classifier_keeps_every_class():
    model, example = _model("squeezenet1_1", classes=10)
    pruned, info = prune_model(model, PruneConfig(target_macs=0.5, round_to=8), example)
    assert pruned.classifier[1].out_channels == 10
    assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert abs(info["macs_kept"] / 0.5 - 1) <= MACS_TOLERANCE


def test_a_channel_shuffle_is_one_line_naming_model_and_layer():
    model, example = _model("shufflenet_v2_x0_5")
    with pytest.raises(EdgecvError, match=r"cannot prune ShuffleNetV2 near layer 'stage\d\.\d.*channel shuffle"):
        analyse(model, PruneConfig(target_macs=0.5), example)


def test_the_dependency_analysis_has_a_time_limit():
    model = build_model("edgecv:resnet8", 4, 3, 16).eval()
    model.register_forward_pre_hook(lambda *_: time.sleep(0.5))  # every forward, the traced one too, outlasts 1 ms
    with pytest.raises(EdgecvError, match=r"did not finish analysing CifarResNet within prune.graph_timeout 0.001 s"):
        prune_model(model, PruneConfig(ratio=0.5, graph_timeout=0.001), torch.zeros(1, 3, 16, 16))


def test_an_unreachable_macs_ask_is_refused_not_missed():
    model = build_model("edgecv:resnet8", 4, 3, 16, width=8).eval()  # 8/16/32 channels: round_to 32 cannot cut
    with pytest.raises(EdgecvError, match=r"prune.target_macs 0.5: the pruned CifarResNet keeps 1.000 of its MACs"):
        prune_model(model, PruneConfig(target_macs=0.5, round_to=32), torch.zeros(1, 3, 16, 16))


def test_a_pruned_convnext_reloads_with_its_layer_norms_and_layer_scales(tmp_path):
    from edgecv.checkpoint import load_model, save_model
    from edgecv.models.spec import ModelSpec

    spec = ModelSpec("torchvision:convnext_tiny", 10, 3, 32, small_input_stem=False)
    model = build_model(spec.name, **spec.build_kwargs()).eval()
    pruned, _ = prune_model(model, PruneConfig(target_macs=0.5, round_to=8), spec.example_input())
    assert pruned.features[1][0].layer_scale.shape[0] < 96  # torch-pruning resized the free parameter
    save_model(tmp_path / "model.pt", pruned, spec)
    reloaded, _ = load_model(tmp_path / "model.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(reloaded(x), pruned(x))
