"""Q/DQ placement for ONNX Runtime (uint8 asymmetric activations, int8 per-channel weights).

Every tensor is quantized once: after the activation that follows a conv, after residual Adds, Muls, Concats
and pools, MaxPool sharing its input's quantizer, the pooled features quantized again after Flatten, and the
logits quantized. ORT then fuses DQ -> op -> Q into QLinearConv, QLinearAdd, QGemm ... (the graph ONNX
Runtime's `quantize_static` gives with U8 activations). Activations are first written with the ops ORT has
integer kernels for, as the same function (`lower_for_onnxruntime`): SiLU as x * sigmoid(x) (QLinearSigmoid,
QLinearMul), hard-sigmoid as relu6(x + 3) / 6 and hard-swish as x * hard-sigmoid(x) (QLinearAdd, QLinearMul;
the 1/6 becomes a dequantization scale at export), and a mean over H and W as a global average pool
(QLinearGlobalAveragePool); so no float island sits between integer ops, and the fake-quant model computes
what ORT runs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgecv.compress.quantize.graph import scale_factor, tensor_args
from edgecv.compress.quantize.placer import Placer


def _global_pool_pixels(node: fx.Node) -> int | None:
    """H x W of the input of a global average pool (1 x 1 output), from shape propagation; else None."""
    x = node.args[0] if node.args else None
    in_meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    if in_meta is None or len(in_meta.shape) != 4:
        return None
    out_meta = node.meta.get("tensor_meta")
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    if out_meta is not None:
        is_global = len(out_meta.shape) == 4 and tuple(out_meta.shape[2:]) == (1, 1)
    else:  # a pool the lowering wrote (adaptive_avg_pool2d(x, 1))
        is_global = node.op == "call_function" and size in (1, (1, 1), [1, 1])
    return int(in_meta.shape[2] * in_meta.shape[3]) if is_global else None


def place_onnxruntime(p: Placer, skip_layers: set[str]) -> None:
    if p.example_input is not None:  # tensor ranks and pool sizes for the rewrites below
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(p.gm).propagate(p.example_input)
    lower_for_onnxruntime(p)
    for node in list(p.graph.nodes):
        kind = p.kind(node)
        args = tensor_args(node)
        if kind == "input":
            continue  # quantized when a quantized consumer reads it: a float (skipped) first layer reads float
        elif kind in ("weighted", "float_weighted"):
            if kind == "weighted":
                # A skipped layer reads float: with DQ -> Conv(float W) -> Q around it, ONNX Runtime >= 1.20
                # quantizes the conv by itself, and the layer would not stay float.
                p.read_quantized(args[0])
                if args[0] in p.quant_of:  # its int32 bias, as export writes it (input scale x weight scale)
                    p.modules[node.target].link_input_quantizer(p.gm.get_submodule(p.quant_of[args[0]]))
            if p.single_user_kind(node) not in ("relu", "relu6"):
                p.quantize_output(node)
        elif kind in ("relu", "relu6"):
            p.quantize_output(node, 6.0 if kind == "relu6" else float("inf"))
        elif kind == "act":
            p.read_quantized(args[0])
            p.quantize_output(node)
        elif kind in ("add", "mul", "cat"):
            inputs = args if kind != "cat" else [a for a in node.args[0] if isinstance(a, fx.Node)]
            for a in inputs:
                p.read_quantized(a)
            if p.single_user_kind(node) not in ("relu", "relu6"):
                p.quantize_output(node)
        elif kind == "const":
            p.quant_of[node] = str(node.target)
        elif kind == "scale":
            if (args[0] in p.quant_of or args[0] in p.scaled) and (scale_factor(node) or 0.0) > 0:
                p.scaled.add(node)
        elif kind == "maxpool":
            p.apply(node, p.ensure_quantized(args[0]))  # input and output share one scale / zero point
        elif kind == "avgpool":
            in_q, out_q = (p.gm.get_submodule(q) for q in (p.ensure_quantized(args[0]), p.quantize_output(node)))
            out_q.set_scale_ceiling(in_q)  # an average never leaves its input's range
            pixels = _global_pool_pixels(node)
            if pixels:  # QLinearGlobalAveragePool runs only while in scale / (out scale x pixels) < 256
                out_q.set_scale_floor(in_q, 1.0 / (255.0 * pixels))
        elif kind in ("shape", "item") and args and args[0] in p.quant_of:
            # moved values keep their scale: Q/DQ with the same parameters after the move lets ORT move uint8
            p.apply(node, p.quant_of[args[0]])
        elif kind in ("transparent", "split") and args and args[0] in p.quant_of:
            p.quant_of[node] = p.quant_of[args[0]]  # a split's tuple: each getitem applies the quantizer


# ---- lowering for ONNX Runtime: the same functions, written with ops that have integer kernels -----------


def _hard_sigmoid(p: Placer, x: fx.Node) -> fx.Node:
    """hard-sigmoid(x) = relu6(x + 3) * (1/6): QLinearAdd (its output range [0, 6] does the clip), and a
    scale that export folds into the DequantizeLinear after it."""
    return p.call(operator.mul, p.call(F.relu6, p.call(operator.add, x, p.constant(3.0))), 1.0 / 6.0)


def _lower_silu(p: Placer, node: fx.Node) -> fx.Node:
    x = node.args[0]
    return p.call(operator.mul, x, p.call(torch.sigmoid, x))


def _lower_hardswish(p: Placer, node: fx.Node) -> fx.Node:
    x = node.args[0]
    return p.call(operator.mul, x, _hard_sigmoid(p, x))


def _lower_hardsigmoid(p: Placer, node: fx.Node) -> fx.Node:
    return _hard_sigmoid(p, node.args[0])


def _lower_spatial_mean(p: Placer, node: fx.Node) -> fx.Node:
    pooled = p.call(F.adaptive_avg_pool2d, node.args[0], 1)
    return pooled if _mean_keepdim(node) else p.call(torch.flatten, pooled, 1)


_LOWERINGS: dict[str, Callable[[Placer, fx.Node], fx.Node]] = {
    "silu": _lower_silu,
    "hardswish": _lower_hardswish,
    "hardsigmoid": _lower_hardsigmoid,
    "spatial_mean": _lower_spatial_mean,
}
_LOWERED_MODULES = {nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid"}
_LOWERED_FUNCTIONS = {F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid"}


def _mean_dims(node: fx.Node) -> object:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def _mean_keepdim(node: fx.Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _is_spatial_mean(node: fx.Node) -> bool:
    """x.mean((2, 3)) / torch.mean(x, [-2, -1]) of a 4-D tensor (needs shape propagation's meta, which
    place_onnxruntime gathers)."""
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    )
    if not is_mean or node.kwargs.get("dtype") is not None:
        return False
    dims = _mean_dims(node)
    meta = getattr(node.args[0], "meta", {}).get("tensor_meta")
    if not isinstance(dims, (list, tuple)) or meta is None or len(meta.shape) != 4:
        return False
    return sorted(d % 4 for d in dims if isinstance(d, int)) == [2, 3] and len(dims) == 2


def lowering_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The name of the rewrite `lower_for_onnxruntime` applies to `node`, or None."""
    if node.op == "call_module":
        return _LOWERED_MODULES.get(type(modules[node.target]))
    if node.op == "call_function" and node.target in _LOWERED_FUNCTIONS:
        return _LOWERED_FUNCTIONS[node.target]
    return "spatial_mean" if _is_spatial_mean(node) else None


def lower_for_onnxruntime(p: Placer) -> dict[str, int]:
    """Rewrite SiLU, hard-swish, hard-sigmoid and spatial means (see the module docstring) into the same
    function made of ops ONNX Runtime runs in integer. Returns how many of each were rewritten."""
    counts: dict[str, int] = {}
    for node in list(p.graph.nodes):
        name = lowering_of(node, p.modules)
        if name is None:
            continue
        with p.graph.inserting_before(node):
            new = _LOWERINGS[name](p, node)
        node.replace_all_uses_with(new)
        p.graph.erase_node(node)
        counts[name] = counts.get(name, 0) + 1
    if counts:
        p.gm.delete_all_unused_submodules()
        p.modules = dict(p.gm.named_modules())
    return counts
