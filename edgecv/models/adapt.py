"""Adapt a classification net to a dataset: input channels, class count, and a small-image stem."""

from __future__ import annotations

import torch
from torch import nn


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            return parent, attr, module
    return None


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            found = (parent, attr, module)
    return found


def adapt_model(
    model: nn.Module,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    small_input_stem: bool | None = None,
) -> nn.Module:
    """Replace the classifier for `num_classes`, the first conv for `in_channels`, and on images
    under 64 px (or when asked) make the stem stride 1 and drop the stem max-pool, as CIFAR nets do."""
    head = _last_linear(model)
    if head is not None and head[2].out_features != num_classes:
        parent, attr, lin = head
        setattr(parent, attr, nn.Linear(lin.in_features, num_classes, bias=lin.bias is not None))
    stem = _first_conv(model)
    if stem is None:
        return model
    parent, attr, conv = stem
    small = image_size < 64 if small_input_stem is None else small_input_stem
    if conv.in_channels != in_channels or small:
        new = nn.Conv2d(
            in_channels,
            conv.out_channels,
            kernel_size=3 if small else conv.kernel_size,
            stride=1 if small else conv.stride,
            padding=1 if small else conv.padding,
            bias=conv.bias is not None,
        )
        if not small and conv.in_channels == 3 and in_channels == 1:
            with torch.no_grad():  # keep pretrained filters: grey = sum of the RGB filters
                new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        setattr(parent, attr, new)
    if small and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model
