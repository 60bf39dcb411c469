"""Make an exported fake-quant graph the integer Q/DQ graph a backend expects.

Constant subgraphs (range -> scale / zero point) are folded, each weight is stored as an int8 initializer
feeding its DequantizeLinear (~4x smaller file), and for the onnxruntime target each Conv/Gemm bias becomes
int32 + DequantizeLinear with scale = input scale * weight scale, as onnxruntime.quantization.quantize_static
writes it, so ORT fuses DQ -> Conv -> Q into QLinearConv; a dequantized tensor times a positive constant
becomes one DequantizeLinear with the scale multiplied (so the op reading it still fuses), and Shape reads
the integer tensor rather than dequantizing it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecv.compress.quantize.fakequant import INT32_MAX


def fold_constants(graph: onnx.GraphProto) -> None:
    """Evaluate every node whose inputs are all constants (Constant, scale/zero-point arithmetic, and
    QuantizeLinear of a weight, which yields the int8 weight), except DequantizeLinear."""
    from onnx.reference import ReferenceEvaluator

    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    kept = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        foldable = node.op_type != "DequantizeLinear" and all(i in consts for i in inputs)
        if not foldable:
            kept.append(node)
            continue
        if node.op_type == "Constant":
            outputs = (
                [numpy_helper.to_array(node.attribute[0].t)] if node.attribute[0].name == "value" else None
            )
            if outputs is None:
                outputs = ReferenceEvaluator(node).run(None, {})
        else:
            outputs = ReferenceEvaluator(node).run(None, {i: consts[i] for i in inputs})
        for name, value in zip(node.output, outputs, strict=True):
            consts[name] = np.asarray(value)
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    del graph.node[:]
    graph.node.extend(kept)


def _quantize_biases(graph: onnx.GraphProto) -> None:
    """Conv/Gemm float bias -> int32 initializer + DequantizeLinear(scale = s_input * s_weight, zp 0)."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    new_nodes = []
    for node in graph.node:
        dq_x, dq_w = (producer.get(n) for n in node.input[:2]) if node.op_type in ("Conv", "Gemm") else (None, None)
        if (
            len(node.input) == 3
            and node.input[2] in inits
            and dq_x is not None
            and dq_w is not None
            and dq_x.op_type == dq_w.op_type == "DequantizeLinear"
            and dq_x.input[1] in inits
            and dq_w.input[1] in inits
            and dq_w.input[0] in inits
        ):
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            s_x = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float64).reshape(())
            s_w = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64)
            before, after = write_bias(graph, node, bias, np.broadcast_to(s_x * s_w, bias.shape), node.input[2])
            new_nodes += [*before, node, *after]
            continue
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)


def write_bias(
    graph: onnx.GraphProto, node: onnx.NodeProto, bias: np.ndarray, scale: np.ndarray, name: str
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """Give Conv/Gemm `node` the float `bias` as int32 + DequantizeLinear at `scale` (input scale x weight
    scale, per channel; zero point 0), as ONNX Runtime's QLinearConv / QGemm fusion wants it. Where a value
    does not fit int32 (tiny input or weight scales) the bias stays float, as an Add after the node: ORT fuses
    DQ -> Conv -> Q even with a float bias and then drops the bias; the Add keeps the layer (correctly) in
    float. The fake-quant model makes the same choice (QuantConv2d.quantized_bias). Initializers are named
    after `name`; returns the nodes to insert before and after `node`."""
    scale = np.asarray(scale, np.float32)
    q = np.round(bias / scale.astype(np.float64))
    if np.any(np.abs(q) > INT32_MAX):
        shape = (-1, 1, 1) if node.op_type == "Conv" else (-1,)
        graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32).reshape(shape), f"{name}_float"))
        output = node.output[0]
        del node.input[2:]
        node.output[0] = f"{output}_without_bias"
        return [], [helper.make_node("Add", [node.output[0], f"{name}_float"], [output], name=f"{node.name}_bias_Add")]
    q = q.astype(np.int32)
    graph.initializer.extend([
        numpy_helper.from_array(q, f"{name}_quantized"),
        numpy_helper.from_array(scale, f"{name}_quantized_scale"),
        numpy_helper.from_array(np.zeros_like(q), f"{name}_quantized_zero_point"),
    ])  # fmt: skip
    dq = helper.make_node(
        "DequantizeLinear",
        [f"{name}_quantized", f"{name}_quantized_scale", f"{name}_quantized_zero_point"],
        [f"{name}_dequantized"],
        name=f"{node.name}_bias_DequantizeLinear",
        axis=0,
    )
    if len(node.input) > 2:
        node.input[2] = dq.output[0]
    else:
        node.input.append(dq.output[0])
    return [dq], []


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name in used or i.name == "input"]
    del graph.input[:]
    graph.input.extend(inputs)


def _transpose_quantized_weights(graph: onnx.GraphProto) -> None:
    """int8 weight -> DequantizeLinear -> Transpose (a Linear on a >2-D input exports MatMul(x, W^T)) becomes
    the transposed int8 weight -> DequantizeLinear, so the weight reaches MatMul straight from its DQ."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    kept = []
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or dq.input[0] not in inits
            or users[dq.output[0]] != 1
        ):
            kept.append(node)
            continue
        weight = numpy_helper.to_array(inits[dq.input[0]])
        perm = next(
            (list(a.ints) for a in node.attribute if a.name == "perm"), list(range(weight.ndim))[::-1]
        )
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % weight.ndim
        name = f"{dq.input[0]}_transposed"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name))
        dq.input[0] = name
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", perm.index(axis)))
        dq.output[0] = node.output[0]
    del graph.node[:]
    graph.node.extend(kept)


def _fold_scales_into_dequantize(graph: onnx.GraphProto) -> None:
    """DequantizeLinear(q, s, zp) -> Mul by a positive scalar constant c (or Div by one) becomes
    DequantizeLinear(q, s * c, zp): the same values, and the op that reads them reads a DQ, so ONNX Runtime
    fuses it (hard-sigmoid's 1/6 before QLinearMul)."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    kept, folded = [], False
    for node in graph.node:
        factor = _scalar_factor(node, inits)
        dq = producer.get(node.input[0]) if factor is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            kept.append(node)
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.ndim != 0:
            kept.append(node)
            continue
        name = f"{dq.input[1]}_times_{len(graph.initializer)}"
        graph.initializer.append(numpy_helper.from_array((scale * np.float32(factor)).astype(scale.dtype), name))
        inputs = [dq.input[0], name, *dq.input[2:]]
        kept.append(helper.make_node("DequantizeLinear", inputs, [node.output[0]], name=f"{node.name}_scale"))
        folded = True
    if folded:
        read = {i for n in kept for i in n.input} | {o.name for o in graph.output}
        kept = [n for n in kept if n.op_type != "DequantizeLinear" or any(o in read for o in n.output)]
        del graph.node[:]
        graph.node.extend(kept)


def _shapes_from_integer_tensors(graph: onnx.GraphProto) -> None:
    """Shape(DequantizeLinear(q)) reads Shape(q): the same shape, without dequantizing the whole tensor only
    to read its shape (`x.size()` in a channel shuffle)."""
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Shape" else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            node.input[0] = dq.input[0]
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in graph.node if n.op_type != "DequantizeLinear" or any(o in read for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)


def _scalar_factor(node: onnx.NodeProto, inits: dict) -> float | None:
    """c when `node` is Mul(x, c), Mul(c, x) or Div(x, 1/c) with a positive scalar initializer; else None."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    const = [i for i in node.input if i in inits]
    if len(const) != 1 or (node.op_type == "Div" and node.input[1] != const[0]):
        return None
    value = numpy_helper.to_array(inits[const[0]])
    if value.size != 1 or not np.issubdtype(value.dtype, np.floating) or float(value.reshape(())) <= 0:
        return None
    if node.input[0] == const[0]:
        node.input[0], node.input[1] = node.input[1], node.input[0]  # Mul(c, x): the tensor first
    c = float(value.reshape(()))
    return c if node.op_type == "Mul" else 1.0 / c


def finalize_qdq(proto: onnx.ModelProto, int32_bias: bool) -> onnx.ModelProto:
    """Make an exported fake-quant graph an integer Q/DQ graph (see the module docstring)."""
    graph = proto.graph
    fold_constants(graph)
    if int32_bias:  # ONNX Runtime's integer graph (the TensorRT target's graph is left as its placement made it)
        _fold_scales_into_dequantize(graph)
        _shapes_from_integer_tensors(graph)
    _transpose_quantized_weights(graph)
    if int32_bias:
        _quantize_biases(graph)
    drop_unused_initializers(graph)
    return proto
