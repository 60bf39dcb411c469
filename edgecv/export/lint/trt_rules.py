"""The tensorrt lint: whether the Q/DQ placement follows TensorRT's rules for explicit quantization, checked
on the exported graph (TensorRT is not needed).

TensorRT's explicit quantization (the rules NVIDIA's ModelOpt ONNX quantizer follows): the inputs of weighted
layers are quantized (activation and weight, int8 symmetric, weights per output channel); the output of a
weighted layer that feeds a residual Add stays float and the Add's other (skip) input is quantized, so that
TensorRT fuses Conv + Add (+ ReLU) into one INT8 kernel; pooling and element-wise ops run in INT8 when their
inputs are quantized. Weights may be stored as int8 + DequantizeLinear or float + QuantizeLinear ->
DequantizeLinear.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgecv.export.lint.qdq_graph import COMPUTE_OPS, QDQ_OPS, WEIGHTED_OPS, QdqGraph, is_silu, lint_report


def inspect_tensorrt(path: Path, proto: onnx.ModelProto) -> dict:
    """Every compute op of the exported graph: INT8 or float with the reason, and each Q/DQ placement rule
    the graph breaks (`path` is not read: the rules need only the graph)."""
    g = QdqGraph(proto.graph)
    float_ops, int_counts, float_counts, qdq_counts, violations = [], Counter(), Counter(), Counter(), []
    for node in proto.graph.node:
        op = node.op_type
        if op in QDQ_OPS:
            qdq_counts[op] += 1
            violations += _check_qdq(node, g)
            continue
        if op in WEIGHTED_OPS:
            reason, problems = _weighted_op_state(node, g)
        elif op in COMPUTE_OPS and g.activations(node):  # not shape arithmetic
            reason, problems = _elementwise_op_state(node, g)
        else:
            continue
        violations += problems
        if reason is None:
            int_counts[op] += 1
        else:
            float_counts[op] += 1
            float_ops.append({"name": node.name, "op_type": op, "reason": reason})
    if not qdq_counts:
        violations.append("no Q/DQ: the model is not quantized (export a fake-quant model)")
    return lint_report("tensorrt", float_ops, int_counts, float_counts, violations, qdq_counts)


def _check_qdq(node: onnx.NodeProto, g: QdqGraph) -> list[str]:
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if not zp_name:  # no zero point: uint8 by the ONNX default
        return [f"{node.name}: {node.op_type} has no zero point, so it is UINT8, not INT8"]
    zp = g.inits.get(zp_name)
    if zp is None:
        return [f"{node.name}: {node.op_type} zero point is not a constant initializer"]
    if zp.data_type != TensorProto.INT8:
        return [f"{node.name}: {node.op_type} is {TensorProto.DataType.Name(zp.data_type)}, not INT8"]
    if np.any(numpy_helper.to_array(zp) != 0):
        return [f"{node.name}: {node.op_type} zero point is not 0"]
    return []


def _weighted_op_state(node: onnx.NodeProto, g: QdqGraph) -> tuple[str | None, list[str]]:
    """(why it runs in float, or None when INT8; rule violations) for a Conv/Gemm/MatMul."""
    x_quantized = g.quantized(node.input[0])
    if len(node.input) > 1 and node.input[1] in g.data:  # activation x activation (attention): no weight
        if x_quantized and g.quantized(node.input[1]):
            return None, []
        return "an input is not quantized", []
    dq_w = g.dq(node.input[1]) if len(node.input) > 1 else None
    if not x_quantized and dq_w is None:
        return "no Q/DQ on input or weight", []
    if not x_quantized or dq_w is None:
        which = "input" if not x_quantized else "weight"
        return f"{which} not quantized", [
            f"{node.name}: {node.op_type} {which} does not come from DequantizeLinear"
        ]
    return None, _check_weight(node, dq_w, g)


def _elementwise_op_state(node: onnx.NodeProto, g: QdqGraph) -> tuple[str | None, list[str]]:
    """(why it runs in float, or None when INT8; rule violations) for Add / Mul / Concat / pooling ...
    An op runs in INT8 when every activation input is quantized, or (Add, Mul) when the inputs that are not
    quantized are the float outputs of INT8 convs that TensorRT fuses it with (residual Add, SiLU's Mul)."""
    inputs = g.activations(node)
    quantized = [g.quantized(i) for i in inputs]
    fused = [g.fused_weighted(i) for i in inputs]
    problems = []
    if node.op_type == "Add" and len(inputs) == 2:
        problems = _residual_add_problems(node, inputs, quantized, fused, g)
    if inputs and all(quantized):
        return None, problems
    if node.op_type == "Add" and all(q or f is not None for q, f in zip(quantized, fused, strict=True)):
        return None, problems  # Conv + Add fused, the skip input INT8
    if node.op_type == "Mul" and is_silu(node, g) and any(f is not None for f in fused):
        return None, problems  # Conv + SiLU fused
    return ("its input is not quantized" if not any(quantized) else "an input is not quantized"), problems


def _residual_add_problems(add, inputs, quantized, fused, g: QdqGraph) -> list[str]:
    """A residual Add must read one input as the float output of the INT8 conv it fuses with, and the other
    (the skip) quantized."""
    if any(quantized) and not all(quantized):
        return []
    if not any(quantized):
        if any(f is not None for f in fused):
            return [
                f"{add.name}: residual Add's skip input is not quantized; TensorRT fuses Conv + Add in INT8 "
                "only with a quantized skip input"
            ]
        return []
    # both quantized: a Q/DQ pair between a conv and this Add keeps TensorRT from fusing them
    for name in inputs:
        conv = g.fused_weighted(g.source(name))
        dq = g.dq(name)
        if (
            conv is not None
            and len(g.consumers.get(g.source(name), [])) == 1
            and len(g.consumers[dq.output[0]]) == 1
        ):
            return [
                f"{add.name}: Q/DQ between {conv.name} and the residual Add; leave the conv's output float so "
                "TensorRT fuses Conv + Add"
            ]
    return []


def _check_weight(node: onnx.NodeProto, dq_w: onnx.NodeProto, g: QdqGraph) -> list[str]:
    weight, form = g.weight(dq_w)
    if weight is None:
        return [
            f"{node.name}: weight is not a constant (int8 initializer + DQ, or float initializer + Q -> DQ)"
        ]
    out = []
    if form == "int8" and weight.dtype != np.int8:
        out.append(f"{node.name}: weight is {weight.dtype}, not int8")
    elif form == "int8" and (weight.min() < -127 or weight.max() > 127):
        out.append(f"{node.name}: int8 weight outside [-127, 127]")
    scale = _const(g.inits, dq_w.input[1])
    axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
    channels = weight.shape[0]
    transposed = node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute)
    if node.op_type not in ("MatMul", "ConvTranspose") and not transposed:
        if scale is None or scale.ndim != 1 or scale.shape[0] != channels or axis != 0:
            out.append(f"{node.name}: weight scale is not per-channel on axis 0")
    return out


def _const(inits: dict, name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None
