"""INT8-friendly surgery: swap the activations ONNX Runtime and small int8 kernels handle badly (hard-swish,
SiLU, hard-sigmoid) for ReLU / ReLU6, and remove squeeze-excitation blocks, on any model built of modules.

Google's "minimalistic" MobileNetV3 variants (no squeeze-excitation, no hard-swish) and NVIDIA's advice to
swap SiLU / LeakyReLU for ReLU before INT8 come from the same measurements: those ops cost more in integer
than they give. The changed net loses accuracy until it is fine-tuned, best with distillation from the
original model (a `finetune` stage with `distill: {teacher: baseline}`).

A surgery changes module types, so a checkpoint records it (`SurgerySpec`s, in order) and the rebuild applies
it again to the freshly built model before loading the weights: `surgery_of(model)` / `apply_surgeries`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgecv.errors import EdgecvError
from edgecv.registry import Registry


class ReLU(nn.ReLU):
    """ReLU as clamp(x, min=0): the same values, but its gradient reads its input, not its output, as the
    gradient of the activation it replaces did; so an in-place op after it in the model's own code (`result +=
    input` in EfficientNetV2's FusedMBConv, MobileNetV3's in-place Dropout) cannot break training. (ReLU6 is
    a hardtanh, whose gradient reads its input already.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return torch.relu(x)  # exported as the Relu every runtime fuses into the conv before it
        return torch.clamp(x, min=0.0)


# The activation a replaced one becomes ("keep": none is replaced).
ACTIVATIONS: Registry[Callable[[], nn.Module] | None] = Registry("surgery activation")
ACTIVATIONS.register("relu", ReLU)
ACTIVATIONS.register("relu6", nn.ReLU6)
ACTIVATIONS.register("keep", lambda: None)

# What becomes of each squeeze-excitation block.
SE_ACTIONS: Registry[Callable[[nn.Module], nn.Module] | None] = Registry("squeeze_excitation action")
SE_ACTIONS.register("remove", lambda se: nn.Identity())
SE_ACTIONS.register("keep", lambda se: se)

# Activations the surgery replaces (a hard-sigmoid that gates a squeeze-excitation block stays a gate).
REPLACED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.Hardswish, nn.SiLU, nn.Hardsigmoid)
_SE_NAME = re.compile(r"squeeze_?excit|^se(module|layer|block)?$", re.IGNORECASE)

SURGERY_ATTR = "_edgecv_surgery"  # on a float model: the surgeries applied to it, in order


@dataclass(frozen=True)
class SurgerySpec:
    """One surgery: the activation that replaces hard-swish / SiLU / hard-sigmoid ("keep": none), and what
    becomes of squeeze-excitation blocks ("remove" or "keep")."""

    activation: str = "relu"
    squeeze_excitation: str = "keep"

    def to_dict(self) -> dict[str, Any]:
        return {"activation": self.activation, "squeeze_excitation": self.squeeze_excitation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurgerySpec:
        spec = cls(str(data.get("activation", "keep")), str(data.get("squeeze_excitation", "keep")))
        ACTIVATIONS.get(spec.activation), SE_ACTIONS.get(spec.squeeze_excitation)  # a known kind, or one line
        return spec

    def describe(self) -> str:
        parts = []
        if self.activation != "keep":
            parts.append(f"hard-swish/SiLU/hard-sigmoid -> {self.activation}")
        if self.squeeze_excitation != "keep":
            parts.append(f"squeeze-excitation: {self.squeeze_excitation}")
        return ", ".join(parts) or "no change"


def is_squeeze_excitation(module: nn.Module) -> bool:
    """torchvision's SqueezeExcitation (MobileNetV3, EfficientNet, RegNetY) and blocks named like one."""
    try:
        from torchvision.ops import SqueezeExcitation

        if isinstance(module, SqueezeExcitation):
            return True
    except ImportError:  # torchvision is optional for custom models
        pass
    return bool(_SE_NAME.search(type(module).__name__))


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _gates(model: nn.Module) -> set[int]:
    """ids of the modules that gate a squeeze-excitation block (its last activation: the sigmoid)."""
    out = set()
    for m in model.modules():
        if is_squeeze_excitation(m):
            gate = getattr(m, "scale_activation", None) or getattr(m, "gate", None)
            if isinstance(gate, nn.Module):
                out.add(id(gate))
    return out


def find_changes(model: nn.Module, spec: SurgerySpec) -> dict[str, list[str]]:
    """The modules `spec` would change: {"activations": [names], "squeeze_excitation": [names]}."""
    gates = _gates(model)
    se = [n for n, m in model.named_modules() if n and is_squeeze_excitation(m)]
    inside_removed = tuple(f"{n}." for n in se) if spec.squeeze_excitation == "remove" else ()
    acts = [
        n for n, m in model.named_modules()
        if isinstance(m, REPLACED_ACTIVATIONS) and id(m) not in gates and not n.startswith(inside_removed)
    ]  # fmt: skip
    top_level_se = [n for n in se if not any(n.startswith(f"{o}.") for o in se if o != n)]
    return {
        "activations": acts if spec.activation != "keep" else [],
        "squeeze_excitation": top_level_se if spec.squeeze_excitation != "keep" else [],
    }


def apply_surgery(model: nn.Module, spec: SurgerySpec, strict: bool = True) -> dict[str, int]:
    """Change `model` in place as `spec` says and record it on the model; returns how many modules of each
    kind changed. strict: a surgery that finds nothing to change is a mistake (one line naming what)."""
    changes = find_changes(model, spec)
    if strict and not any(changes.values()):
        raise EdgecvError(
            f"surgery ({spec.describe()}): {type(model).__name__} has no "
            + ("hard-swish, SiLU or hard-sigmoid module" if spec.activation != "keep" else "")
            + (" and no " if spec.activation != "keep" and spec.squeeze_excitation != "keep" else "")
            + ("squeeze-excitation block" if spec.squeeze_excitation != "keep" else "")
            + " to change"
        )
    se_action = SE_ACTIONS.get(spec.squeeze_excitation)
    for name in changes["squeeze_excitation"]:
        _set_child(model, name, se_action(model.get_submodule(name)))
    make = ACTIVATIONS.get(spec.activation)
    for name in changes["activations"]:
        _set_child(model, name, make())
    setattr(model, SURGERY_ATTR, (*surgery_of(model), spec))
    return {kind: len(names) for kind, names in changes.items()}


def apply_surgeries(model: nn.Module, specs: Sequence[SurgerySpec]) -> nn.Module:
    """Apply recorded surgeries again (a checkpoint rebuild), in order; returns the model."""
    for spec in specs:
        apply_surgery(model, spec, strict=False)
    return model


SURGERY_META_KEY = "edgecv_surgery"  # on a fake-quant GraphModule: its float model's surgeries


def surgery_of(model: nn.Module) -> tuple[SurgerySpec, ...]:
    """The surgeries applied to `model` (or to the float model a fake-quant model was made from)."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and SURGERY_META_KEY in meta:
        return tuple(meta[SURGERY_META_KEY])
    return tuple(getattr(model, SURGERY_ATTR, ()))
