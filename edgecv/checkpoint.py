"""Checkpoints = state_dict + the structure needed to rebuild the model (its `ModelSpec`, the surgeries that
changed its module types, pruned channel counts, `QuantSpec`). Loaded with `torch.load(weights_only=True)`;
never a pickled module.

The state_dict's `_metadata` (per-module versions that some models check when loading, e.g. torchvision's
MNASNet) is stored beside it and put back on load, as `torch.save(model.state_dict())` would keep it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecv.compress.quantize import QuantSpec, float_structure, is_quantized, quant_spec
from edgecv.compress.reparam import reparameterize, was_reparameterized
from edgecv.compress.surgery import SurgerySpec, apply_surgeries, surgery_of
from edgecv.errors import EdgecvError
from edgecv.io import atomic_torch_save
from edgecv.models import build_model
from edgecv.models.shapes import apply_shapes, model_shapes
from edgecv.models.spec import ModelSpec

FORMAT = "edgecv.checkpoint/1"


@dataclass
class Checkpoint:
    """A checkpoint's header: everything but the weights."""

    spec: ModelSpec
    shapes: dict[str, dict[str, int]]
    quant: QuantSpec | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    surgery: tuple[SurgerySpec, ...] = ()  # applied to the built model, in order, before the shapes
    reparameterized: bool = False  # MobileOne & co. fused (before pruning): fused again before the shapes


def save_model(path: Path, model: nn.Module, spec: ModelSpec, meta: dict | None = None) -> None:
    """Save `model` with what rebuilds it; a fake-quant model keeps its float parent's structure."""
    quant = quant_spec(model) if is_quantized(model) else None
    state = model.state_dict()
    metadata = getattr(state, "_metadata", None)
    atomic_torch_save(
        {
            "format": FORMAT,
            "model": spec.to_dict(),
            "shapes": float_structure(model) if quant is not None else model_shapes(model),
            "quant": quant.to_dict() if quant is not None else None,
            "surgery": [s.to_dict() for s in surgery_of(model)],
            "reparameterized": was_reparameterized(model),
            "meta": meta or {},
            "state_dict": {k: v.detach().cpu() for k, v in state.items()},
            "state_dict_metadata": {k: dict(v) for k, v in metadata.items()} if metadata is not None else None,
        },
        path,
    )


def read_checkpoint(path: Path) -> dict:
    """The raw checkpoint dict (weights included), or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise EdgecvError(f"model file {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals
        raise EdgecvError(f"{str(path)!r} is not a model checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise EdgecvError(f"{str(path)!r} is not an edgecv checkpoint (no '{FORMAT}' header)")
    return ckpt


def checkpoint_header(ckpt: dict, path: Path | str = "checkpoint") -> Checkpoint:
    quant = ckpt.get("quant")
    return Checkpoint(
        spec=ModelSpec.from_dict(ckpt["model"], source=str(path)),
        shapes=ckpt.get("shapes", {}),
        quant=QuantSpec.from_dict(quant) if quant is not None else None,
        meta=ckpt.get("meta", {}),
        surgery=tuple(SurgerySpec.from_dict(s) for s in ckpt.get("surgery") or ()),
        reparameterized=bool(ckpt.get("reparameterized", False)),
    )


def build_from_header(header: Checkpoint) -> nn.Module:
    """Build the float net, apply its surgeries, resize it to the recorded shapes, and re-insert quantizers if
    it was quantized."""
    from edgecv.compress.quantize import build_quantized

    model = build_model(header.spec.name, weights=None, **header.spec.build_kwargs())
    apply_surgeries(model, header.surgery)
    if header.reparameterized:
        model = reparameterize(model, header.spec.example_input(), inplace=True)[0]
    apply_shapes(model, header.shapes)
    if header.quant is not None:
        model = build_quantized(model, header.quant, header.spec.example_input())
    return model


def _state_dict(ckpt: dict) -> dict:
    state = OrderedDict(ckpt["state_dict"])
    metadata = ckpt.get("state_dict_metadata")
    if metadata is not None:
        state._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())  # type: ignore[attr-defined]
    return state


def load_model(path: Path) -> tuple[nn.Module, Checkpoint]:
    """Rebuild and load a checkpoint; returns (model in eval mode, its header)."""
    return model_from_checkpoint(read_checkpoint(path), path)


def model_from_checkpoint(ckpt: dict, path: Path) -> tuple[nn.Module, Checkpoint]:
    """load_model for a checkpoint already read with read_checkpoint (`path` names it in errors)."""
    try:
        header = checkpoint_header(ckpt, path)
        model = build_from_header(header)
        model.load_state_dict(_state_dict(ckpt))
    except EdgecvError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise EdgecvError(
            f"{str(path)!r}: checkpoint does not match its model ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval(), header
