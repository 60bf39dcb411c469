"""Q/DQ placement for TensorRT: int8 symmetric Q/DQ where TensorRT fuses them, as NVIDIA's ModelOpt quantizer
places them: on the inputs of Conv/Linear, pooling, Mul and hard-swish, and on the skip input of each
residual Add, leaving the output of the conv that feeds the Add float so TensorRT fuses Conv + Add (+ ReLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgecv.compress.quantize.fakequant import QuantConv2d, QuantLinear
from edgecv.compress.quantize.graph import tensor_args
from edgecv.compress.quantize.placer import Placer


def place_tensorrt(p: Placer, skip_layers: set[str]) -> None:
    """Q/DQ where TensorRT fuses them, as NVIDIA's ModelOpt ONNX quantizer places them: the inputs of Conv/Linear,
    pooling, Mul (the squeeze-excitation gate) and hard-swish, and the skip input of each residual Add; not the
    output of the conv that feeds the Add, so TensorRT fuses Conv + Add (+ ReLU) into one INT8 kernel. A tensor
    is quantized once for all its readers (one Q/DQ pair), except the residual Add, which reads its conv's
    output float."""
    wanted: dict[fx.Node, None] = {}  # producers to quantize, in graph order
    float_edges: list[tuple[fx.Node, fx.Node]] = []  # (residual Add, conv output it reads float)
    for node in list(p.graph.nodes):
        for producer in _tensorrt_quantized_inputs(p, node, float_edges):
            wanted.setdefault(producer)
    qnodes = {producer: p.apply(producer, p.new_quantizer(producer.name)) for producer in wanted}
    for add, producer in float_edges:
        if producer in qnodes:
            add.replace_input_with(qnodes[producer], producer)
    for m in p.gm.modules():  # int8 weights in [-127, 127], also once QAT has learned their ranges
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.weight_quant.narrow_range = True


def _tensorrt_quantized_inputs(
    p: Placer, node: fx.Node, float_edges: list[tuple[fx.Node, fx.Node]]
) -> list[fx.Node]:
    """The inputs of `node` that TensorRT wants in INT8 (ModelOpt's choice for the same ONNX op)."""
    kind = p.kind(node)
    args = [a for a in tensor_args(node) if a.op != "get_attr"]  # a parameter (layer scale) is a constant
    if not args:
        return []
    if kind in ("avgpool", "maxpool"):
        # x.mean(...) exports ReduceMean, which TensorRT does not quantize; nor a pool that makes the output
        return [] if node.op == "call_method" or _feeds_only_output(p, node) else args[:1]
    if kind == "weighted" or (kind == "act" and _is_hardswish(p, node)) or _is_batchnorm(p, node):
        return args[:1]
    if _is_layernorm(p, node) and _fusible_conv(p, _through_copies(p, args[0])) is not None:
        return args[:1]  # Conv -> LayerNorm: TensorRT's INT8 LayerNorm kernel reads the conv output in INT8
    if kind == "mul" and len(args) == 2:
        return args
    if kind == "add" and len(args) == 2:
        backbone = _residual_backbone_input(p, node, args)
        if backbone is None:
            return args
        float_edges.append((node, backbone))
        return [a for a in args if a is not backbone]
    return []


_COPY_FUNCTIONS = {torch.permute, torch.transpose, torch.flatten, torch.reshape}
_COPY_METHODS = {"permute", "transpose", "view", "reshape", "flatten", "contiguous"}


def _through_copies(p: Placer, node: fx.Node) -> fx.Node:
    """The node whose values `node` only moves (permute, reshape, flatten, dropout)."""
    while (
        p.kind(node) in ("shape", "transparent")
        or (node.op == "call_function" and node.target in _COPY_FUNCTIONS)
        or (node.op == "call_method" and node.target in _COPY_METHODS)
        or (node.op == "call_module" and type(p.modules[node.target]).__name__ == "Permute")
    ):
        node = tensor_args(node)[0]
    return node


def _feeds_only_output(p: Placer, node: fx.Node) -> bool:
    """Does `node`'s value reach nothing but the model's output (through copies)?"""
    users = list(node.users)
    return bool(users) and all(
        u.op == "output" or (_through_copies(p, u) is node and _feeds_only_output(p, u)) for u in users
    )


def _is_batchnorm(p: Placer, node: fx.Node) -> bool:
    """A BatchNorm left standing (not after a conv, so not folded): TensorRT runs it as an INT8 scale."""
    return node.op == "call_module" and isinstance(p.modules[node.target], nn.BatchNorm2d)


def _is_layernorm(p: Placer, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(p.modules[node.target], nn.LayerNorm)
    return node.op == "call_function" and node.target is F.layer_norm


def _is_hardswish(p: Placer, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(p.modules[node.target], nn.Hardswish)
    return node.op == "call_function" and node.target is F.hardswish


def _fusible_conv(p: Placer, node: fx.Node) -> fx.Node | None:
    """The Conv/Linear whose output `node` is, as TensorRT fuses it with a following element-wise op: the layer
    itself or its ReLU (BatchNorm is folded into it), through dropout and stochastic depth."""
    while p.kind(node) == "transparent":
        node = tensor_args(node)[0]
    if p.kind(node) == "relu":
        node = tensor_args(node)[0]
    return node if p.kind(node) in ("weighted", "float_weighted") else None


def _ancestor_distances(p: Placer, node: fx.Node) -> dict[fx.Node, int]:
    """Every ancestor of `node` with its distance in ops (breadth first, dropout and stochastic depth free)."""
    distances, frontier = {node: 0}, [node]
    while frontier:
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a not in distances:
                    distances[a] = distances[n] + (p.kind(a) != "transparent")
                    nxt.append(a)
        frontier = nxt
    return distances


def _residual_backbone_input(p: Placer, add: fx.Node, args: list[fx.Node]) -> fx.Node | None:
    """The input of a residual Add that comes from the conv TensorRT fuses the Add into (it stays float), or
    None when the Add is not a residual one. With a conv on both sides (a downsampling block), the conv on the
    longer path from their common ancestor is the block's body; the other input is the skip."""
    convs = [_fusible_conv(p, a) for a in args]
    if convs[0] is None and convs[1] is None:
        return None
    first, second = (_ancestor_distances(p, a) for a in args)
    common = [n for n in first if n in second]
    lca = min(common, key=lambda n: first[n]) if common else None
    if convs[0] is not None and convs[1] is not None:
        if convs[0] is convs[1]:
            return None
        return args[0] if lca is not None and first[lca] > second[lca] else args[1]
    body = 0 if convs[0] is not None else 1
    if lca is convs[body]:  # the other input is computed from the conv's own output: not a residual
        return None
    return args[body]
