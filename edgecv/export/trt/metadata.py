"""`<engine>.json`: what an engine was built from and on, read back and checked against this device before
TensorRT deserializes the engine. A fact unknown at build time is never held against an engine."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgecv.errors import EdgecvError
from edgecv.io import atomic_write_bytes

UNKNOWN = (None, "", "unknown")  # metadata values that say "not known when the engine was built"


@dataclass
class EngineMetadata:
    """What an engine was built from and what TensorRT built; `<engine>.json`."""

    tensorrt_version: str
    precision: str  # requested: fp32 | fp16 | int8
    onnx_sha256: str
    input_name: str
    input_shape_min: list[int]
    input_shape_opt: list[int]
    input_shape_max: list[int]
    built_at: str  # ISO 8601, UTC
    compute_capability: str | None = None  # "8.7"; None: unknown when built (never held against the engine)
    device_name: str | None = None
    jetpack: str | None = None
    l4t: str | None = None
    onnx_file: str | None = None
    built_precision: dict | None = None  # share of layers per precision, from the engine inspector
    builder_warnings: list[str] = field(default_factory=list)
    device_memory_bytes: int | None = None
    options: dict = field(default_factory=dict)  # the build request (the key for reusing an engine)
    trtexec: str | None = None  # the equivalent trtexec command line

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "metadata") -> EngineMetadata:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise EdgecvError(f"{source}: engine metadata lacks {', '.join(missing)}")
        return cls(**{n: data[n] for n in fields if n in data})


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


# ------------------------------------------------------------------------------------- compatibility
def check_compatible(meta: EngineMetadata, current: dict, engine_path: str | Path | None = None) -> None:
    """Raise an EdgecvError naming every mismatch between the engine's metadata and this device
    (TensorRT version to the patch level, compute capability, device name). A fact unknown on either side
    (not recorded at build time, or not readable here) is skipped: TensorRT's own check still applies."""
    problems = []
    have_trt = current.get("tensorrt_version")
    if have_trt and meta.tensorrt_version not in UNKNOWN and (
        parse_version(have_trt)[:3] != parse_version(meta.tensorrt_version)[:3]
    ):
        problems.append(f"TensorRT {meta.tensorrt_version} built it, this device has TensorRT {have_trt}")
    have_cc = current.get("compute_capability")
    if have_cc and meta.compute_capability not in UNKNOWN and str(have_cc) != str(meta.compute_capability):
        problems.append(f"compute capability {meta.compute_capability} built it, this GPU is {have_cc}")
    have_name = current.get("device_name")
    if have_name and meta.device_name not in UNKNOWN and have_name != meta.device_name:
        problems.append(f"it was built on {meta.device_name!r}, this device is {have_name!r}")
    if problems:
        what = f"{engine_path}: " if engine_path else ""
        raise EdgecvError(
            f"{what}engine does not match this device: {'; '.join(problems)}. Engines are specific to "
            "the GPU and TensorRT version: rebuild it here from the ONNX file"
        )


def current_device_facts() -> dict:
    """This device's {"tensorrt_version", "compute_capability", "device_name", "jetpack", "l4t"}: TensorRT's
    own version, CUDA device 0 from the CUDA runtime (cuda-python); None for what cannot be read."""
    from edgecv.device import cuda_device_facts, jetson_facts

    try:
        import tensorrt as trt

        trt_version = trt.__version__
    except ImportError:
        trt_version = None
    cuda = cuda_device_facts(0) or {}
    jetson = jetson_facts(run=lambda cmd: None) or {}
    return {
        "tensorrt_version": trt_version,
        "compute_capability": cuda.get("compute_capability"),
        "device_name": cuda.get("name"),
        "jetpack": jetson.get("jetpack"),
        "l4t": jetson.get("l4t"),
    }
