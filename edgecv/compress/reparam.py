"""Structural reparameterization: MobileOne, FastViT, RepViT, RepGhost, RepVGG-style blocks train with
parallel branches (and BatchNorms) that fuse into one conv for inference. They must be fused before
quantization and export, or the INT8 graph quantizes every branch separately.

The walk is timm's `reparameterize_model` (children with `fuse()` are replaced by its result, else
`reparameterize()` / `switch_to_deploy()` run in place), so any model built of such blocks is fused, timm's
or the user's own. The fused model is checked against the unfused one on a seeded batch.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgecv.errors import EdgecvError

_HOOKS = ("fuse", "reparameterize", "switch_to_deploy")
MIN_SQNR_DB = 40.0  # fused vs unfused float outputs: summation order only, far above this
REPARAM_ATTR = "_edgecv_reparameterized"  # on a float model fused by `reparameterize` (a checkpoint records it)
PARENT_META_KEY = "edgecv_reparameterized_parent"  # on a fake-quant GraphModule: its float model was fused


@dataclass(frozen=True)
class ReparamCheck:
    """What fusing did: how many blocks, and how far the fused model's outputs are from the unfused ones."""

    blocks: int
    max_abs_diff: float
    sqnr_db: float

    def to_dict(self) -> dict:
        return asdict(self)


def reparameterizable_blocks(model: nn.Module) -> list[str]:
    """Names of the submodules that fuse (`fuse`, `reparameterize` or `switch_to_deploy`)."""
    return [n for n, m in model.named_modules() if n and any(callable(getattr(m, k, None)) for k in _HOOKS)]


def _fuse_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if callable(getattr(child, "fuse", None)):
            setattr(module, name, child.fuse())
        elif callable(getattr(child, "reparameterize", None)):
            child.reparameterize()
        elif callable(getattr(child, "switch_to_deploy", None)):
            child.switch_to_deploy()
        _fuse_children(getattr(module, name))


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `other` against `reference`, in dB (inf when equal)."""
    noise = (reference - other).float().pow(2).mean()
    signal = reference.float().pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def reparameterize(model: nn.Module, example_input: torch.Tensor,
                   inplace: bool = False) -> tuple[nn.Module, ReparamCheck | None]:
    """(`model` fused for inference, the parity check) or (`model`, None) when nothing in it fuses. A fused
    model whose outputs drift from the unfused one's (SQNR under 40 dB on a seeded batch) is one error line."""
    blocks = reparameterizable_blocks(model)
    if not blocks:
        return model, None
    structure = _structure(model)
    fused = model if inplace else copy.deepcopy(model)
    was_training = model.training
    batch = torch.randn((2, *example_input.shape[1:]), generator=torch.Generator().manual_seed(0))
    batch = batch.to(example_input.device, example_input.dtype)
    with torch.no_grad():
        before = model.eval()(batch)
        _fuse_children(fused.eval())
        after = fused(batch)
    model.train(was_training)
    if _structure(fused) == structure:  # fused already (a pruned MobileOne): nothing changed
        return model, None
    setattr(fused, REPARAM_ATTR, True)
    check = ReparamCheck(len(blocks), float((before - after).abs().max()), sqnr_db(before, after))
    if check.sqnr_db < MIN_SQNR_DB:
        raise EdgecvError(f"reparameterize: the fused {type(model).__name__} disagrees with the unfused one "
                          f"(SQNR {check.sqnr_db:.1f} dB < {MIN_SQNR_DB:.0f}, max abs diff {check.max_abs_diff:.3g})")
    return fused.train(was_training), check


def was_reparameterized(model: nn.Module) -> bool:
    """Whether `model` (or the float model a fake-quant model was made from) was fused by `reparameterize`:
    its structure is the fused one, which a checkpoint rebuild must fuse again before the shapes apply."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and PARENT_META_KEY in meta:
        return bool(meta[PARENT_META_KEY])
    return bool(getattr(model, REPARAM_ATTR, False))
