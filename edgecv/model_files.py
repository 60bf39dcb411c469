"""Model files as the device-side commands see them: an edgecv checkpoint (.pt), an ONNX file, or a
TensorRT engine. What shape of input each takes, which backend runs it by default, which dataset was
recorded with it, its validation batches, and a `Subject` to measure. torch is imported only for a .pt
file (and for a dataset that only torch can read); TensorRT only for an engine."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecv.bench.measure import Subject
from edgecv.bench.runners import ENGINE_SUFFIXES, create_runner, input_kind
from edgecv.errors import EdgecvError
from edgecv.export.class_names import class_names_in
from edgecv.export.normalization import UINT8_NHWC, Normalization, normalization_in

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
        from edgecv.export.trt.engine import engine_input_chw

        return engine_input_chw(path)  # its metadata, else the engine itself (an engine built by trtexec)
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


def subject_for(path: Path, backend: str, device: str, threads: int | None,
                batch_sizes: Sequence[int] = ()) -> Subject:
    """A Subject that loads `path` with `backend` when measured (torch runs edgecv checkpoints only;
    tensorrt runs an engine, or builds one from an ONNX file first, for `batch_sizes`)."""
    if backend == "tensorrt" and path.suffix.lower() == ".onnx":
        engine = engine_for_onnx(path, batch_sizes)
        return Subject(model=str(engine), runner=None, format="engine", size_bytes=engine.stat().st_size,
                       note=f"built from {path.name}",
                       load=lambda: create_runner("tensorrt", engine, device=device, threads=threads))
    if backend == "torch" and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise EdgecvError(f"{str(path)!r}: the torch backend runs edgecv checkpoints (.pt), not {path.suffix}")

    normalization = stored_normalization(path)

    def load():
        if backend == "torch":
            from edgecv.checkpoint import model_from_checkpoint

            model = model_from_checkpoint(read_checkpoint_once(path), path)[0]
            return create_runner("torch", model, device=device, threads=threads)
        runner = create_runner(backend, path, device=device, threads=threads)
        if input_kind(runner) == UINT8_NHWC and getattr(runner, "normalization", None) is None:
            runner.normalization = normalization  # an engine records none: the export's metadata.json does
        return runner

    return Subject(model=str(path), runner=None, format=file_format(path), size_bytes=path.stat().st_size,
                   normalization=normalization, load=load)


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


def stored_engine_options(path: Path) -> dict:
    """The engine options recorded with an ONNX file (the recipe's `export.engine`, in metadata.json)."""
    return _export_metadata(path).get("engine") or {}


def engine_for_onnx(onnx_path: Path, batch_sizes: Sequence[int] = ()) -> Path:
    """The TensorRT engine for an ONNX file, built here (or reused) next to it with the engine options
    recorded with the file; its profile covers `batch_sizes` and the recorded validation batch."""
    from edgecv.console import console
    from edgecv.export.trt.build import BuildOptions, build_engine, engine_path_for
    from edgecv.export.trt.options import engine_profile

    stored = stored_engine_options(onnx_path)
    data = stored_data_section(onnx_path) or {}
    sizes = list(batch_sizes) or list(stored.get("batch_sizes") or [1, 8])
    build = BuildOptions(
        precision=stored.get("precision", "auto"),
        batches=engine_profile(sizes, data.get("eval_batch_size", 256)),
        workspace_mb=int(stored.get("workspace_mb", 1024)),
        timing_cache=stored.get("timing_cache"),
        dla_core=stored.get("dla_core"),
    )
    engine = engine_path_for(onnx_path)
    build_engine(onnx_path, engine, build, echo=console.print)
    return engine


def data_config(path: Path, recipe: str | None) -> Any:
    """The `data` section to evaluate a model file on: the recipe's, else the one stored with the model."""
    from edgecv.config import load_raw, resolve_recipe_path, validate_section
    from edgecv.data.config import DataConfig

    if recipe:
        source = resolve_recipe_path(recipe)
        return validate_section(DataConfig, load_raw(source).get("data"), str(source), prefix="data")
    stored = stored_data_section(path)
    if stored is None:
        raise EdgecvError(f"{str(path)!r}: no dataset recorded with this model; pass --recipe RECIPE")
    return validate_section(DataConfig, stored, str(path), prefix="data")


def validation_batches(path: Path, recipe: str | None, data_root: str | None,
                       limit: int | None) -> Iterable[tuple[Any, Any]]:
    """The validation split for a model file, as (images, labels) batches: read with numpy where that gives
    the torch path's values exactly (ImageFolder; Fashion-MNIST at its native 28 px) or where torch is
    missing, else with the training code's torch loaders (synthetic data, resized Fashion-MNIST). Labels
    are the model's class indices, matched by class name where the model records its classes."""
    from edgecv.data.numpy_val import numpy_val, reads_like_torch

    cfg = data_config(path, recipe)
    if limit:
        cfg = cfg.model_copy(update={"limit_val": limit})
    if reads_like_torch(cfg) or importlib.util.find_spec("torch") is None:
        val = numpy_val(cfg, data_root)
        return by_class_name(val, val.class_names, stored_class_names(path), path)
    from edgecv.data.datasets import build_data

    bundle = build_data(cfg, data_root)
    return by_class_name(bundle.val, bundle.class_names, stored_class_names(path), path)


def stored_class_names(path: Path) -> list[str] | None:
    """The model's classes in output order: in a checkpoint's spec, in an ONNX file's metadata, or in the
    metadata.json beside an export (an engine's). None when nothing records them."""
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        names = (read_checkpoint_once(path).get("model") or {}).get("class_names")
        return list(names) if names else None
    if suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        found = class_names_in(props, path)
        if found:
            return found
    meta = _export_metadata(path)
    return meta.get("classes") or (meta.get("model") or {}).get("class_names") or None


def by_class_name(batches: Iterable, data_names: Sequence[str], model_names: Sequence[str] | None,
                  path: Path) -> Iterable:
    """`batches` with each label turned into the index of the same class name among the model's classes (a
    folder of some of the model's classes, or in another order, is scored right); unchanged when either
    side records no names or both are the same list. A class the model does not know: one line."""
    if not model_names or not data_names or list(data_names) == list(model_names):
        return batches
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        shown = ", ".join(list(model_names)[:8]) + (" ..." if len(model_names) > 8 else "")
        raise EdgecvError(f"validation class {unknown[0]!r} is not one of the {len(model_names)} classes of "
                          f"{str(path)!r} ({shown}): evaluate on class folders named after its classes")
    index = np.asarray([list(model_names).index(n) for n in data_names], dtype=np.int64)
    if dataclasses.is_dataclass(batches) and hasattr(batches, "labels"):  # NumpyVal: all labels in memory
        return dataclasses.replace(batches, labels=index[batches.labels])
    return Relabeled(batches, index)


@dataclasses.dataclass
class Relabeled:
    """(images, index[labels]) batches of a loader: its labels mapped to the model's class indices."""

    batches: Iterable
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Any, np.ndarray]]:
        for images, labels in self.batches:
            yield images, self.index[np.asarray(labels)]
