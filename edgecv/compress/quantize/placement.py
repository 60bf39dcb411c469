"""Trace a float model with torch.fx, fold BatchNorm, and place fake-quantizers as a target backend fuses them.

A placement profile decides where activations are fake-quantized and with which integer type:

- `onnxruntime`: every tensor quantized once (uint8, asymmetric), after the activation that follows a conv,
  after residual Adds, Muls, Concats and pools, MaxPool sharing its input's quantizer, the pooled features
  quantized again after Flatten, and the logits quantized. ORT then fuses DQ -> op -> Q into QLinearConv,
  QLinearAdd, QGemm ... (the graph ONNX Runtime's `quantize_static` gives with U8 activations).
- `tensorrt`: int8 symmetric Q/DQ on the input of every Conv/Linear and on both inputs of residual Adds only.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgecv.compress.quantize.fakequant import FakeQuantize, QuantConv2d, QuantLinear, fold_bn_into
from edgecv.compress.quantize.spec import QuantSpec
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
    """torch.fx tracer that keeps stochastic depth and edgecv's quant modules as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _leaf_types()) or super().is_leaf_module(m, module_qualified_name)


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
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}


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
    return "other"


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


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
            return "mul" if len(_tensor_args(node)) == 2 else "other"
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
        if t is F.dropout:
            return "transparent"
        return "other"
    if node.op == "call_method":
        if node.target in ("add", "add_"):
            return "add" if len(_tensor_args(node)) == 2 else "other"
        if node.target in ("mul", "mul_"):
            return "mul" if len(_tensor_args(node)) == 2 else "other"
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target in ("sigmoid",):
            return "act"
        if node.target == "mean":
            return "avgpool"
        if node.target in _SHAPE_METHODS:
            return "shape"
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

    def __init__(self, gm: fx.GraphModule, act_symmetric: bool) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.act_symmetric = act_symmetric
        self.modules = dict(gm.named_modules())
        self.quant_of: dict[fx.Node, str] = {}  # tensor -> the quantizer its value went through
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

    def quantize_input_for(self, consumer: fx.Node, producer: fx.Node, shared: bool = True) -> None:
        """Quantize `producer` only where `consumer` reads it (TensorRT-style placement)."""
        if producer in self.quant_of:
            return
        qnode = self.local_q.get(producer) if shared else None
        if qnode is None:
            base = producer.name if shared else f"{consumer.target}_in"
            qnode = self._call_after(producer, self._new_quantizer(base))
            if shared:
                self.local_q[producer] = qnode
        consumer.replace_input_with(producer, qnode)


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
    for node in list(p.graph.nodes):
        kind = p.kind(node)
        args = _tensor_args(node)
        if kind == "input":
            continue  # quantized when a quantized consumer reads it: a float (skipped) first layer reads float
        elif kind in ("weighted", "float_weighted"):
            if kind == "weighted":
                # A skipped layer reads float: with DQ -> Conv(float W) -> Q around it, ONNX Runtime >= 1.20
                # quantizes the conv by itself, and the layer would not stay float.
                p.ensure_quantized(args[0])
            if p.single_user_kind(node) not in ("relu", "relu6"):
                p.quantize_output(node)
        elif kind in ("relu", "relu6"):
            p.quantize_output(node, 6.0 if kind == "relu6" else None)
        elif kind == "act":
            p.ensure_quantized(args[0])
            p.quantize_output(node)
        elif kind in ("add", "mul", "cat"):
            inputs = args if kind != "cat" else [a for a in node.args[0] if isinstance(a, fx.Node)]
            for a in inputs:
                p.ensure_quantized(a)
            if p.single_user_kind(node) not in ("relu", "relu6"):
                p.quantize_output(node)
        elif kind == "maxpool":
            p.apply(node, p.ensure_quantized(args[0]))  # input and output share one scale / zero point
        elif kind == "avgpool":
            source = p.ensure_quantized(args[0])
            _pooled_quantizer(p, p.quantize_output(node), source)
        elif kind == "shape" and args and args[0] in p.quant_of:
            p.apply(node, p.quant_of[args[0]])
        elif kind == "transparent" and args and args[0] in p.quant_of:
            p.quant_of[node] = p.quant_of[args[0]]


def place_tensorrt(p: Placer, skip_layers: set[str]) -> None:
    for node in list(p.graph.nodes):
        kind = p.kind(node)
        args = _tensor_args(node)
        if kind == "weighted":
            p.quantize_input_for(node, args[0])
        elif kind == "add" and len(args) == 2:
            for a in args:
                p.quantize_input_for(node, a)


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
        "TensorRT: int8 symmetric Q/DQ on Conv/Linear inputs and residual Add inputs, per-channel weights",
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
    placer = Placer(gm, profile.act_symmetric)
    (place or profile.place)(placer, set(spec.skip_layers))
    gm.graph.lint()
    gm.recompile()
    gm.meta[META_KEY] = spec
    gm.meta[FLOAT_SHAPES_KEY] = model_shapes(model)  # what a checkpoint rebuilds before re-quantizing
    with torch.no_grad():
        gm(example_input)  # fail here, not in the training loop, when the graph is broken
    return gm.train(was_training)
