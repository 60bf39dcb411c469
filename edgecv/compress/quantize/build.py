"""Build a fake-quant copy of a float model for a target: fuse reparameterizable blocks, trace, fold BatchNorm,
swap in quantized layers, then place quantizers by the target's profile (see compress/quantize/targets)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import fx, nn

from edgecv.compress.quantize.graph import fold_and_swap, sanitize, trace
from edgecv.compress.quantize.norm_act import split_norm_act
from edgecv.compress.quantize.placer import Placer
from edgecv.compress.quantize.spec import QuantSpec
from edgecv.compress.quantize.targets import PROFILES
from edgecv.compress.reparam import PARENT_META_KEY, reparameterize, was_reparameterized
from edgecv.compress.surgery import SURGERY_META_KEY, surgery_of
from edgecv.errors import EdgecvError
from edgecv.models.shapes import model_shapes

META_KEY = "edgecv_quant"
FLOAT_SHAPES_KEY = "edgecv_float_shapes"
REPARAM_META_KEY = "edgecv_reparam"


def float_quantizable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n]


def build_quantized(
    model: nn.Module,
    spec: QuantSpec,
    example_input: torch.Tensor,
    place: Callable[[Placer, set[str]], None] | None = None,
) -> fx.GraphModule:
    """A fake-quant copy of the float `model` as `spec` describes it (see prepare_qat); `place` overrides
    the profile's placement (sensitivity analysis)."""
    profile = PROFILES.get(spec.target)
    was_training = model.training
    work, reparam = reparameterize(copy.deepcopy(model).eval(), example_input, inplace=True)  # MobileOne & co.
    known = float_quantizable_layers(work)  # skip_layers name the fused model's layers
    unknown = [s for s in spec.skip_layers if s not in known]
    if unknown:
        raise EdgecvError(
            f"skip_layers: {unknown[0]!r} is not a Conv/Linear layer of the model "
            f"(layers: {', '.join(known[:6])}{', ...' if len(known) > 6 else ''})"
        )
    split_norm_act(work)  # timm's BatchNormAct2d: a BatchNorm2d leaf that folds into its conv
    gm = trace(work)
    sanitize(gm)
    fold_and_swap(gm, set(spec.skip_layers), spec.freeze_bn)
    placer = Placer(gm, profile.act_symmetric, example_input)
    (place or profile.place)(placer, set(spec.skip_layers))
    gm.graph.lint()
    gm.recompile()
    gm.meta[META_KEY] = spec
    gm.meta[FLOAT_SHAPES_KEY] = model_shapes(model)  # what a checkpoint rebuilds before re-quantizing
    gm.meta[SURGERY_META_KEY] = surgery_of(model)  # ... after applying the surgeries again
    gm.meta[REPARAM_META_KEY] = reparam.to_dict() if reparam else None  # the fused-vs-unfused check
    gm.meta[PARENT_META_KEY] = was_reparameterized(model)  # fused before pruning: rebuilt fused
    with torch.no_grad():
        gm(example_input)  # fail here, not in the training loop, when the graph is broken
    return gm.train(was_training)
