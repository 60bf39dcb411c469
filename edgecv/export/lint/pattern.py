"""Where a Q/DQ graph quantizes, named so that the same float model quantized by two tools compares node by
node (compared with NVIDIA's quantizer by tests and tools)."""

from __future__ import annotations

from collections import Counter

import onnx

from edgecv.export.lint.qdq_graph import COPY_OPS, POOL_OPS, QDQ_OPS, WEIGHTED_OPS, QdqGraph, is_silu

PATTERN_OPS = ("Add", "Sub", "Mul", "Concat", *POOL_OPS)  # the ops a Q/DQ placement pattern records


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
            kind = "silu" if is_silu(n, g) else "muls"
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
