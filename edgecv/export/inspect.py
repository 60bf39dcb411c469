"""Inspect an ONNX model for a backend: which compute ops run in integer and which in float, and (TensorRT)
whether the Q/DQ placement follows NVIDIA's rules for explicit quantization.

onnxruntime: the graph ONNX Runtime actually runs (its optimized form at ORT_ENABLE_EXTENDED) is read back,
so a float Conv that QDQ fusion could not turn into QLinearConv shows up by name. tensorrt: TensorRT is not
needed; the rules are checked on the exported graph.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgecv.errors import EdgecvError
from edgecv.registry import Registry

# ops whose float execution matters for speed
COMPUTE_OPS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Sub", "Concat",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "FusedConv", "FusedGemm", "FusedMatMul",
}  # fmt: skip
INTEGER_TYPES = {
    TensorProto.UINT8,
    TensorProto.INT8,
    TensorProto.INT32,
    TensorProto.UINT16,
    TensorProto.INT16,
}


def _load(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise EdgecvError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path))
    except Exception:
        raise EdgecvError(f"{path}: not an ONNX model") from None
    if not proto.graph.node:
        raise EdgecvError(f"{path}: not an ONNX model (no graph nodes)")
    return proto


def inspect_onnx(path: Path, target: str) -> dict:
    """Integer vs float ops of `path` as `target` runs it, and placement rule violations.
    Returns {"target", "float_ops": [{"name", "op_type", "reason"}], "int_op_counts", "float_op_counts",
    "violations": [str]}."""
    inspector = INSPECTORS.get(target)
    return inspector(Path(path), _load(Path(path)))


# ---- onnxruntime ------------------------------------------------------------------------------------


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
    passthrough = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                   "Concat", "Slice", "Split", "Resize", "GlobalMaxPool", "Relu", "Clip"}  # fmt: skip
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


def _inspect_onnxruntime(path: Path, proto: onnx.ModelProto) -> dict:
    graph = ort_optimized_graph(path).graph
    types = _element_types(graph)
    float_ops, int_counts, float_counts = [], Counter(), Counter()
    for node in graph.node:
        op = node.op_type
        data_type = types.get(node.input[0], TensorProto.FLOAT) if node.input else TensorProto.FLOAT
        if _is_integer_op(op) or op in ("QuantizeLinear", "DequantizeLinear"):
            int_counts[op] += 1
        elif op in COMPUTE_OPS:
            if data_type in INTEGER_TYPES and op not in ("Conv", "Gemm", "MatMul", "FusedConv"):
                int_counts[op] += 1  # e.g. MaxPool on uint8
            else:
                float_counts[op] += 1
                reason = "runs in float: " + (
                    "its input is not quantized" if data_type not in INTEGER_TYPES else "no integer kernel"
                )
                float_ops.append({"name": node.name, "op_type": op, "reason": reason})
    violations = []
    if not int_counts:
        violations.append("no integer ops: the model has no Q/DQ (export a fake-quant model)")
    return _report("onnxruntime", float_ops, int_counts, float_counts, violations)


# ---- tensorrt -------------------------------------------------------------------------------------


def _const(inits: dict, name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _inspect_tensorrt(path: Path, proto: onnx.ModelProto) -> dict:
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    float_ops, int_counts, float_counts, violations = [], Counter(), Counter(), []

    def from_dq(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    for node in graph.node:
        op = node.op_type
        if op in ("QuantizeLinear", "DequantizeLinear"):
            int_counts[op] += 1
            zp = _const(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
            zp_type = inits[node.input[2]].data_type if zp is not None else TensorProto.UINT8
            if zp_type != TensorProto.INT8:
                violations.append(f"{node.name}: {op} is {TensorProto.DataType.Name(zp_type)}, not INT8")
            elif zp is not None and np.any(zp != 0):
                violations.append(f"{node.name}: {op} zero point is not 0")
        elif op in ("Conv", "Gemm", "MatMul"):
            dq_x, dq_w = from_dq(node.input[0]), from_dq(node.input[1])
            if dq_x is None and dq_w is None:
                float_counts[op] += 1
                float_ops.append({"name": node.name, "op_type": op, "reason": "no Q/DQ on input or weight"})
                continue
            if dq_x is None or dq_w is None:
                which = "input" if dq_x is None else "weight"
                violations.append(f"{node.name}: {op} {which} does not come from DequantizeLinear")
                float_counts[op] += 1
                float_ops.append({"name": node.name, "op_type": op, "reason": f"{which} not quantized"})
                continue
            int_counts[op] += 1
            violations += _check_weight(node, dq_w, inits)
        elif op == "Add" and all(i not in inits for i in node.input):
            quantized = [from_dq(i) is not None for i in node.input]
            if all(quantized):
                int_counts[op] += 1
            else:
                float_counts[op] += 1
                float_ops.append({"name": node.name, "op_type": op, "reason": "residual input not quantized"})
                if any(quantized) or _feeds_from_quantized_conv(node, producer, from_dq):
                    violations.append(f"{node.name}: residual Add inputs are not both quantized")
        elif op in COMPUTE_OPS:
            float_counts[op] += 1
    if not int_counts:
        violations.append("no Q/DQ: the model is not quantized (export a fake-quant model)")
    return _report("tensorrt", float_ops, int_counts, float_counts, violations)


def _feeds_from_quantized_conv(add: onnx.NodeProto, producer: dict, from_dq) -> bool:
    """Does an Add input come straight from a quantized Conv (a residual that TensorRT should fuse)?"""
    for name in add.input:
        node = producer.get(name)
        if node is not None and node.op_type == "Conv" and from_dq(node.input[0]) is not None:
            return True
    return False


def _check_weight(node: onnx.NodeProto, dq_w: onnx.NodeProto, inits: dict) -> list[str]:
    out = []
    weight = _const(inits, dq_w.input[0])
    if weight is None:
        return [f"{node.name}: weight is not a constant int8 initializer"]
    if weight.dtype != np.int8:
        out.append(f"{node.name}: weight is {weight.dtype}, not int8")
    elif weight.min() < -127 or weight.max() > 127:
        out.append(f"{node.name}: int8 weight outside [-127, 127]")
    scale = _const(inits, dq_w.input[1])
    axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
    channels = weight.shape[0]
    transposed = node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute)
    if node.op_type != "MatMul" and not transposed:
        if scale is None or scale.ndim != 1 or scale.shape[0] != channels or axis != 0:
            out.append(f"{node.name}: weight scale is not per-channel on axis 0")
    return out


# One lint per quantization target (the same names as the placement profiles): (path, proto) -> report.
INSPECTORS: Registry = Registry("inspect target")
INSPECTORS.register("onnxruntime", _inspect_onnxruntime)
INSPECTORS.register("tensorrt", _inspect_tensorrt)


def _report(target, float_ops, int_counts, float_counts, violations) -> dict:
    return {
        "target": target,
        "float_ops": float_ops,
        "int_op_counts": dict(sorted(int_counts.items())),
        "float_op_counts": dict(sorted(float_counts.items())),
        "violations": violations,
    }


def format_inspect(report: dict):
    """A rich Table of a report from inspect_onnx (op counts, float ops, violations)."""
    from rich.table import Table

    table = Table(title=f"INT8 placement for {report['target']}")
    table.add_column("op type")
    table.add_column("integer", justify="right")
    table.add_column("float", justify="right")
    for op in sorted(set(report["int_op_counts"]) | set(report["float_op_counts"])):
        table.add_row(op, str(report["int_op_counts"].get(op, 0)), str(report["float_op_counts"].get(op, 0)))
    for f in report["float_ops"][:20]:
        table.add_row(f"[yellow]float[/] {f['op_type']} {f['name']}", "", f["reason"])
    if len(report["float_ops"]) > 20:
        table.add_row(f"... {len(report['float_ops']) - 20} more float ops", "", "")
    for v in report["violations"]:
        table.add_row(f"[red]violation[/] {v}", "", "")
    return table
