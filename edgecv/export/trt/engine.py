"""Reading an engine: importing tensorrt (one clear line where it is missing), deserializing, the engine's
input and output, its device memory, and the precision TensorRT chose per layer (engine inspector JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecv.errors import EdgecvError
from edgecv.export.trt.metadata import metadata_path, read_metadata


def import_tensorrt() -> Any:
    """The tensorrt module (imported lazily: only building or running an engine needs it); one line saying
    where to get it when it is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgecvError(
            "TensorRT is not installed here: building or running an engine needs TensorRT's Python bindings "
            "on the target device (JetPack's python3-libnvinfer; see tools/jetson_setup.sh)"
        ) from None
    return trt


_PRECISION_RANK = {"int8": 0, "fp8": 1, "fp16": 2, "bf16": 3, "fp32": 4}


def datatype_precision(text: str) -> str | None:
    """The precision named in an inspector "Format/Datatype" or weights "Type" string ("Row major linear
    FP16 format", "Thirty-two wide channel vectorized row major Int8 format.", "Float", "Half"); None for
    integers, booleans and anything unknown."""
    low = str(text).lower()
    for key, words in (("int8", ("int8",)), ("fp8", ("fp8",)), ("bf16", ("bf16",)), ("fp16", ("fp16", "half")),
                       ("fp32", ("fp32", "float"))):
        if any(w in low for w in words):
            return key
    return None


def layer_precision(layer: dict) -> str | None:
    """A compute layer's precision: the lowest among its first input, first output and weights (an INT8
    convolution reads int8 and may write float); None for layers without typed tensors and for reformats."""
    if not isinstance(layer, dict) or layer.get("LayerType") in ("Reformat", "NoOp", "Constant", "Shape"):
        return None
    found = []
    for key in ("Inputs", "Outputs"):
        tensors = layer.get(key) or []
        if tensors and isinstance(tensors[0], dict):
            found.append(datatype_precision(tensors[0].get("Format/Datatype", "")))
    weights = layer.get("Weights")
    if isinstance(weights, dict):
        found.append(datatype_precision(weights.get("Type", "")))
    found = [p for p in found if p is not None]
    return min(found, key=_PRECISION_RANK.__getitem__) if found else None


def layer_precisions(engine_information: str) -> dict | None:
    """Share of the engine's compute layers per precision, from the engine inspector's JSON
    (`get_engine_information(LayerInformationFormat.JSON)` of an engine built with detailed profiling
    verbosity): {"layers": n, "int8": 0.8, "fp16": 0.0, "fp32": 0.2, ...}. None when the JSON has no
    per-layer detail (engines built without it list only layer names)."""
    try:
        info = json.loads(engine_information)
    except (TypeError, ValueError):
        return None
    layers = info.get("Layers", []) if isinstance(info, dict) else info
    precisions = [layer_precision(layer) for layer in layers if isinstance(layer, dict)]
    precisions = [p for p in precisions if p is not None]
    if not precisions:
        return None
    shares: dict = {"layers": len(precisions)}
    for key in ("int8", "fp16", "fp32", "fp8", "bf16"):
        count = precisions.count(key)
        if count or key in ("int8", "fp16", "fp32"):
            shares[key] = round(count / len(precisions), 4)
    return shares


def format_precisions(shares: dict | None) -> str:
    """'40 layers: INT8 85%, FP16 0%, FP32 15%' (or 'layer precisions unknown')."""
    if not shares:
        return "layer precisions unknown"
    parts = [f"{key.upper()} {100 * shares[key]:.0f}%" for key in ("int8", "fp16", "fp32", "fp8", "bf16")
             if key in shares]
    return f"{shares['layers']} layers: " + ", ".join(parts)


def engine_device_memory(engine: Any) -> int | None:
    """Device memory TensorRT needs for an execution context (activations): `device_memory_size_v2`
    (TensorRT >= 10), `device_memory_size` (8.x; removed in 11)."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    if hasattr(engine, "device_memory_size"):
        return int(engine.device_memory_size)
    return None


@dataclass(frozen=True)
class EngineIO:
    """An engine's single input and output as TensorRT reports them."""

    input_name: str
    output_name: str
    input_dtype: str  # numpy dtype name
    output_dtype: str
    input_shape: tuple[int, ...]  # -1 where dynamic
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None  # (min, opt, max) input shapes


def engine_io(trt: Any, engine: Any, source: str | Path = "engine") -> EngineIO:
    """Names, dtypes, shape and profile of an engine's input and output (thin TensorRT calls)."""
    import numpy as np

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    if len(inputs) != 1 or len(outputs) != 1:
        raise EdgecvError(f"{source}: expected one input and one output, found {inputs} and {outputs}")
    shape = tuple(int(d) for d in engine.get_tensor_shape(inputs[0]))
    profile = None
    if -1 in shape:
        profile = tuple(tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(inputs[0], 0))
    return EngineIO(
        input_name=inputs[0], output_name=outputs[0],
        input_dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(inputs[0]))).name,
        output_dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(outputs[0]))).name,
        input_shape=shape, profile=profile,  # type: ignore[arg-type]
    )  # fmt: skip


def batch_limits(io: EngineIO) -> tuple[int, int]:
    """(smallest, largest) batch the engine runs in one call: its fixed batch, or its profile's range."""
    if io.input_shape and io.input_shape[0] > 0:
        return io.input_shape[0], io.input_shape[0]
    if io.profile is None:
        raise EdgecvError(f"engine input {io.input_name!r} has a dynamic batch but no optimization profile")
    return io.profile[0][0], io.profile[2][0]


def deserialize(path: str | Path) -> tuple[Any, Any, Any]:
    """(tensorrt module, runtime, engine) for an engine file; one clear line when TensorRT refuses it."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise EdgecvError(
            f"{path}: TensorRT {trt.__version__} cannot deserialize this engine "
            "(built with another TensorRT version or GPU? rebuild it on this device)"
        )
    return trt, runtime, engine


def engine_input_chw(path: str | Path) -> tuple[int, int, int]:
    """C, H, W of an engine's input: from its metadata, else from the engine itself (needs TensorRT)."""
    if metadata_path(path).is_file():
        shape = read_metadata(path).input_shape_opt
    else:
        trt, _runtime, engine = deserialize(path)
        io = engine_io(trt, engine, path)
        shape = list(io.profile[1]) if io.profile is not None else list(io.input_shape)
    if len(shape) != 4 or min(shape[1:]) < 1:
        raise EdgecvError(f"{path}: expected an NCHW image input with fixed C, H, W; the engine has {shape}")
    return (int(shape[1]), int(shape[2]), int(shape[3]))
