"""INT8 quantization: fake-quant modules, BatchNorm folding, per-backend Q/DQ placement and calibration.

Typical use (PTQ):

    qmodel = prepare_qat(model, "onnxruntime", example_input)
    apply_calibrator(qmodel, collect_stats(qmodel, batches), "percentile")
    export_onnx(qmodel, Path("model.int8.onnx"), example_input)   # edgecv.export.onnx

QAT continues from there with the shared training loop (`set_learnable_ranges` to learn the ranges).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgecv.compress.quantize.build import FLOAT_SHAPES_KEY, META_KEY, REPARAM_META_KEY, build_quantized
from edgecv.compress.quantize.calibrate import (
    CALIBRATORS,
    CalibStats,
    TensorStats,
    apply_calibrator,
    collect_stats,
    freeze_bn_stats,
    set_fake_quant,
    set_learnable_ranges,
)
from edgecv.compress.quantize.fakequant import FakeQuantize, QuantConv2d, QuantLinear
from edgecv.compress.quantize.placer import PlacementProfile
from edgecv.compress.quantize.sensitivity import layer_sensitivity, resolve_skip_layers
from edgecv.compress.quantize.spec import QuantSpec
from edgecv.compress.quantize.targets import PROFILES
from edgecv.errors import EdgecvError

__all__ = [
    "CALIBRATORS",
    "PROFILES",
    "CalibStats",
    "FakeQuantize",
    "PlacementProfile",
    "QuantSpec",
    "QuantConv2d",
    "QuantLinear",
    "TensorStats",
    "apply_calibrator",
    "build_quantized",
    "collect_stats",
    "float_structure",
    "freeze_bn_stats",
    "is_quantized",
    "layer_sensitivity",
    "prepare_qat",
    "quant_spec",
    "quantizable_layers",
    "reparam_check",
    "resolve_skip_layers",
    "set_fake_quant",
    "set_learnable_ranges",
]


def prepare_qat(
    model: nn.Module,
    target: str,
    example_input: torch.Tensor,
    skip_layers: Sequence[str] = (),
    freeze_bn: bool = True,
) -> nn.Module:
    """A fake-quant copy of the float `model` for `target` (a PROFILES name): traced with torch.fx,
    BatchNorm folded (or simulated-folded when freeze_bn=False), quantizers placed as the backend fuses
    them, weights per output channel. `skip_layers` (names from model.named_modules()) stay float.
    Quantizers start disabled: calibrate (collect_stats + apply_calibrator) to enable them."""
    if isinstance(skip_layers, str):
        skip_layers = [skip_layers]
    return build_quantized(model, QuantSpec(target, tuple(skip_layers), freeze_bn), example_input)


def is_quantized(model: nn.Module) -> bool:
    return META_KEY in getattr(model, "meta", {})


def quant_spec(qmodel: nn.Module) -> QuantSpec:
    """What rebuilds `qmodel`'s structure: target, layers left in float, BatchNorm folding."""
    if not is_quantized(qmodel):
        raise EdgecvError("quant_spec: the model was not made by prepare_qat")
    return qmodel.meta[META_KEY]


def float_structure(qmodel: nn.Module) -> dict[str, dict[str, int]]:
    """The channel counts of the float model `qmodel` was made from (what a checkpoint rebuilds)."""
    return qmodel.meta[FLOAT_SHAPES_KEY]


def quantizable_layers(model_or_qmodel: nn.Module) -> list[str]:
    """Names of the Conv/Linear layers that get (float model) or got (fake-quant model) quantized weights."""
    if is_quantized(model_or_qmodel):
        return [n for n, m in model_or_qmodel.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    return [n for n, m in model_or_qmodel.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n]


def reparam_check(qmodel: nn.Module) -> dict | None:
    """How the float model's reparameterizable blocks were fused before quantizing (blocks, max abs diff,
    SQNR of fused against unfused), or None when it had none."""
    return qmodel.meta.get(REPARAM_META_KEY)
