"""Channel counts of a model's layers: enough to rebuild a pruned net before loading its weights."""

from __future__ import annotations

import torch
from torch import nn

from edgecv.errors import EdgecvError


def model_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel counts of every conv / linear / batch-norm, enough to rebuild a pruned net."""
    shapes: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            shapes[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            shapes[name] = {"num_features": m.num_features}
    return shapes


def apply_shapes(model: nn.Module, shapes: dict[str, dict[str, int]]) -> None:
    """Resize modules of a freshly built model to the recorded (pruned) shapes before loading weights."""
    modules = dict(model.named_modules())
    for name, attrs in shapes.items():
        m = modules.get(name)
        if m is None:
            raise EdgecvError(f"checkpoint does not match the model: no module {name!r}")
        for attr, value in attrs.items():
            setattr(m, attr, value)
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            m.weight = nn.Parameter(torch.zeros(m.out_channels, m.in_channels // m.groups, kh, kw))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.zeros(m.out_channels))
        elif isinstance(m, nn.Linear):
            m.weight = nn.Parameter(torch.zeros(m.out_features, m.in_features))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.zeros(m.out_features))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.affine:
                m.weight, m.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))
            if m.track_running_stats:
                m.register_buffer("running_mean", torch.zeros(n))
                m.register_buffer("running_var", torch.ones(n))
