"""Every kind of classifier head gets the dataset's classes, in eval and training mode; the classifier is
found whatever its type; pooling that ONNX cannot export at the image size is made exportable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgecv.export.onnx import export_onnx, ort_session
from edgecv.models import build_model
from edgecv.models.adapt import adapt_model, executed_classifier, find_classifier
from edgecv.models.layers import FixedAdaptiveAvgPool2d

# one builder per kind of head: Linear, Linear inside a Sequential, a 1x1 convolution, auxiliary heads
HEADS = {
    "resnet18": "fc",
    "mnasnet0_5": "classifier.1",
    "squeezenet1_1": "classifier.1",
    "googlenet": "fc",
    "inception_v3": "fc",
    "mobilenet_v3_small": "classifier.3",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", HEADS)
def test_every_head_kind_gets_the_class_count_in_eval_and_training(name):
    size = 80 if name == "inception_v3" else 64
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", 7, 3, size)
    x = torch.randn(2, 3, size, size)
    assert model.eval()(x).shape == (2, 7)
    out = model.train()(x)  # GoogLeNet / Inception return (logits, aux...) here unless adapted
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    assert find_classifier(model)[0] == HEADS[name]
    assert executed_classifier(model, x)[0] == HEADS[name]


def test_grey_images_reach_googlenet_built_for_pretrained_weights():
    import torchvision

    # what torchvision builds for pretrained weights: transform_input re-normalizes exactly three channels
    model = torchvision.models.GoogLeNet(transform_input=True, aux_logits=False, init_weights=False)
    model = adapt_model(model, 5, in_channels=1, image_size=64).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("size_in, size_out", [((2, 2), (7, 7)), ((3, 5), (7, 6)), ((1, 1), (6, 6)), ((9, 13), (7, 6))])
def test_fixed_adaptive_pool_is_the_same_function(size_in, size_out):
    x = torch.randn(3, 4, *size_in)
    expected = nn.functional.adaptive_avg_pool2d(x, size_out)
    torch.testing.assert_close(FixedAdaptiveAvgPool2d(size_in, size_out)(x), expected)


@pytest.mark.parametrize("name, size", [("vgg11", 64), ("alexnet", 96)])
def test_vgg_and_alexnet_export_below_224_px(name, size, tmp_path):
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", 10, 3, size).eval()
    x = torch.randn(2, 3, size, size)
    path = export_onnx(model, tmp_path / "model.onnx", x[:1])
    got = ort_session(path).run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_only_pools_that_cannot_export_are_replaced():
    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(196, 9))

    assert isinstance(adapt_model(net(), 9, 3, 28)[1], nn.AdaptiveAvgPool2d)  # 28 % 7 == 0: ONNX exports it
    replaced = adapt_model(net(), 9, 3, 16)
    assert isinstance(replaced[1], FixedAdaptiveAvgPool2d) and replaced[1].input_size == (16, 16)
    assert replaced(torch.randn(2, 3, 16, 16)).shape == (2, 9)
