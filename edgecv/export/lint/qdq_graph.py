"""An ONNX graph's tensors with their producers and consumers, Q/DQ pairs seen through: what both targets'
lints and the placement pattern read. Also the op families they share and the fields of a lint report."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

# ops whose float execution matters for speed
COMPUTE_OPS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Sub", "Concat",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "FusedConv", "FusedGemm", "FusedMatMul",
}  # fmt: skip

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
COPY_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")


class QdqGraph:
    """Producers and consumers of an ONNX graph's tensors, with Q/DQ pairs seen through."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        # tensors computed from the model's input (not shapes or constants): the data path
        self.data = {i.name for i in graph.input if i.name not in self.inits}
        for n in graph.node:
            if n.op_type not in ("Shape", "Size") and any(i in self.data for i in n.input):
                self.data.update(n.output)

    def is_const(self, name: str) -> bool:
        """An initializer, a Constant, or Q/DQ of one (a weight)."""
        if name in self.inits:
            return True
        node = self.producer.get(name)
        if node is None:
            return False
        if node.op_type == "Constant":
            return True
        return node.op_type in QDQ_OPS and self.is_const(node.input[0])

    def dq(self, name: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def quantized(self, name: str) -> bool:
        """Is this activation read through DequantizeLinear (INT8 in TensorRT)?"""
        return self.dq(name) is not None and not self.is_const(name)

    def source(self, name: str) -> str:
        """The float tensor behind a Q -> DQ pair (the tensor itself when it is not quantized)."""
        dq = self.dq(name)
        if dq is None:
            return name
        q = self.producer.get(dq.input[0])
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]

    def activations(self, node: onnx.NodeProto) -> list[str]:
        """The inputs on the data path (not weights, constants or computed shapes)."""
        return [i for i in node.input if i in self.data]

    def output_quantized(self, name: str) -> bool:
        """Does the tensor (through copy ops such as Flatten) feed a QuantizeLinear?"""
        for c in self.consumers.get(name, []):
            if c.op_type == "QuantizeLinear" or (
                c.op_type in COPY_OPS and self.output_quantized(c.output[0])
            ):
                return True
        return False

    def weight(self, dq: onnx.NodeProto) -> tuple[np.ndarray | None, str]:
        """(weight array, form) behind a weight's DequantizeLinear: "int8" (int8 initializer + DQ) or
        "float" (float initializer + Q -> DQ); (None, "") when it is not a constant."""
        if dq.input[0] in self.inits:
            return numpy_helper.to_array(self.inits[dq.input[0]]), "int8"
        q = self.producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in self.inits:
            return numpy_helper.to_array(self.inits[q.input[0]]), "float"
        return None, ""

    def fused_weighted(self, name: str) -> onnx.NodeProto | None:
        """The quantized Conv/Gemm whose float output this is (through BatchNormalization / Relu), which TensorRT
        fuses with the element-wise op that reads it."""
        node = self.producer.get(name)
        while node is not None and node.op_type in ("BatchNormalization", "Relu"):
            node = self.producer.get(node.input[0])
        if node is None or node.op_type not in WEIGHTED_OPS:
            return None
        return node if self.quantized(node.input[0]) and self.dq(node.input[1]) is not None else None


def unfolded_batchnorms(g: QdqGraph) -> list[str]:
    """One finding per BatchNormalization that reads a Conv's output (through Q/DQ): it should have been
    folded into the conv's weights and bias, and runs in float instead."""
    found = []
    for node in g.graph.node:
        conv = g.producer.get(g.source(node.input[0])) if node.op_type == "BatchNormalization" else None
        if conv is not None and conv.op_type == "Conv":
            found.append(f"BatchNormalization {node.name or node.output[0]} after Conv {conv.name or conv.output[0]} "
                         "is not folded into the conv: it runs in float")
    return found


def is_silu(mul: onnx.NodeProto, g: QdqGraph) -> bool:
    """Mul(x, Sigmoid(x)): TensorRT fuses it into the conv that produces x."""
    sources = [g.source(i) for i in mul.input]
    for i in mul.input:
        node = g.producer.get(i)
        if node is not None and node.op_type == "Sigmoid" and g.source(node.input[0]) in sources:
            return True
    return False


def lint_report(target: str, float_ops: list[dict], int_counts: Counter, float_counts: Counter,
                violations: list[str], qdq_counts: Counter, **extra: object) -> dict:
    """The report every target's lint returns (see edgecv.export.lint.inspect_onnx), counts sorted by op."""
    return {
        "target": target,
        "float_ops": float_ops,
        "int_op_counts": dict(sorted(int_counts.items())),
        "float_op_counts": dict(sorted(float_counts.items())),
        "qdq_counts": dict(sorted(qdq_counts.items())),
        "violations": violations,
        **extra,
    }
