"""Checkpoints = state_dict + the structure needed to rebuild the model (model spec, pruned channel
counts, quantizer spec). Loaded with `torch.load(weights_only=True)`; never a pickled module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecv.errors import EdgecvError
from edgecv.io import atomic_open

FORMAT = "edgecv.checkpoint/1"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and os.replace: never a half-written checkpoint."""
    with atomic_open(path) as fh:
        torch.save(obj, fh)


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


def save_model(path: Path, model: nn.Module, spec: dict, quant: dict | None = None, meta: dict | None = None) -> None:
    """Save `model` with its rebuild recipe. `spec` holds build_model's arguments."""
    float_shapes = getattr(model, "_edgecv_float_shapes", None)  # a quantized model's pre-folding structure
    atomic_save(
        {
            "format": FORMAT,
            "model": dict(spec),
            "shapes": float_shapes if float_shapes is not None else model_shapes(model),
            "quant": quant,
            "meta": meta or {},
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def read_checkpoint(path: Path) -> dict:
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


def build_from_spec(spec: dict, shapes: dict, quant: dict | None) -> nn.Module:
    """Build the float net, resize it to the recorded shapes, and re-insert quantizers if it was quantized."""
    from edgecv.models import build_model

    kwargs = {k: spec.get(k) for k in ("num_classes", "in_channels", "image_size", "width", "small_input_stem",
                                       "stem_stride")}
    model = build_model(spec["name"], weights=None, **kwargs)
    apply_shapes(model, shapes)
    if quant is not None:
        from edgecv.compress.quantize import prepare_qat

        example = torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"])
        model = prepare_qat(model, example_input=example, **quant)
        model._edgecv_float_shapes = shapes
    return model


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild and load a checkpoint; returns (model in eval mode, checkpoint header without weights)."""
    return model_from_checkpoint(read_checkpoint(path), path)


def model_from_checkpoint(ckpt: dict, path: Path) -> tuple[nn.Module, dict]:
    """load_model for a checkpoint already read with read_checkpoint (`path` names it in errors)."""
    try:
        model = build_from_spec(ckpt["model"], ckpt.get("shapes", {}), ckpt.get("quant"))
        model.load_state_dict(ckpt["state_dict"])
    except EdgecvError:
        raise
    except (KeyError, RuntimeError, TypeError) as exc:
        raise EdgecvError(f"{str(path)!r}: checkpoint does not match its model ({str(exc).splitlines()[0]})") from None
    model.eval()
    header = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, header
