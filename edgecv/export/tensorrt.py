"""TensorRT engines: build on the device, with a metadata file that is checked before any deserialization.

An engine only runs on the GPU model and TensorRT version that built it. Every engine gets
`<engine>.json` next to it (TensorRT version, compute capability, device, JetPack/L4T, precision, ONNX
hash, input profile); the runner refuses a mismatch with one clear line instead of a TensorRT crash.

INT8 comes from the Q/DQ nodes of the ONNX graph (explicit quantization). Implicit calibration and the
FP16/INT8 builder flags are deprecated in TensorRT 10 and removed in 11, so `builder_options` decides,
per TensorRT version, which network flags and builder flags to use. `tensorrt` is imported lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecv.errors import EdgecvError
from edgecv.io import atomic_write_bytes

PRECISIONS = ("fp32", "fp16", "int8")
MIN_TENSORRT = (8, 5)  # JetPack 5.1; older releases lack the execute_async_v3 / named-tensor API
Shape = Sequence[int]


@dataclass
class EngineMetadata:
    tensorrt_version: str
    compute_capability: str  # "8.7"
    device_name: str
    jetpack: str | None
    l4t: str | None
    precision: str
    onnx_sha256: str
    input_name: str
    input_shape_min: list[int]
    input_shape_opt: list[int]
    input_shape_max: list[int]
    built_at: str  # ISO 8601, UTC

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "metadata") -> EngineMetadata:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise EdgecvError(f"{source}: engine metadata lacks {', '.join(missing)}")
        return cls(**{n: data[n] for n in names})


# --------------------------------------------------------------------------------------------- files
def metadata_path(engine_path: str | Path) -> Path:
    """`model.engine` -> `model.engine.json`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_metadata(engine_path: str | Path, meta: EngineMetadata) -> Path:
    path = metadata_path(engine_path)
    atomic_write_bytes(path, (json.dumps(meta.to_dict(), indent=2) + "\n").encode())
    return path


def read_metadata(engine_path: str | Path) -> EngineMetadata:
    path = metadata_path(engine_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgecvError(f"{path}: engine metadata not found (was the engine built by edgecv?)") from None
    except (OSError, ValueError) as exc:
        raise EdgecvError(f"{path}: cannot read engine metadata ({exc})") from None
    if not isinstance(data, dict):
        raise EdgecvError(f"{path}: engine metadata is not a JSON object")
    return EngineMetadata.from_dict(data, source=str(path))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- ONNX
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


def onnx_input(onnx_path: str | Path) -> tuple[str, list[int | str]]:
    """Name and shape (ints, or the symbolic name of a dynamic dimension) of the single graph input."""
    model = _load_onnx(onnx_path)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise EdgecvError(f"{onnx_path}: expected one image input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


# ---------------------------------------------------------------------------------- builder decisions
def parse_version(version: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); ignores suffixes such as '10.13.0.post1'."""
    parts = []
    for piece in str(version).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise EdgecvError(f"cannot read TensorRT version {version!r}")
    return tuple(parts)


def builder_options(
    precision: str,
    trt_version: str,
    workspace_mb: int,
    min_shape: Shape,
    opt_shape: Shape,
    max_shape: Shape,
    *,
    has_qdq: bool | None = None,
) -> dict:
    """Decide how to build, without TensorRT: {"network_flags", "builder_flags", "strongly_typed",
    "workspace_bytes", "profile": {"min", "opt", "max"}, "precision", "notes"}.

    - INT8 needs Q/DQ in the ONNX graph (`has_qdq`; None = not known, not checked). edgecv does no implicit
      calibration, so INT8 without Q/DQ is refused on every version.
    - TensorRT >= 10: a Q/DQ network is built strongly typed (types follow the graph), no precision flags.
      FP16 still uses the deprecated FP16 flag on 10.x; on 11 it needs an FP16 ONNX graph.
    - TensorRT 8.5/8.6: explicit-batch network; Q/DQ needs the INT8 flag, FP16 the FP16 flag.
    """
    if precision not in PRECISIONS:
        raise EdgecvError(f"precision {precision!r} is not supported; choose from: {', '.join(PRECISIONS)}")
    version = parse_version(trt_version)
    if version[:2] < MIN_TENSORRT:
        raise EdgecvError(f"TensorRT {trt_version} is too old: edgecv needs TensorRT >= 8.5 (JetPack >= 5.1)")
    if workspace_mb < 1:
        raise EdgecvError(f"workspace_mb must be >= 1, got {workspace_mb}")
    shapes = {
        "min": [int(d) for d in min_shape],
        "opt": [int(d) for d in opt_shape],
        "max": [int(d) for d in max_shape],
    }
    if not len(shapes["min"]) == len(shapes["opt"]) == len(shapes["max"]):
        raise EdgecvError(f"profile shapes differ in rank: {shapes}")
    if any(
        not (lo <= o <= hi) for lo, o, hi in zip(shapes["min"], shapes["opt"], shapes["max"], strict=True)
    ):
        raise EdgecvError(f"profile shapes must satisfy min <= opt <= max per dimension, got {shapes}")
    if precision == "int8" and has_qdq is False:
        if version[0] >= 10:
            why = (
                f"TensorRT {trt_version} takes INT8 only from Q/DQ nodes (implicit calibration is "
                "deprecated in TensorRT 10 and removed in 11)"
            )
        else:
            why = "edgecv builds INT8 engines from Q/DQ nodes only (no implicit calibration)"
        raise EdgecvError(
            f"precision 'int8' but the ONNX model has no QuantizeLinear/DequantizeLinear nodes: {why}; "
            "export the quantized model (QAT/PTQ stage, export target tensorrt) or build with precision fp16"
        )

    network_flags: list[str] = []
    builder_flags: list[str] = []
    notes: list[str] = []
    strongly_typed = False
    if version[0] >= 11:
        strongly_typed = True  # the only kind of network TensorRT 11 builds
        network_flags.append("STRONGLY_TYPED")
        if precision == "fp16":
            notes.append(
                "TensorRT 11 has no FP16 flag: the engine runs in the ONNX graph's types, "
                "so export an FP16 graph (e.g. ModelOpt AutoCast) to get FP16"
            )
    elif version[0] >= 10:
        if precision == "int8":
            strongly_typed = True
            network_flags.append("STRONGLY_TYPED")
        elif precision == "fp16":
            builder_flags.append("FP16")
            notes.append("the FP16 builder flag is deprecated in TensorRT 10 and removed in 11")
    else:  # 8.5 / 8.6
        network_flags.append("EXPLICIT_BATCH")
        if precision == "int8":
            builder_flags.append("INT8")  # TensorRT 8 needs the flag to honour Q/DQ nodes
        elif precision == "fp16":
            builder_flags.append("FP16")
    return {
        "precision": precision,
        "network_flags": network_flags,
        "builder_flags": builder_flags,
        "strongly_typed": strongly_typed,
        "workspace_bytes": int(workspace_mb) * 1024 * 1024,
        "profile": shapes,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------- compatibility
def check_compatible(meta: EngineMetadata, current: dict, engine_path: str | Path | None = None) -> None:
    """Raise an EdgecvError naming every mismatch between the engine's metadata and this device
    (TensorRT version to the patch level, compute capability, device name). Missing facts are skipped."""
    problems = []
    have_trt = current.get("tensorrt_version")
    if have_trt and parse_version(have_trt)[:3] != parse_version(meta.tensorrt_version)[:3]:
        problems.append(f"TensorRT {meta.tensorrt_version} built it, this device has TensorRT {have_trt}")
    have_cc = current.get("compute_capability")
    if have_cc and str(have_cc) != str(meta.compute_capability):
        problems.append(f"compute capability {meta.compute_capability} built it, this GPU is {have_cc}")
    have_name = current.get("device_name")
    if have_name and have_name != meta.device_name:
        problems.append(f"it was built on {meta.device_name!r}, this device is {have_name!r}")
    if problems:
        what = f"{engine_path}: " if engine_path else ""
        raise EdgecvError(
            f"{what}engine does not match this device: {'; '.join(problems)}. Engines are specific to "
            "the GPU and TensorRT version: rebuild it here from the ONNX file"
        )


def _cuda_device() -> tuple[str | None, str | None]:
    """(name, compute capability) of CUDA device 0 via cuda-python, else torch; (None, None) if neither."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except ImportError:
        pass
    return None, None


def current_device_facts() -> dict:
    """This device's {"tensorrt_version", "compute_capability", "device_name", "jetpack", "l4t"}."""
    from edgecv.device import jetson_facts

    try:
        import tensorrt as trt

        trt_version = trt.__version__
    except ImportError:
        trt_version = None
    name, cc = _cuda_device()
    jetson = jetson_facts() or {}
    return {
        "tensorrt_version": trt_version,
        "compute_capability": cc,
        "device_name": name,
        "jetpack": jetson.get("jetpack"),
        "l4t": jetson.get("l4t"),
    }


# --------------------------------------------------------------------------------------------- build
def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgecvError(
            "building a TensorRT engine needs TensorRT's Python bindings on the target device "
            "(see tools/jetson_setup.sh)"
        ) from None
    return trt


def _profile_shapes(
    dims: list[int | str], input_shape: Sequence[int] | None, min_batch: int, opt_batch: int, max_batch: int
) -> tuple[list[int], list[int], list[int]]:
    if len(dims) != 4:
        raise EdgecvError(f"expected an NCHW image input, the ONNX input has shape {dims}")
    chw = list(input_shape) if input_shape is not None else dims[1:]
    if any(not isinstance(d, int) or d < 1 for d in chw):
        raise EdgecvError(f"the ONNX input's C, H, W are dynamic ({dims}); pass input_shape=(C, H, W)")
    if isinstance(dims[0], int) and dims[0] > 0 and (min_batch, opt_batch, max_batch) != (dims[0],) * 3:
        raise EdgecvError(
            f"the ONNX model has a fixed batch of {dims[0]}; export it with a dynamic batch to build "
            f"an engine for batches {min_batch}..{max_batch}"
        )
    return [min_batch, *chw], [opt_batch, *chw], [max_batch, *chw]


def find_reusable_engine(
    engine_path: Path, onnx_sha256: str, precision: str, profile: dict
) -> EngineMetadata | None:
    """The metadata of an existing engine built from the same ONNX, precision and profile on a device
    like this one; None when it must be (re)built."""
    if not (engine_path.is_file() and metadata_path(engine_path).is_file()):
        return None
    try:
        meta = read_metadata(engine_path)
        check_compatible(meta, current_device_facts())
    except EdgecvError:
        return None
    same = (
        meta.onnx_sha256 == onnx_sha256
        and meta.precision == precision
        and [meta.input_shape_min, meta.input_shape_opt, meta.input_shape_max]
        == [profile["min"], profile["opt"], profile["max"]]
    )
    return meta if same else None


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str = "int8",
    workspace_mb: int = 1024,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    input_shape: Sequence[int] | None = None,
    reuse: bool = True,
) -> EngineMetadata:
    """Build a TensorRT engine from an ONNX file on this device and write it with its metadata (both
    atomically). With `reuse`, an existing engine from the same ONNX/precision/profile is kept."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    input_name, dims = onnx_input(onnx_path)
    shape_min, shape_opt, shape_max = _profile_shapes(dims, input_shape, min_batch, opt_batch, max_batch)
    trt = _import_tensorrt()
    options = builder_options(
        precision,
        trt.__version__,
        workspace_mb,
        shape_min,
        shape_opt,
        shape_max,
        has_qdq=onnx_has_qdq(onnx_path),
    )
    onnx_sha = sha256_file(onnx_path)
    if reuse:
        existing = find_reusable_engine(engine_path, onnx_sha, precision, options["profile"])
        if existing is not None:
            return existing

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in options["network_flags"]:
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:  # EXPLICIT_BATCH is gone where it became the only mode
            flags |= 1 << int(flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgecvError(
            f"{onnx_path}: TensorRT's ONNX parser failed: {errors[0] if errors else 'unknown error'}"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_bytes"])
    for name in options["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shape_min, shape_opt, shape_max)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgecvError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")

    current = current_device_facts()
    meta = EngineMetadata(
        tensorrt_version=trt.__version__,
        compute_capability=current["compute_capability"] or "unknown",
        device_name=current["device_name"] or "unknown",
        jetpack=current["jetpack"],
        l4t=current["l4t"],
        precision=precision,
        onnx_sha256=onnx_sha,
        input_name=input_name,
        input_shape_min=shape_min,
        input_shape_opt=shape_opt,
        input_shape_max=shape_max,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    # Old metadata must never describe the new engine, even if we are interrupted between the two writes.
    metadata_path(engine_path).unlink(missing_ok=True)
    atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
    write_metadata(engine_path, meta)
    return meta
