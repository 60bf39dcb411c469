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
    "qdq_counts", "violations": [str]} (onnxruntime also "float_islands": the connected groups of float ops
    between integer ones). Op counts count operators; Q/DQ nodes are counted apart."""
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


def _inspect_onnxruntime(path: Path, proto: onnx.ModelProto) -> dict:
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
    return _report("onnxruntime", float_ops, int_counts, float_counts, violations, qdq_counts,
                   float_islands=islands)


# ---- tensorrt -------------------------------------------------------------------------------------
#
# TensorRT's explicit quantization (the rules NVIDIA's ModelOpt ONNX quantizer follows): the inputs of weighted
# layers are quantized (activation and weight, int8 symmetric, weights per output channel); the output of a
# weighted layer that feeds a residual Add stays float and the Add's other (skip) input is quantized, so that
# TensorRT fuses Conv + Add (+ ReLU) into one INT8 kernel; pooling and element-wise ops run in INT8 when their
# inputs are quantized. Weights may be stored as int8 + DequantizeLinear or float + QuantizeLinear ->
# DequantizeLinear.

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
COPY_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")
PATTERN_OPS = ("Add", "Sub", "Mul", "Concat", *POOL_OPS)  # the ops a Q/DQ placement pattern records


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


def _inspect_tensorrt(path: Path, proto: onnx.ModelProto) -> dict:
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
    return _report("tensorrt", float_ops, int_counts, float_counts, violations, qdq_counts)


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
    if node.op_type == "Mul" and _is_silu(node, g) and any(f is not None for f in fused):
        return None, problems  # Conv + SiLU fused
    return ("its input is not quantized" if not any(quantized) else "an input is not quantized"), problems


def _is_silu(mul: onnx.NodeProto, g: QdqGraph) -> bool:
    """Mul(x, Sigmoid(x)): TensorRT fuses it into the conv that produces x."""
    sources = [g.source(i) for i in mul.input]
    for i in mul.input:
        node = g.producer.get(i)
        if node is not None and node.op_type == "Sigmoid" and g.source(node.input[0]) in sources:
            return True
    return False


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


# ---- Q/DQ placement pattern (compared with NVIDIA's quantizer by tests and tools) --------------------


def qdq_pattern(proto: onnx.ModelProto) -> dict:
    """Where a Q/DQ graph quantizes. {"nodes": [{"node", "inputs": [{"from", "quantized"}], "output_quantized",
    "consumers"}] for every Add / Sub / Mul / Concat / pooling node, "counts": {...}, "graph": every op as
    [name, [[input name, quantized], ...]] (+ weight quantized, for Conv/Gemm/MatMul)}. Nodes are named
    "<op>#<k>", the k-th node of that op type in an order of the float graph (Q/DQ seen through) by depth and
    then by what feeds it, so the same float model quantized by two tools gives the same names."""
    g = QdqGraph(proto.graph)
    nodes = [n for n in proto.graph.node if n.op_type not in QDQ_OPS and g.activations(n)]
    ids = _canonical_ids(nodes, g)
    made_by = {o: ids[id(n)] for n in nodes for o in n.output}

    def origin(name: str) -> str:
        return made_by.get(g.source(name), "input")

    records = []
    for n in sorted(nodes, key=lambda n: _id_key(ids[id(n)])):
        inputs = g.activations(n)
        if n.op_type not in PATTERN_OPS or not inputs:
            continue
        records.append({
            "node": ids[id(n)],
            "inputs": [{"from": origin(i), "quantized": g.quantized(i)} for i in inputs],
            "output_quantized": g.output_quantized(n.output[0]),
            "consumers": sorted({ids[id(c)] for c in _float_consumers(n.output[0], g)}, key=_id_key),
        })  # fmt: skip
    skeleton = []
    for n in nodes:
        row: list = [ids[id(n)], [[origin(i), g.quantized(i)] for i in g.activations(n)]]
        if n.op_type in WEIGHTED_OPS:
            row.append(len(n.input) > 1 and g.dq(n.input[1]) is not None)
        skeleton.append(row)
    order = {name: k for k, name in enumerate(ids.values())}  # by depth: producers before consumers
    skeleton.sort(key=lambda row: order[row[0]])
    return {"nodes": records, "counts": _pattern_counts(nodes, ids, g), "graph": skeleton}


def _id_key(node_id: str) -> tuple[str, int]:
    op, _, k = node_id.partition("#")
    return op, int(k)


def _canonical_ids(nodes: list[onnx.NodeProto], g: QdqGraph) -> dict[int, str]:
    """id(node) -> "<op>#<k>", numbering each op type by (depth, op, what feeds it, weight shape, position)."""
    depth: dict[str, int] = {}
    levels: dict[int, list[tuple[int, onnx.NodeProto]]] = {}
    for position, n in enumerate(nodes):  # ONNX graphs list their nodes in topological order
        d = 1 + max((depth.get(g.source(i), 0) for i in g.activations(n)), default=0)
        depth.update({o: d for o in n.output})
        levels.setdefault(d, []).append((position, n))
    ids: dict[int, str] = {}
    made_by: dict[str, str] = {}
    counters: Counter = Counter()
    for d in sorted(levels):

        def key(item: tuple[int, onnx.NodeProto]) -> tuple:
            position, n = item
            feeds = tuple(sorted(made_by.get(g.source(i), "input") for i in g.activations(n)))
            return n.op_type, feeds, _weight_shape(n, g), position

        for _, n in sorted(levels[d], key=key):
            ids[id(n)] = f"{n.op_type}#{counters[n.op_type]}"
            counters[n.op_type] += 1
            made_by.update({o: ids[id(n)] for o in n.output})
    return ids


def _weight_shape(node: onnx.NodeProto, g: QdqGraph) -> tuple[int, ...]:
    for name in node.input[1:2]:
        dq = g.dq(name)
        if dq is not None:
            weight, _ = g.weight(dq)
            return tuple(weight.shape) if weight is not None else ()
        if name in g.inits:
            return tuple(g.inits[name].dims)
    return ()


def _float_consumers(name: str, g: QdqGraph) -> list[onnx.NodeProto]:
    """The ops that read this tensor, through Q -> DQ pairs and copy ops."""
    out = []
    for c in g.consumers.get(name, []):
        if c.op_type in QDQ_OPS or c.op_type in COPY_OPS:
            out += _float_consumers(c.output[0], g)
        else:
            out.append(c)
    return out


def _pattern_counts(nodes: list[onnx.NodeProto], ids: dict[int, str], g: QdqGraph) -> dict:
    counts: Counter = Counter()
    weighted_float = []
    for n in nodes:
        inputs = g.activations(n)
        if n.op_type in WEIGHTED_OPS:
            counts["weighted_ops"] += 1
            if g.quantized(n.input[0]):
                counts["weighted_inputs_quantized"] += 1
                weight, form = g.weight(g.dq(n.input[1])) if g.dq(n.input[1]) is not None else (None, "")
                counts[f"weights_{form or 'not_constant'}"] += 1
            else:
                weighted_float.append(ids[id(n)])
            counts["weighted_outputs_quantized"] += g.output_quantized(n.output[0])
        elif n.op_type == "Add" and len(inputs) == 2:
            if any(_from_weighted(g.source(i), g) for i in inputs):
                counts["residual_adds"] += 1
                quantized = [g.quantized(i) for i in inputs]
                key = "both" if all(quantized) else "none" if not any(quantized) else "one"
                counts[f"residual_adds_quantized_inputs_{key}"] += 1
        elif n.op_type == "Mul" and len(inputs) == 2:
            kind = "silu" if _is_silu(n, g) else "muls"
            counts[kind] += 1
            counts[f"{kind}_outputs_quantized"] += g.output_quantized(n.output[0])
            if kind == "muls":
                counts["muls_inputs_quantized"] += sum(g.quantized(i) for i in inputs)
        elif n.op_type in POOL_OPS:
            counts["pools"] += 1
            counts["pools_inputs_quantized"] += g.quantized(inputs[0]) if inputs else 0
            counts["pools_outputs_quantized"] += g.output_quantized(n.output[0])
    counts.update({op: sum(1 for n in g.graph.node if n.op_type == op) for op in QDQ_OPS})
    return {**dict(sorted(counts.items())), "weighted_float": sorted(weighted_float, key=_id_key)}


def _from_weighted(name: str, g: QdqGraph) -> bool:
    node = g.producer.get(name)
    while node is not None and node.op_type in ("BatchNormalization", "Relu"):
        node = g.producer.get(node.input[0])
    return node is not None and node.op_type in WEIGHTED_OPS


# One lint per quantization target (the same names as the placement profiles): (path, proto) -> report.
INSPECTORS: Registry = Registry("inspect target")
INSPECTORS.register("onnxruntime", _inspect_onnxruntime)
INSPECTORS.register("tensorrt", _inspect_tensorrt)


def _report(target, float_ops, int_counts, float_counts, violations, qdq_counts, **extra) -> dict:
    return {
        "target": target,
        "float_ops": float_ops,
        "int_op_counts": dict(sorted(int_counts.items())),
        "float_op_counts": dict(sorted(float_counts.items())),
        "qdq_counts": dict(sorted(qdq_counts.items())),
        "violations": violations,
        **extra,
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
    for op, n in report.get("qdq_counts", {}).items():
        table.add_row(f"[dim]{op} (not counted as an op)[/]", str(n), "")
    for f in report["float_ops"][:20]:
        table.add_row(f"[yellow]float[/] {f['op_type']} {f['name']}", "", f["reason"])
    if len(report["float_ops"]) > 20:
        table.add_row(f"... {len(report['float_ops']) - 20} more float ops", "", "")
    if report.get("float_islands"):
        islands = report["float_islands"]
        table.add_row(f"[yellow]float islands[/] (each entered and left through Q/DQ): {islands}", "", "")
    for v in report["violations"]:
        table.add_row(f"[red]violation[/] {v}", "", "")
    return table
