"""The editing API the placement rules use: a Placer inserts FakeQuantize calls into a traced graph and
remembers which tensors are quantized; a PlacementProfile is one target's rule set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from edgecv.compress.quantize.fakequant import FakeQuantize, QuantConstant
from edgecv.compress.quantize.graph import node_kind, tensor_args


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

    def new_quantizer(self, base: str, max_range: float | None = None) -> str:
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
        qname = self.new_quantizer(node.name, max_range)
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
            qnode = self._call_after(producer, self.new_quantizer(base))
            if shared:
                self.local_q[producer] = qnode
        consumer.replace_input_with(producer, qnode)


def place_layer_inputs(p: Placer, skip_layers: set[str]) -> None:
    """Sensitivity analysis: one private input quantizer per quantized layer, so each layer can be
    switched on alone."""
    for node in list(p.graph.nodes):
        if p.kind(node) == "weighted":
            p.quantize_input_for(node, tensor_args(node)[0], shared=False)


@dataclass(frozen=True)
class PlacementProfile:
    """Where a backend wants Q/DQ, and how export post-processes the graph for it."""

    name: str
    act_symmetric: bool  # True: int8 zero point 0 (TensorRT); False: uint8 asymmetric (ONNX Runtime)
    place: Callable[[Placer, set[str]], None]
    int32_bias: bool  # export: Conv/Gemm bias as int32 + DequantizeLinear (ORT's QLinearConv fusion)
    description: str = ""
