"""Inspect an ONNX model for a backend: which compute ops run in integer and which in float, and (TensorRT)
whether the Q/DQ placement follows NVIDIA's rules for explicit quantization.

onnxruntime: the graph ONNX Runtime actually runs (its optimized form at ORT_ENABLE_EXTENDED) is read back,
so a float Conv that QDQ fusion could not turn into QLinearConv shows up by name. tensorrt: TensorRT is not
needed; the rules are checked on the exported graph.

Modules: `qdq_graph` (the graph with Q/DQ pairs seen through, and the report's fields), `ort_rules` and
`trt_rules` (one lint per quantization target), `pattern` (where a Q/DQ graph quantizes, compared with
NVIDIA's quantizer by tests and tools). The package is not named `inspect`: that is the standard library's.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from edgecv.errors import EdgecvError
from edgecv.export.lint.ort_rules import inspect_onnxruntime
from edgecv.export.lint.qdq_graph import QdqGraph, unfolded_batchnorms
from edgecv.export.lint.trt_rules import inspect_tensorrt
from edgecv.registry import Registry

# One lint per quantization target (the same names as the placement profiles): (path, proto) -> report.
INSPECTORS: Registry = Registry("inspect target")
INSPECTORS.register("onnxruntime", inspect_onnxruntime)
INSPECTORS.register("tensorrt", inspect_tensorrt)


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
    between integer ones). Op counts count operators; Q/DQ nodes are counted apart. A BatchNormalization
    after a Conv is a violation for every target (it should have been folded)."""
    inspector = INSPECTORS.get(target)
    proto = _load(Path(path))
    report = inspector(Path(path), proto)
    report["violations"] += unfolded_batchnorms(QdqGraph(proto.graph))  # every target: fold BN into the conv
    return report


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
