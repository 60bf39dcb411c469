"""BatchNorm + activation in one module (timm's `BatchNormAct2d`, `SyncBatchNormAct`, `FrozenBatchNormAct2d`)
split into a plain BatchNorm2d, its dropout and its activation before tracing.

torch.fx traces through such a module into an `F.batch_norm` call that nothing folds, so the INT8 graph kept
a float BatchNormalization after every conv. As a plain `nn.BatchNorm2d` leaf it folds into the conv before
it like torchvision's; the numbers are unchanged (the same statistics, dropout and activation, in order).
"""

from __future__ import annotations

import torch
from torch import nn

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def is_norm_act(m: nn.Module) -> bool:
    """A BatchNorm-with-activation module: BatchNorm statistics plus `.act` and `.drop` submodules."""
    if type(m) is nn.BatchNorm2d or not all(hasattr(m, k) for k in (*_BN_TENSORS, "eps", "act", "drop")):
        return False
    return isinstance(m.act, nn.Module) and isinstance(m.drop, nn.Module) and m.running_mean is not None


def plain_batchnorm(m: nn.Module) -> nn.BatchNorm2d:
    """An nn.BatchNorm2d with `m`'s statistics, affine parameters, eps and momentum (train/eval mode kept)."""
    channels = m.running_mean.numel()
    bn = nn.BatchNorm2d(channels, eps=float(m.eps), momentum=getattr(m, "momentum", 0.1),
                        affine=m.weight is not None).to(m.running_mean.device)
    with torch.no_grad():
        for key in _BN_TENSORS:
            value = getattr(m, key)
            if value is not None:
                getattr(bn, key).copy_(value)
        if getattr(m, "num_batches_tracked", None) is not None:
            bn.num_batches_tracked.copy_(m.num_batches_tracked)
    return bn.train(m.training)


def split_norm_act(model: nn.Module) -> int:
    """Replace, in place, each BatchNorm+activation module of `model` by Sequential(BatchNorm2d, drop, act);
    returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if name and is_norm_act(m)]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Sequential(plain_batchnorm(m), m.drop, m.act))
    return len(targets)
