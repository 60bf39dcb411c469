"""Channel counts of a model's layers: enough to rebuild a pruned net before loading its weights."""

from __future__ import annotations

import torch
from torch import nn

from edgecv.errors import EdgecvError

# A module's own parameters that pruning may resize, outside the layers handled by name below (ConvNeXt's
# per-channel `layer_scale`, for one): recorded as {"parameters": {name: shape}}.
PARAMETERS = "parameters"


def _free_parameters(m: nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in m.named_parameters(recurse=False)}


def model_shapes(model: nn.Module) -> dict[str, dict]:
    """Channel counts of every conv / linear / norm layer, and the shapes of other modules' own parameters:
    enough to rebuild a pruned net."""
    shapes: dict[str, dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            shapes[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            shapes[name] = {"num_features": m.num_features}
        elif isinstance(m, nn.LayerNorm):
            shapes[name] = {"normalized_shape": list(m.normalized_shape)}
        elif isinstance(m, nn.GroupNorm):
            shapes[name] = {"num_channels": m.num_channels}
        elif _free_parameters(m):
            shapes[name] = {PARAMETERS: _free_parameters(m)}
    return shapes


def apply_shapes(model: nn.Module, shapes: dict[str, dict]) -> None:
    """Resize modules of a freshly built model to the recorded (pruned) shapes before loading weights."""
    modules = dict(model.named_modules())
    for name, attrs in shapes.items():
        m = modules.get(name)
        if m is None:
            raise EdgecvError(f"checkpoint does not match the model: no module {name!r}")
        for attr, value in attrs.items():
            if attr == PARAMETERS:
                for pname, shape in value.items():
                    setattr(m, pname, nn.Parameter(torch.zeros(shape)))
            else:
                setattr(m, attr, tuple(value) if attr == "normalized_shape" else value)
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
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight = nn.Parameter(torch.ones(m.normalized_shape))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.zeros(m.normalized_shape))
        elif isinstance(m, nn.GroupNorm) and m.affine:
            m.weight, m.bias = nn.Parameter(torch.ones(m.num_channels)), nn.Parameter(torch.zeros(m.num_channels))
