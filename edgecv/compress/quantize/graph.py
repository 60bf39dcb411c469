"""The fx side of quantization: trace a float model, say what each node does (`node_kind`, in the terms the
placement rules use), remove in-place ops, fold BatchNorm into the conv before it and swap in the
weight-quantized Conv/Linear."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgecv.compress.quantize.fakequant import (
    FakeQuantize,
    QuantConstant,
    QuantConv2d,
    QuantLinear,
    fold_bn_into,
)
from edgecv.errors import EdgecvError


def _leaf_types() -> tuple[type, ...]:
    leaves: list[type] = [FakeQuantize, QuantConv2d, QuantLinear]
    try:
        from torchvision.ops import StochasticDepth

        leaves.append(StochasticDepth)
    except ImportError:  # torchvision is optional for custom models
        pass
    return tuple(leaves)


class QuantTracer(fx.Tracer):
    """torch.fx tracer that keeps stochastic depth, edgecv's quant modules and subclasses of torch's activation
    modules (the surgery's ReLU) as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*_leaf_types(), *_ACT_MODULES, nn.ReLU, nn.Hardtanh)) or super().is_leaf_module(
            m, module_qualified_name
        )


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = QuantTracer().trace(model)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        raise EdgecvError(
            f"quantize: cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc})"
        ) from None
    return fx.GraphModule(model, graph, type(model).__name__)

# ---- node classification -------------------------------------------------------------------------

_ACT_MODULES = (nn.Hardswish, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid, nn.GELU, nn.Tanh, nn.LeakyReLU, nn.Mish)
_ACT_FUNCTIONS = {
    F.hardswish, F.silu, F.sigmoid, torch.sigmoid, F.hardsigmoid, F.gelu, torch.tanh, F.tanh,
    F.leaky_relu, F.mish,
}  # fmt: skip
_SHAPE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
}  # fmt: skip
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute", "contiguous"}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split}
_SPLIT_METHODS = {"chunk", "split", "tensor_split"}


def _module_kind(m: nn.Module) -> str:
    if isinstance(m, (QuantConv2d, QuantLinear)):
        return "weighted"
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return "float_weighted"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0:  # includes ReLU6
        return "relu6"
    if isinstance(m, _ACT_MODULES):
        return "act"
    if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
        return "maxpool"
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return "avgpool"
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return "shape"
    if isinstance(m, (nn.Dropout, nn.Identity)) or type(m).__name__ == "StochasticDepth":
        return "transparent"
    if isinstance(m, FakeQuantize):
        return "quant"
    if isinstance(m, QuantConstant):
        return "const"
    return "other"


def tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


_MUL_TARGETS = (operator.mul, torch.mul, "mul")
_DIV_TARGETS = (operator.truediv, torch.div, torch.true_divide, "div")


def scale_factor(node: fx.Node) -> float | None:
    """c when `node` computes x * c, c * x or x / c for a tensor x and a plain number c; else None."""
    if node.op not in ("call_function", "call_method") or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if node.target in _MUL_TARGETS:
        tensor, number = (a, b) if isinstance(a, fx.Node) else (b, a)
    elif node.target in _DIV_TARGETS:
        tensor, number = a, (1.0 / b if isinstance(b, (int, float)) and b != 0 else None)
    else:
        return None
    if not isinstance(tensor, fx.Node) or isinstance(number, bool) or not isinstance(number, (int, float)):
        return None
    return float(number)


def _mul_kind(node: fx.Node) -> str:
    if len(tensor_args(node)) == 2:
        return "mul"
    return "scale" if scale_factor(node) is not None else "other"


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What a node does, in the terms placement profiles use."""
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        return _module_kind(modules[node.target])
    if node.op == "call_function":
        t = node.target
        if t in (operator.add, torch.add, operator.iadd):
            return "add" if len(tensor_args(node)) == 2 else "other"
        if t in (operator.mul, torch.mul, operator.imul):
            return _mul_kind(node)
        if t in _DIV_TARGETS and scale_factor(node) is not None:
            return "scale"
        if t in (torch.cat, torch.concat):
            return "cat"
        if t in (F.relu, torch.relu):
            return "relu"
        if t is F.relu6:
            return "relu6"
        if t in _ACT_FUNCTIONS:
            return "act"
        if t in (F.max_pool2d, F.adaptive_max_pool2d):
            return "maxpool"
        if t in (F.adaptive_avg_pool2d, F.avg_pool2d):
            return "avgpool"
        if t in _SHAPE_FUNCTIONS:
            return "shape"
        if t in _SPLIT_FUNCTIONS:
            return "split"  # a tuple of tensors, each picked by getitem
        if t is operator.getitem:
            return "item"
        if t is F.dropout:
            return "transparent"
        return "other"
    if node.op == "call_method":
        if node.target in ("add", "add_"):
            return "add" if len(tensor_args(node)) == 2 else "other"
        if node.target in ("mul", "mul_"):
            return _mul_kind(node)
        if node.target == "div" and scale_factor(node) is not None:
            return "scale"
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target in ("sigmoid",):
            return "act"
        if node.target == "mean":
            return "avgpool"
        if node.target in _SHAPE_METHODS:
            return "shape"
        if node.target in _SPLIT_METHODS:
            return "split"
        return "other"
    return node.op  # get_attr, output

# ---- graph preparation: sanitize, fold BatchNorm, swap in quantized layers --------------------------


def set_module(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, module)


def sanitize(gm: fx.GraphModule) -> None:
    """No in-place ops: a quantizer's output must not be changed by a later in-place add or ReLU."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
        elif node.op == "call_function" and node.target is operator.imul:
            node.target = operator.mul
        elif node.op == "call_method" and node.target in ("add_", "mul_", "relu_"):
            node.target = node.target[:-1]
        if node.op == "call_function" and node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    for m in gm.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False


def _folded_float_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    new = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
    ).to(conv.weight.device)  # fmt: skip
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=conv.weight.device)
    weight, bias = fold_bn_into(conv.weight, bias, bn)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    return new


def fold_and_swap(gm: fx.GraphModule, skip_layers: set[str], freeze_bn: bool) -> None:
    """Fold each Conv2d -> BatchNorm2d pair (or keep BN inside the quantized conv when freeze_bn=False),
    then replace every Conv2d/Linear outside `skip_layers` with its weight-quantized form."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        prev = node.args[0]
        if not (
            isinstance(prev, fx.Node)
            and prev.op == "call_module"
            and type(modules[prev.target]) is nn.Conv2d
            and len(prev.users) == 1
        ):
            continue
        conv, bn = modules[prev.target], modules[node.target]
        if freeze_bn or prev.target in skip_layers:
            new: nn.Module = _folded_float_conv(conv, bn)
        else:
            new = QuantConv2d.from_float(conv, bn, fold=False)
        set_module(gm, prev.target, new)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in skip_layers:
            continue
        m = modules[node.target]
        if type(m) is nn.Conv2d:
            set_module(gm, node.target, QuantConv2d.from_float(m))
        elif type(m) is nn.Linear:
            set_module(gm, node.target, QuantLinear.from_float(m))
