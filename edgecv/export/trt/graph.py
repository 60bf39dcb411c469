"""The ONNX file an engine is built from: its one input, whether it quantizes with Q/DQ nodes or computes in
FP16, and the FP16 copy (`<name>.fp16.onnx`) that TensorRT 11 builds FP16 engines from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecv.errors import EdgecvError
from edgecv.io import atomic_write_bytes


def _load_onnx(onnx_path: str | Path) -> Any:
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise EdgecvError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise EdgecvError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from None


def onnx_has_qdq(onnx_path: str | Path) -> bool:
    """Whether the graph quantizes explicitly (QuantizeLinear and DequantizeLinear nodes)."""
    ops = {node.op_type for node in _load_onnx(onnx_path).graph.node}
    return {"QuantizeLinear", "DequantizeLinear"} <= ops


def onnx_is_fp16(onnx_path: str | Path) -> bool:
    """Whether the graph computes in FP16: its float weights are float16 (a converted graph keeps float32
    inputs and outputs with Cast nodes)."""
    from onnx import TensorProto

    types = {init.data_type for init in _load_onnx(onnx_path).graph.initializer}
    return TensorProto.FLOAT16 in types and TensorProto.FLOAT not in types


def onnx_input(onnx_path: str | Path) -> tuple[str, list[int | str]]:
    """Name and shape (ints, or the symbolic name of a dynamic dimension) of the single graph input."""
    model = _load_onnx(onnx_path)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise EdgecvError(f"{onnx_path}: expected one image input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def sort_nodes(graph: Any) -> None:
    """Order a graph's nodes topologically (in place), keeping the original order among ready nodes."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise EdgecvError("the ONNX graph has a cycle or a node input nothing produces")
        for node in ready:
            known.update(node.output)
        ordered += ready
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def fp16_onnx_path(onnx_path: str | Path) -> Path:
    """`model.onnx` -> `model.fp16.onnx`: where the FP16 copy TensorRT 11 builds from is written."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.fp16{onnx_path.suffix}")


def write_fp16_onnx(onnx_path: str | Path, dest: str | Path | None = None) -> Path:
    """An FP16 copy of a float graph (weights and compute in float16, inputs and outputs kept float32
    with Cast nodes), written atomically; for TensorRT >= 11, where FP16 comes only from the graph's types.
    Uses the float16 converter that ships with onnxruntime (the one onnxconverter-common also has)."""
    import onnx

    source = Path(onnx_path)
    if onnx_has_qdq(source):
        raise EdgecvError(f"{source}: an INT8 (Q/DQ) graph is not converted to FP16; build it as int8")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(_load_onnx(source), keep_io_types=True)
    sort_nodes(converted.graph)  # the converter appends the input Casts last; parsers want graph order
    onnx.checker.check_model(converted)
    dest = Path(dest) if dest is not None else fp16_onnx_path(source)
    atomic_write_bytes(dest, converted.SerializeToString())
    return dest
