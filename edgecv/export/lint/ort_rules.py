"""The onnxruntime lint: the graph ONNX Runtime actually runs (optimized at ORT_ENABLE_EXTENDED), op by op,
integer or float with the reason, and the float islands between integer ops."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto

from edgecv.errors import EdgecvError
from edgecv.export.lint.qdq_graph import QdqGraph, lint_report

INTEGER_TYPES = {
    TensorProto.UINT8,
    TensorProto.INT8,
    TensorProto.INT32,
    TensorProto.UINT16,
    TensorProto.INT16,
}


def ort_optimized_graph(path: Path) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EdgecvError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        return onnx.load(str(out))


def _element_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every tensor, propagated op by op (ORT's contrib ops lack shape inference)."""
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    types.update({i.name: i.data_type for i in graph.initializer})
    types.update({v.name: v.type.tensor_type.elem_type for v in graph.value_info})
    passthrough = MOVE_OPS | {"Relu", "Clip"}
    for node in graph.node:
        op = node.op_type
        if op in ("QuantizeLinear", "DynamicQuantizeLinear"):
            out = types.get(node.input[2], TensorProto.UINT8) if len(node.input) > 2 else TensorProto.UINT8
        elif op == "DequantizeLinear":
            out = TensorProto.FLOAT
        elif op.startswith("QLinear") or op in ("QGemm", "QAttention"):
            # the output zero point (or, without one, the input's) sets the integer type
            zp = [i for i in node.input[2::3] if i]
            out = types.get(zp[-1] if zp else node.input[0], TensorProto.UINT8)
            if op == "QGemm" and len(node.input) < 9:  # QGemm without output scale returns float
                out = TensorProto.FLOAT
        elif op in ("ConvInteger", "MatMulInteger"):
            out = TensorProto.INT32
        elif op in passthrough and node.input:
            out = types.get(node.input[0], TensorProto.FLOAT)
        else:
            out = TensorProto.FLOAT
        for o in node.output:
            types.setdefault(o, out)
    return types


def _is_integer_op(op: str) -> bool:
    return op.startswith("QLinear") or op in ("QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat")


# ops that only move or select values: ONNX Runtime runs them on uint8 tensors as they are
MOVE_OPS = {
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Split", "Slice", "Gather", "Pad",
    "Resize", "MaxPool", "GlobalMaxPool", "Concat", "Tile", "Expand", "DepthToSpace", "SpaceToDepth",
}  # fmt: skip
# what ONNX Runtime's own quantizer can give an integer kernel (onnxruntime.quantization.registry), when
# onnxruntime's Python tools cannot be imported; Relu and Clip fuse into the integer op before them
_INTEGER_KERNEL_OPS = {
    "Conv", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "LeakyRelu", "Sigmoid", "MaxPool",
    "GlobalAveragePool", "AveragePool", "Concat", "Softmax", "Where", "ArgMax", "Split", "Pad", "Resize",
}  # fmt: skip


def ort_integer_kernel_ops() -> set[str]:
    """ONNX ops ONNX Runtime can run in integer (QLinear* kernels, or fused into the integer op before them)."""
    try:
        from onnxruntime.quantization.registry import QLinearOpsRegistry
    except ImportError:
        return set(_INTEGER_KERNEL_OPS)
    return set(QLinearOpsRegistry) | {"MaxPool", "GlobalMaxPool"}


_FLOAT_FUSIONS = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul"}  # ORT's float fusions


def _float_reason(node: onnx.NodeProto, g: QdqGraph, kernels: set[str]) -> str:
    op = node.op_type
    base = _FLOAT_FUSIONS.get(op, op)
    if base not in kernels and base not in MOVE_OPS:
        return f"runs in float: ONNX Runtime has no integer kernel for {op}"
    quantized = [g.dq(i) is not None for i in g.activations(node)]
    if not any(quantized):
        return "runs in float: its input is not quantized"
    if not all(quantized):
        return "runs in float: an input is not quantized"
    return "runs in float: its output is not quantized"


def _count_islands(float_nodes: list[onnx.NodeProto]) -> int:
    """Connected groups of float ops (one reads another's output): each is entered through DequantizeLinear
    and left through QuantizeLinear, a pass over the tensor each way."""
    parent = list(range(len(float_nodes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    made_by = {o: k for k, n in enumerate(float_nodes) for o in n.output}
    for k, n in enumerate(float_nodes):
        for i in n.input:
            if i in made_by:
                parent[root(k)] = root(made_by[i])
    return len({root(k) for k in range(len(float_nodes))})


def inspect_onnxruntime(path: Path, proto: onnx.ModelProto) -> dict:
    """Every op on the data path of the graph ORT runs: integer, or float with the reason (no integer kernel
    in ORT, or an input or output not quantized); and the float islands they form between integer ops."""
    graph = ort_optimized_graph(path).graph
    g, types, kernels = QdqGraph(graph), _element_types(graph), ort_integer_kernel_ops()
    float_ops, float_nodes, int_counts, float_counts, qdq_counts = [], [], Counter(), Counter(), Counter()
    for node in graph.node:
        op = node.op_type
        if op in ("QuantizeLinear", "DequantizeLinear"):
            qdq_counts[op] += 1  # each is a switch between integer and float, not an operator
            continue
        inputs = g.activations(node)
        if not inputs or op in ("Shape", "Size"):
            continue  # shape arithmetic and constants
        data_type = types.get(inputs[0], TensorProto.FLOAT)
        moved = data_type in INTEGER_TYPES and op not in ("Conv", "Gemm", "MatMul", "FusedConv")
        if _is_integer_op(op) or moved:
            int_counts[op] += 1  # QLinear* kernels, and MaxPool / Reshape ... on uint8
            continue
        float_counts[op] += 1
        float_nodes.append(node)
        float_ops.append({"name": node.name, "op_type": op, "reason": _float_reason(node, g, kernels)})
    violations = []
    if not int_counts and not qdq_counts:
        violations.append("no integer ops: the model has no Q/DQ (export a fake-quant model)")
    islands = _count_islands(float_nodes) if int_counts else 0
    return lint_report("onnxruntime", float_ops, int_counts, float_counts, violations, qdq_counts,
                   float_islands=islands)
