"""Trace a float model with torch.fx, fold BatchNorm, and place fake-quantizers as a target backend fuses them.

A placement profile decides where activations are fake-quantized and with which integer type:

- `onnxruntime`: every tensor quantized once (uint8, asymmetric), after the activation that follows a conv,
  after residual Adds, Muls, Concats and pools, MaxPool sharing its input's quantizer, the pooled features
  quantized again after Flatten, and the logits quantized. ORT then fuses DQ -> op -> Q into QLinearConv,
  QLinearAdd, QGemm ... (the graph ONNX Runtime's `quantize_static` gives with U8 activations). Activations
  are first written with the ops ORT has integer kernels for, as the same function (`lower_for_onnxruntime`):
  SiLU as x * sigmoid(x) (QLinearSigmoid, QLinearMul), hard-sigmoid as relu6(x + 3) / 6 and hard-swish as
  x * hard-sigmoid(x) (QLinearAdd, QLinearMul; the 1/6 becomes a dequantization scale at export), and a mean
  over H and W as a global average pool (QLinearGlobalAveragePool); so no float island sits between integer
  ops, and the fake-quant model computes what ORT runs.
- `tensorrt`: int8 symmetric Q/DQ where TensorRT fuses them, as NVIDIA's ModelOpt quantizer places them: on the
  inputs of Conv/Linear, pooling, Mul and hard-swish, and on the skip input of each residual Add, leaving the
  output of the conv that feeds the Add float so TensorRT fuses Conv + Add (+ ReLU).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

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
from edgecv.compress.quantize.spec import QuantSpec
from edgecv.compress.surgery import SURGERY_META_KEY, surgery_of
from edgecv.errors import EdgecvError
from edgecv.models.shapes import model_shapes
from edgecv.registry import Registry

META_KEY = "edgecv_quant"
FLOAT_SHAPES_KEY = "edgecv_float_shapes"


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


def _tensor_args(node: fx.Node) -> list[fx.Node]:
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
    if len(_tensor_args(node)) == 2:
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
            return "add" if len(_tensor_args(node)) == 2 else "other"
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
            return "add" if len(_tensor_args(node)) == 2 else "other"
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


def _set_module(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, module)


def _sanitize(gm: fx.GraphModule) -> None:
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


def _fold_and_swap(gm: fx.GraphModule, skip_layers: set[str], freeze_bn: bool) -> None:
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
        _set_module(gm, prev.target, new)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in skip_layers:
            continue
        m = modules[node.target]
        if type(m) is nn.Conv2d:
            _set_module(gm, node.target, QuantConv2d.from_float(m))
        elif type(m) is nn.Linear:
            _set_module(gm, node.target, QuantLinear.from_float(m))


# ---- placement ------------------------------------------------------------------------------------


class Placer:
    """Inserts FakeQuantize calls into an fx graph and remembers which tensors are already quantized."""

    def __init__(
        self, gm: fx.GraphModule, act_symmetric: bool, example_input: torch.Tensor | None = None
    ) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.act_symmetric = act_symmetric
        self.example_input = example_input  # for passes that need tensor ranks (shape propagation)
        self.modules = dict(gm.named_modules())
        self.quant_of: dict[fx.Node, str] = {}  # tensor -> the quantizer its value went through
        self.scaled: set[fx.Node] = set()  # quantized tensors times a positive number (a DQ scale at export)
        self.local_q: dict[fx.Node, fx.Node] = {}  # producer -> its Q node (consumer-local rewiring)

    def kind(self, node: fx.Node) -> str:
        return node_kind(node, self.modules)

    def single_user_kind(self, node: fx.Node) -> str | None:
        return self.kind(next(iter(node.users))) if len(node.users) == 1 else None

    def _new_quantizer(self, base: str, max_range: float | None = None) -> str:
        name = base.replace(".", "_") + "_aq"
        i = 1
        while hasattr(self.gm, name):
            name, i = f"{base.replace('.', '_')}_aq{i}", i + 1
        self.gm.add_submodule(name, FakeQuantize(symmetric=self.act_symmetric, max_range=max_range))
        return name

    def _call_after(self, node: fx.Node, qname: str) -> fx.Node:
        with self.graph.inserting_after(node):
            qnode = self.graph.call_module(qname, (node,))
        self.quant_of[qnode] = qname
        return qnode

    def apply(self, node: fx.Node, qname: str) -> fx.Node:
        """Apply quantizer `qname` to every use of `node`'s output."""
        qnode = self._call_after(node, qname)
        node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        self.quant_of[node] = qname
        return qnode

    def quantize_output(self, node: fx.Node, max_range: float | None = None) -> str:
        qname = self._new_quantizer(node.name, max_range)
        self.apply(node, qname)
        return qname

    def ensure_quantized(self, node: fx.Node) -> str:
        """The quantizer of `node`'s value, quantizing all its uses if it has none yet."""
        return self.quant_of.get(node) or self.quantize_output(node)

    def read_quantized(self, node: fx.Node) -> None:
        """Make readers of `node` read it through DequantizeLinear: quantized already, a quantized tensor
        times a positive number (the number becomes the DQ's scale at export), or quantized now."""
        if node not in self.quant_of and node not in self.scaled:
            self.quantize_output(node)

    def constant(self, value: float) -> fx.Node:
        """A new call of the uint8 constant `value` (one call per reader, as ONNX Runtime wants one
        DequantizeLinear per fused op); insert it with the graph's current insertion point."""
        name = "const_" + f"{value:g}".replace(".", "_").replace("-", "neg") + "_q"
        if not hasattr(self.gm, name):
            self.gm.add_submodule(name, QuantConstant(value))
            self.modules[name] = self.gm.get_submodule(name)
        return self.graph.call_module(name, ())

    def call(self, target: Callable, *args: object) -> fx.Node:
        return self.graph.call_function(target, tuple(args))

    def quantize_input_for(self, consumer: fx.Node, producer: fx.Node, shared: bool = True) -> None:
        """Quantize `producer` only where `consumer` reads it (one quantizer per layer: sensitivity analysis)."""
        if producer in self.quant_of:
            return
        qnode = self.local_q.get(producer) if shared else None
        if qnode is None:
            base = producer.name if shared else f"{consumer.target}_in"
            qnode = self._call_after(producer, self._new_quantizer(base))
            if shared:
                self.local_q[producer] = qnode
        consumer.replace_input_with(producer, qnode)


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


class PooledFakeQuantize(FakeQuantize):
    """The output quantizer of an average pool for ONNX Runtime. QLinearGlobalAveragePool refuses an input /
    output scale ratio outside [2^-32, 256) ("parameter out of computation range!"), which a pooled range that
    collapsed to zero (scale 1) next to a tiny but live input range gives it. An average never leaves its
    input's range, so a scale above the input's is never needed: there the input's scale and zero point are
    used. The input quantizer is referenced, not owned, so the state_dict is that of a FakeQuantize."""

    def bind(self, source: FakeQuantize) -> PooledFakeQuantize:
        object.__setattr__(self, "_source", source)  # not a submodule: no state_dict entry
        return self

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = super().qparams(x)
        source = self.__dict__.get("_source")
        if source is None or not bool(source.enabled):
            return scale, zero_point
        source_scale, source_zero_point = source.qparams()
        wider = scale > source_scale
        return torch.where(wider, source_scale, scale), torch.where(wider, source_zero_point, zero_point)


def _pooled_quantizer(p: Placer, qname: str, source: str) -> None:
    old = p.gm.get_submodule(qname)
    new = PooledFakeQuantize(symmetric=old.symmetric, max_range=old.max_range).bind(p.gm.get_submodule(source))
    _set_module(p.gm, qname, new)


def place_onnxruntime(p: Placer, skip_layers: set[str]) -> None:
    if p.example_input is not None:  # tensor ranks and pool sizes for the rewrites below
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(p.gm).propagate(p.example_input)
    lower_for_onnxruntime(p)
    for node in list(p.graph.nodes):
        kind = p.kind(node)
        args = _tensor_args(node)
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
            in_q, out_q = p.ensure_quantized(args[0]), p.quantize_output(node)
            _pooled_quantizer(p, out_q, in_q)  # the output scale never above the input's
            pixels = _global_pool_pixels(node)
            if pixels:  # QLinearGlobalAveragePool runs only while in scale / (out scale x pixels) < 256
                p.gm.get_submodule(out_q).set_scale_floor(p.gm.get_submodule(in_q), 1.0 / (255.0 * pixels))
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
    qnodes = {producer: p.apply(producer, p._new_quantizer(producer.name)) for producer in wanted}
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
    args = [a for a in _tensor_args(node) if a.op != "get_attr"]  # a parameter (layer scale) is a constant
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
        node = _tensor_args(node)[0]
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
        node = _tensor_args(node)[0]
    if p.kind(node) == "relu":
        node = _tensor_args(node)[0]
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


def place_layer_inputs(p: Placer, skip_layers: set[str]) -> None:
    """Sensitivity analysis: one private input quantizer per quantized layer, so each layer can be
    switched on alone."""
    for node in list(p.graph.nodes):
        if p.kind(node) == "weighted":
            p.quantize_input_for(node, _tensor_args(node)[0], shared=False)


@dataclass(frozen=True)
class PlacementProfile:
    """Where a backend wants Q/DQ, and how export post-processes the graph for it."""

    name: str
    act_symmetric: bool  # True: int8 zero point 0 (TensorRT); False: uint8 asymmetric (ONNX Runtime)
    place: Callable[[Placer, set[str]], None]
    int32_bias: bool  # export: Conv/Gemm bias as int32 + DequantizeLinear (ORT's QLinearConv fusion)
    description: str = ""


PROFILES: Registry[PlacementProfile] = Registry("quantization target")
PROFILES.register(
    "onnxruntime",
    PlacementProfile(
        "onnxruntime", False, place_onnxruntime, True,
        "ONNX Runtime CPU: BN folded, uint8 asymmetric activations quantized once, int8 per-channel weights",
    ),
)  # fmt: skip
PROFILES.register(
    "tensorrt",
    PlacementProfile(
        "tensorrt", True, place_tensorrt, False,
        "TensorRT: int8 symmetric Q/DQ on Conv/Linear, pool, Mul inputs and residual Adds' skip inputs",
    ),
)  # fmt: skip


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
    import copy

    profile = PROFILES.get(spec.target)
    known = float_quantizable_layers(model)
    unknown = [s for s in spec.skip_layers if s not in known]
    if unknown:
        raise EdgecvError(
            f"skip_layers: {unknown[0]!r} is not a Conv/Linear layer of the model "
            f"(layers: {', '.join(known[:6])}{', ...' if len(known) > 6 else ''})"
        )
    was_training = model.training
    gm = trace(copy.deepcopy(model).eval())
    _sanitize(gm)
    _fold_and_swap(gm, set(spec.skip_layers), spec.freeze_bn)
    placer = Placer(gm, profile.act_symmetric, example_input)
    (place or profile.place)(placer, set(spec.skip_layers))
    gm.graph.lint()
    gm.recompile()
    gm.meta[META_KEY] = spec
    gm.meta[FLOAT_SHAPES_KEY] = model_shapes(model)  # what a checkpoint rebuilds before re-quantizing
    gm.meta[SURGERY_META_KEY] = surgery_of(model)  # ... after applying the surgeries again
    with torch.no_grad():
        gm(example_input)  # fail here, not in the training loop, when the graph is broken
    return gm.train(was_training)
