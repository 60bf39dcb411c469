"""Model files as the device-side commands see them: an edgecv checkpoint (.pt), an ONNX file, or a
TensorRT engine. What shape of input each takes, which backend runs it by default, which dataset was
recorded with it, and a `Subject` to measure. torch is imported only for a .pt file."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from edgecv.bench.measure import Subject
from edgecv.bench.runners import ENGINE_SUFFIXES, create_runner, input_kind
from edgecv.errors import EdgecvError
from edgecv.export.frames import UINT8_NHWC, Normalization, normalization_in

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


def _onnx_input(path: Path):
    """The image input (a ValueInfoProto) of an ONNX file."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise EdgecvError(f"{str(path)!r} is not an ONNX model ({type(exc).__name__})") from None
    initializers = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in initializers]
    if not inputs:
        raise EdgecvError(f"{str(path)!r}: the ONNX graph has no input")
    return inputs[0]


def _takes_frames(value_info) -> bool:
    from onnx import TensorProto

    return value_info.type.tensor_type.elem_type == TensorProto.UINT8


def model_input_shape(path: Path) -> tuple[int, int, int]:
    """C, H, W of a model file: from a checkpoint's spec, an ONNX input, or engine metadata."""
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        from edgecv.checkpoint import checkpoint_header

        return checkpoint_header(read_checkpoint_once(path), path).spec.input_shape
    if suffix == ".onnx":
        value_info = _onnx_input(path)
        dims = [d.dim_value for d in value_info.type.tensor_type.shape.dim]
        frames = _takes_frames(value_info)  # uint8 N x H x W x C camera frames (export --input uint8-nhwc)
        if len(dims) != 4 or not all(dims[1:]):
            layout = "NHWC" if frames else "NCHW"
            raise EdgecvError(f"{str(path)!r}: expected an {layout} input with fixed C, H, W; got {dims}")
        return (dims[3], dims[1], dims[2]) if frames else (dims[1], dims[2], dims[3])
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
    """A Subject that runs `path` with `backend` (torch runs edgecv checkpoints only)."""
    if backend == "torch":
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise EdgecvError(f"{str(path)!r}: the torch backend runs edgecv checkpoints (.pt), not {path.suffix}")
        from edgecv.checkpoint import model_from_checkpoint

        runner = create_runner("torch", model_from_checkpoint(read_checkpoint_once(path), path)[0], device=device,
                               threads=threads)
    else:
        runner = create_runner(backend, path, device=device, threads=threads)
    normalization = stored_normalization(path)
    if input_kind(runner) == UINT8_NHWC and getattr(runner, "normalization", None) is None:
        runner.normalization = normalization  # an engine records none: the export's metadata.json does
    return Subject(model=str(path), runner=runner, format=file_format(path), size_bytes=path.stat().st_size,
                   normalization=normalization)


def stored_normalization(path: Path) -> Normalization | None:
    """The input normalization recorded with a model: in a checkpoint's spec, in a frame-input ONNX file,
    or in the metadata.json beside an export. None when nothing records it."""
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        spec = read_checkpoint_once(path).get("model") or {}
    else:
        if path.suffix.lower() == ".onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            found = normalization_in(props, path)
            if found is not None:
                return found
        spec = _export_metadata(path).get("model") or {}
    if not spec.get("mean") or not spec.get("std"):
        return None
    return Normalization(tuple(spec["mean"]), tuple(spec["std"]))


def _export_metadata(path: Path) -> dict:
    meta = path.parent / "metadata.json"
    if not meta.exists():
        return {}
    try:
        return json.loads(meta.read_text())
    except ValueError:
        raise EdgecvError(f"{meta}: not valid JSON") from None


def stored_data_section(path: Path) -> dict[str, Any] | None:
    """The `data` section recorded with a model: in a checkpoint, or in metadata.json beside an export."""
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return read_checkpoint_once(path).get("meta", {}).get("data")
    return _export_metadata(path).get("data")
