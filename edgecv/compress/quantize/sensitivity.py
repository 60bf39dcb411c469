"""Per-layer quantization sensitivity, and turning it into a skip list ("auto:N")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgecv.compress.quantize.build import build_quantized
from edgecv.compress.quantize.calibrate import apply_calibrator, collect_stats, set_fake_quant
from edgecv.compress.quantize.fakequant import QuantConv2d, QuantLinear
from edgecv.compress.quantize.placer import place_layer_inputs
from edgecv.compress.quantize.spec import QuantSpec
from edgecv.errors import EdgecvError
from edgecv.sqnr import sqnr_db

METRICS = ("sqnr", "accuracy")


def layer_sensitivity(
    model: nn.Module,
    target: str,
    example_input: torch.Tensor,
    calib_batches: list[torch.Tensor],
    eval_batches: list[tuple[torch.Tensor, torch.Tensor]],
    metric: str = "sqnr",
) -> list[dict]:
    """Quantize one layer at a time (its weights and its input, with `target`'s integer types) and measure
    the output SQNR in dB against float and the top-1 drop in points. Rows sorted most sensitive first
    (lowest SQNR for metric="sqnr", largest top-1 drop for metric="accuracy")."""
    if metric not in METRICS:
        raise EdgecvError(f"sensitivity metric {metric!r} is unknown; choose from: {', '.join(METRICS)}")
    qmodel = build_quantized(model, QuantSpec(target), example_input, place=place_layer_inputs).eval()
    apply_calibrator(qmodel, collect_stats(qmodel, calib_batches), "max")
    set_fake_quant(qmodel, False)
    inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in eval_batches]
    labels = [b[1] if isinstance(b, (tuple, list)) and len(b) > 1 else None for b in eval_batches]
    with torch.no_grad():
        reference = [qmodel(x) for x in inputs]
    ref_all = torch.cat(reference)
    have_labels = all(y is not None for y in labels)
    ref_top1 = float((ref_all.argmax(1) == torch.cat(labels)).float().mean()) * 100 if have_labels else None
    modules = dict(qmodel.named_modules())
    rows = []
    for name, layer in modules.items():
        if not isinstance(layer, (QuantConv2d, QuantLinear)):
            continue
        input_quant = modules.get(f"{name.replace('.', '_')}_in_aq")
        switches = [layer.weight_quant] + ([input_quant] if input_quant is not None else [])
        for q in switches:
            q.enabled.fill_(True)
        with torch.no_grad():
            out = torch.cat([qmodel(x) for x in inputs])
        for q in switches:
            q.enabled.fill_(False)
        top1_drop = None
        if have_labels:
            top1 = float((out.argmax(1) == torch.cat(labels)).float().mean()) * 100
            top1_drop = ref_top1 - top1
        rows.append({"layer": name, "sqnr_db": sqnr_db(ref_all.numpy(), out.numpy()), "top1_drop": top1_drop})
    if metric == "accuracy":
        if not have_labels:
            raise EdgecvError("sensitivity metric 'accuracy' needs eval batches of (images, labels)")
        rows.sort(key=lambda r: (-r["top1_drop"], r["sqnr_db"]))
    else:
        rows.sort(key=lambda r: r["sqnr_db"])
    return rows


def resolve_skip_layers(spec: Sequence[str] | str, sensitivity_rows: Sequence[dict] | None) -> list[str]:
    """Layers to keep float: a list of names, a comma-separated string, or "auto:N" (the N most sensitive
    layers in `sensitivity_rows`, which must then be given)."""
    known = [r["layer"] for r in sensitivity_rows] if sensitivity_rows else None
    if isinstance(spec, str):
        if spec.startswith("auto:"):
            count = spec.partition(":")[2]
            if not count.isdigit():
                raise EdgecvError(f"quantize.skip_layers {spec!r}: expected 'auto:N' with N a whole number")
            if known is None:
                raise EdgecvError(f"quantize.skip_layers {spec!r} needs a sensitivity analysis first")
            return known[: int(count)]
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = list(spec)
    if known is not None:
        for n in names:
            if n not in known:
                raise EdgecvError(f"quantize.skip_layers: {n!r} is not a quantizable layer")
    return names
