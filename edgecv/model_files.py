"""Model files as the device-side commands see them: an edgecv checkpoint (.pt), an ONNX file, or a
TensorRT engine. What shape of input each takes, which backend runs it by default, which dataset was
recorded with it, and a `Subject` to measure. torch is imported only for a .pt file."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from edgecv.bench.measure import Subject
from edgecv.bench.runners import ENGINE_SUFFIXES, create_runner
from edgecv.errors import EdgecvError

CHECKPOINT_SUFFIXES = (".pt", ".pth")


def check_paths(models: list[Path]) -> list[Path]:
    for p in models:
        if not p.exists():
            raise EdgecvError(f"model file {str(p)!r} does not exist")
        if p.is_dir():
            raise EdgecvError(f"{str(p)!r} is a folder, not a model file")
    return models


@functools.lru_cache(maxsize=4)
def _checkpoint_at(path: Path, mtime_ns: int) -> dict:
    from edgecv.checkpoint import read_checkpoint

    return read_checkpoint(path)


def read_checkpoint_once(path: Path) -> dict:
    """A .pt checkpoint, read once per command however many helpers need its spec, data or weights."""
    return _checkpoint_at(path.resolve(), path.stat().st_mtime_ns)


def _onnx_input_dims(path: Path) -> list[int]:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise EdgecvError(f"{str(path)!r} is not an ONNX model ({type(exc).__name__})") from None
    initializers = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in initializers]
    if not inputs:
        raise EdgecvError(f"{str(path)!r}: the ONNX graph has no input")
    return [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]


def model_input_shape(path: Path) -> tuple[int, int, int]:
    """C, H, W of a model file: from a checkpoint's spec, an ONNX input, or engine metadata."""
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        from edgecv.checkpoint import checkpoint_header

        return checkpoint_header(read_checkpoint_once(path), path).spec.input_shape
    if suffix == ".onnx":
        dims = _onnx_input_dims(path)
        if len(dims) != 4 or not all(dims[1:]):
            raise EdgecvError(f"{str(path)!r}: expected an NCHW input with fixed C, H, W; got {dims}")
        return (dims[1], dims[2], dims[3])
    if suffix in ENGINE_SUFFIXES:
        from edgecv.export.tensorrt import read_metadata

        shape = list(read_metadata(path).input_shape_opt)
        return (shape[1], shape[2], shape[3])
    raise EdgecvError(f"{str(path)!r}: unknown model file type {suffix!r} (expected .pt, .onnx or .engine)")


def default_backend(path: Path) -> str:
    s = path.suffix.lower()
    return "torch" if s in CHECKPOINT_SUFFIXES else "onnxruntime" if s == ".onnx" else "tensorrt"


def file_format(path: Path) -> str:
    s = path.suffix.lower()
    if s in CHECKPOINT_SUFFIXES:
        return "torch"
    if s == ".onnx":
        return "onnx-int8" if ".int8" in path.name else "onnx"
    return "engine"


def subject_for(path: Path, backend: str, device: str, threads: int | None) -> Subject:
    """A Subject that loads `path` with `backend` when measured (torch runs edgecv checkpoints only)."""
    if backend == "torch" and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise EdgecvError(f"{str(path)!r}: the torch backend runs edgecv checkpoints (.pt), not {path.suffix}")

    def load():
        if backend == "torch":
            from edgecv.checkpoint import model_from_checkpoint

            model = model_from_checkpoint(read_checkpoint_once(path), path)[0]
            return create_runner("torch", model, device=device, threads=threads)
        return create_runner(backend, path, device=device, threads=threads)

    return Subject(model=str(path), runner=None, format=file_format(path), size_bytes=path.stat().st_size, load=load)


def stored_data_section(path: Path) -> dict[str, Any] | None:
    """The `data` section recorded with a model: in a checkpoint, or in metadata.json beside an export."""
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return read_checkpoint_once(path).get("meta", {}).get("data")
    meta = path.parent / "metadata.json"
    if meta.exists():
        try:
            return json.loads(meta.read_text()).get("data")
        except ValueError:
            raise EdgecvError(f"{meta}: not valid JSON") from None
    return None
