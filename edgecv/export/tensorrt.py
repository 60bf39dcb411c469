"""TensorRT engines: built on the device, with a metadata file that is checked before any deserialization.

An engine only runs on the GPU model and TensorRT version that built it. Every engine edgecv builds gets
`<engine>.json` next to it: TensorRT version, compute capability and device (from the CUDA runtime),
JetPack/L4T, the precision asked for and the precisions TensorRT actually chose per layer (read back with
the engine inspector), builder warnings, input profile, ONNX hash, device memory, and the equivalent
`trtexec` command line. The runner refuses a mismatch with one clear line instead of a TensorRT crash; a
fact that was unknown at build time is never held against an engine, and an engine without metadata
(built by trtexec) runs under TensorRT's own check.

INT8 comes from the Q/DQ nodes of the ONNX graph (explicit quantization). The FP16/INT8 builder flags are
deprecated in TensorRT 10 and removed in 11, where networks are strongly typed: FP16 then needs an FP16
graph, which edgecv writes next to the ONNX file (`<name>.fp16.onnx`). Every decision (flags, profile,
DLA, trtexec line, precision shares) is a plain function; the TensorRT calls are thin and few. `tensorrt`
and `onnxruntime` are imported lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecv.errors import EdgecvError
from edgecv.io import atomic_write_bytes

PRECISIONS = ("fp32", "fp16", "int8")
REQUESTS = ("auto", *PRECISIONS)  # auto: int8 for a Q/DQ graph, else fp16
MIN_TENSORRT = (8, 5)  # JetPack 5.1; older releases lack the execute_async_v3 / named-tensor API
UNKNOWN = (None, "", "unknown")  # metadata values that say "not known when the engine was built"
Shape = Sequence[int]


# ------------------------------------------------------------------------------------------ metadata
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


def resolve_precision(requested: str, has_qdq: bool) -> str:
    """'auto' -> int8 for a Q/DQ graph, fp16 otherwise; an explicit precision is kept."""
    if requested not in REQUESTS:
        raise EdgecvError(f"precision {requested!r} is not supported; choose from: {', '.join(REQUESTS)}")
    if requested == "auto":
        return "int8" if has_qdq else "fp16"
    return requested


def engine_profile(batch_sizes: Sequence[int], eval_batch_size: int | None = None) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimization profile for what edgecv will run on the engine: any batch
    from 1 up to the largest bench batch or validation batch; tuned (opt) for the largest bench batch."""
    sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1})
    if not sizes:
        raise EdgecvError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    largest = max(sizes[-1], int(eval_batch_size or 0))
    return 1, sizes[-1], largest


def _check_request(precision: str, version: tuple[int, ...], trt_version: str, workspace_mb: int,
                   has_qdq: bool | None) -> None:
    if precision not in PRECISIONS:
        raise EdgecvError(f"precision {precision!r} is not supported; choose from: {', '.join(PRECISIONS)}")
    if version[:2] < MIN_TENSORRT:
        raise EdgecvError(f"TensorRT {trt_version} is too old: edgecv needs TensorRT >= 8.5 (JetPack >= 5.1)")
    if workspace_mb < 1:
        raise EdgecvError(f"workspace_mb must be >= 1, got {workspace_mb}")
    if precision == "int8" and has_qdq is False:
        if version[0] >= 10:
            why = (f"TensorRT {trt_version} takes INT8 only from Q/DQ nodes (implicit calibration is "
                   "deprecated in TensorRT 10 and removed in 11)")
        else:
            why = "edgecv builds INT8 engines from Q/DQ nodes only (no implicit calibration)"
        raise EdgecvError(
            f"precision 'int8' but the ONNX model has no QuantizeLinear/DequantizeLinear nodes: {why}; "
            "export the quantized model (QAT/PTQ stage, export target tensorrt) or build with precision fp16"
        )


def _profile(min_shape: Shape, opt_shape: Shape, max_shape: Shape) -> dict[str, list[int]]:
    shapes = {"min": [int(d) for d in min_shape], "opt": [int(d) for d in opt_shape],
              "max": [int(d) for d in max_shape]}
    if not len(shapes["min"]) == len(shapes["opt"]) == len(shapes["max"]):
        raise EdgecvError(f"profile shapes differ in rank: {shapes}")
    if any(not (lo <= o <= hi) for lo, o, hi in zip(shapes["min"], shapes["opt"], shapes["max"], strict=True)):
        raise EdgecvError(f"profile shapes must satisfy min <= opt <= max per dimension, got {shapes}")
    return shapes


def dla_supported(version: tuple[int, ...]) -> bool:
    """Whether a TensorRT release drives the DLA: up to 10.7, and again from 11.4.1 (AGX Orin, JetPack
    7.2.2+); 10.8 to 11.4.0 do not (NVIDIA's "Working with DLA")."""
    return version[:2] <= (10, 7) or version[:3] >= (11, 4, 1)


def _flags(precision: str, version: tuple[int, ...], fp16_graph: bool,
           dla: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(network flags, builder flags, notes) for a precision on a TensorRT major version."""
    if version[0] >= 11:  # every network is strongly typed (the flag is deprecated and ignored): graph types
        notes = []
        if precision == "fp16" and not fp16_graph:
            notes.append("TensorRT 11 has no FP16 flag: edgecv builds from an FP16 copy of the graph")
        return [], [], notes
    if version[0] >= 10:
        if precision == "int8" and dla:  # DLA (TensorRT <= 10.7) as NVIDIA documents it: the INT8 flag
            return [], ["INT8"], ["the INT8 builder flag is deprecated in TensorRT 10 and removed in 11"]
        if precision == "int8":
            return ["STRONGLY_TYPED"], [], []
        if precision == "fp16" and not fp16_graph:
            return [], ["FP16"], ["the FP16 builder flag is deprecated in TensorRT 10 and removed in 11"]
        return [], [], []
    network = ["EXPLICIT_BATCH"]  # 8.5 / 8.6
    if precision == "int8":
        return network, ["INT8"], []  # TensorRT 8 needs the flag to honour Q/DQ nodes
    return network, (["FP16"] if precision == "fp16" else []), []


def _check_dla(dla_core: int | None, precision: str, version: tuple[int, ...], trt_version: str) -> None:
    if dla_core is None:
        return
    if dla_core < 0:
        raise EdgecvError(f"dla_core must be >= 0, got {dla_core}")
    if precision == "fp32":
        raise EdgecvError("DLA runs INT8 and FP16 layers only: build with precision int8 or fp16, or without dla_core")
    if not dla_supported(version):
        raise EdgecvError(
            f"dla_core: TensorRT {trt_version} does not drive the DLA (TensorRT 10.7 and older do, and 11.4.1+ "
            "on AGX Orin with JetPack 7.2.2+); build without dla_core"
        )


def builder_options(
    precision: str,
    trt_version: str,
    workspace_mb: int,
    min_shape: Shape,
    opt_shape: Shape,
    max_shape: Shape,
    *,
    has_qdq: bool | None = None,
    fp16_graph: bool = False,
    dla_core: int | None = None,
) -> dict:
    """Decide how to build, without TensorRT: {"precision", "network_flags", "builder_flags",
    "strongly_typed", "workspace_bytes", "profile": {"min", "opt", "max"}, "needs_fp16_graph", "dla_core",
    "notes"}. Flag names are TensorRT's enum members (checked against each version's real bindings).

    - INT8 needs Q/DQ in the ONNX graph (`has_qdq`; None = not known, not checked): no implicit calibration.
    - TensorRT 10: a Q/DQ network is built strongly typed; FP16 uses the deprecated FP16 flag.
    - TensorRT 11: every network is strongly typed (no flags); FP16 needs an FP16 graph
      (`needs_fp16_graph`: the caller converts the ONNX file).
    - TensorRT 8.5/8.6: explicit-batch network; Q/DQ needs the INT8 flag, FP16 the FP16 flag.
    - DLA (`dla_core`): INT8 or FP16 only, with GPU fallback for the layers DLA cannot run; on TensorRT 10
      weakly typed with the precision flag (as NVIDIA documents DLA builds); refused on the releases that do
      not drive the DLA (10.8 to 11.4.0).
    """
    version = parse_version(trt_version)
    _check_request(precision, version, trt_version, workspace_mb, has_qdq)
    _check_dla(dla_core, precision, version, trt_version)
    shapes = _profile(min_shape, opt_shape, max_shape)
    network_flags, builder_flags, notes = _flags(precision, version, fp16_graph, dla=dla_core is not None)
    if dla_core is not None:
        builder_flags.append("GPU_FALLBACK")
        notes.append(f"DLA core {dla_core}, layers DLA cannot run fall back to the GPU")
    return {
        "precision": precision,
        "network_flags": network_flags,
        "builder_flags": builder_flags,
        "strongly_typed": version[0] >= 11 or "STRONGLY_TYPED" in network_flags,
        "workspace_bytes": int(workspace_mb) * 1024 * 1024,
        "profile": shapes,
        "needs_fp16_graph": version[0] >= 11 and precision == "fp16" and not fp16_graph,
        "dla_core": dla_core,
        "notes": notes,
    }


def profile_shapes(dims: list[int | str], batches: tuple[int, int, int],
                   input_shape: Sequence[int] | None = None) -> tuple[list[int], list[int], list[int]]:
    """(min, opt, max) NCHW shapes of the profile for an ONNX input of shape `dims`; C, H, W from the graph
    (or `input_shape` where the graph leaves them dynamic). A graph with a fixed batch must match it."""
    min_batch, opt_batch, max_batch = batches
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


def check_dla_core(dla_core: int | None, available: int) -> None:
    """Refuse a DLA core this device does not have (DLA exists on AGX Orin, Orin NX and Xavier)."""
    if dla_core is not None and dla_core >= available:
        have = f"has {available} DLA core(s)" if available else "has no DLA (Orin Nano, Nano and Thor have none)"
        raise EdgecvError(f"dla_core {dla_core}: this device {have}; build without dla_core")


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, input_name: str, options: dict,
                    timing_cache: str | Path | None = None) -> str:
    """The `trtexec` command line that builds the same engine as `options` (from builder_options)."""
    def dims(shape: list[int]) -> str:
        return f"{input_name}:{'x'.join(str(d) for d in shape)}"

    profile = options["profile"]
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
             f"--minShapes={dims(profile['min'])}", f"--optShapes={dims(profile['opt'])}",
             f"--maxShapes={dims(profile['max'])}",
             f"--memPoolSize=workspace:{options['workspace_bytes'] // 2**20}"]
    if "STRONGLY_TYPED" in options["network_flags"]:  # TensorRT 10; on 11 every network is strongly typed
        parts.append("--stronglyTyped")
    parts += [f"--{flag.lower()}" for flag in options["builder_flags"] if flag in ("FP16", "INT8")]
    if options.get("dla_core") is not None:
        parts += [f"--useDLACore={options['dla_core']}", "--allowGPUFallback"]
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    parts.append("--profilingVerbosity=detailed")
    return " ".join(str(p) for p in parts)


# ----------------------------------------------------------------------------------- what was built
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


# --------------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class BuildOptions:
    """What to build: precision (auto: int8 for a Q/DQ graph, else fp16), the batches the engine will run
    (min, opt, max), workspace, a timing cache file reused across builds, and a DLA core (GPU fallback)."""

    precision: str = "auto"
    batches: tuple[int, int, int] = (1, 8, 8)
    workspace_mb: int = 1024
    timing_cache: str | None = None
    dla_core: int | None = None
    input_shape: tuple[int, ...] | None = None  # C, H, W where the ONNX input leaves them dynamic


@dataclass
class BuildPlan:
    """Everything decided before TensorRT is called."""

    onnx_path: Path
    source: Path  # the file TensorRT parses (an FP16 copy on TensorRT 11 for fp16)
    engine_path: Path
    trt_version: str
    input_name: str
    options: dict  # builder_options()
    request: dict  # what identifies the build (the reuse key)
    trtexec: str
    timing_cache: Path | None


def plan_build(onnx_path: Path, engine_path: Path, trt_version: str, build: BuildOptions) -> BuildPlan:
    """Read the ONNX file and decide the whole build (no TensorRT call)."""
    input_name, dims = onnx_input(onnx_path)
    has_qdq = onnx_has_qdq(onnx_path)
    precision = resolve_precision(build.precision, has_qdq)
    fp16_graph = onnx_is_fp16(onnx_path)
    shapes = profile_shapes(dims, build.batches, build.input_shape)
    options = builder_options(precision, trt_version, build.workspace_mb, *shapes, has_qdq=has_qdq,
                              fp16_graph=fp16_graph, dla_core=build.dla_core)
    source = fp16_onnx_path(onnx_path) if options["needs_fp16_graph"] else onnx_path
    cache = Path(build.timing_cache).expanduser() if build.timing_cache else None
    request = {"onnx_sha256": sha256_file(onnx_path), "precision": precision, "profile": options["profile"],
               "dla_core": build.dla_core, "workspace_mb": build.workspace_mb}
    return BuildPlan(Path(onnx_path), source, Path(engine_path), trt_version, input_name, options, request,
                     trtexec_command(source, engine_path, input_name, options, cache), cache)


def find_reusable_engine(engine_path: Path, request: dict, current: dict) -> EngineMetadata | None:
    """The metadata of an existing engine built from the same request (ONNX hash, precision, profile, DLA
    core, workspace) on a device like this one; None when it must be (re)built."""
    if not (engine_path.is_file() and metadata_path(engine_path).is_file()):
        return None
    try:
        meta = read_metadata(engine_path)
        check_compatible(meta, current)
    except EdgecvError:
        return None
    return meta if meta.options.get("request") == request else None


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgecvError(
            "TensorRT is not installed here: building or running an engine needs TensorRT's Python bindings "
            "on the target device (JetPack's python3-libnvinfer; see tools/jetson_setup.sh)"
        ) from None
    return trt


def _collecting_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps warnings and errors (to report them) and drops the rest."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(str(msg).strip())

    return CollectingLogger()


def _network_flags(trt: Any, names: list[str]) -> int:
    flags = 0
    for name in names:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    return flags


def _parse(trt: Any, plan: BuildPlan, logger: Any) -> tuple[Any, Any, Any]:
    """Builder, network and parser for the plan's ONNX file (thin TensorRT calls)."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan.options["network_flags"]))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.source)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgecvError(f"{plan.source}: TensorRT's ONNX parser failed: {errors[0] if errors else 'unknown error'}")
    return builder, network, parser


def _configure(trt: Any, builder: Any, plan: BuildPlan) -> Any:
    """The builder config the plan describes (thin TensorRT calls)."""
    options = plan.options
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_bytes"])
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precisions in the inspector
    for name in options["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if options["dla_core"] is not None:
        check_dla_core(options["dla_core"], builder.num_DLA_cores)
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options["dla_core"]
    if plan.timing_cache is not None:
        old = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(old), False)
    profile = builder.create_optimization_profile()
    shapes = options["profile"]
    profile.set_shape(plan.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    return config


def _inspect_engine(trt: Any, serialized: bytes, logger: Any) -> tuple[dict | None, int | None]:
    """(precision shares, device memory bytes) of a freshly built engine, read back from TensorRT."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    if engine is None:
        return None, None
    inspector = engine.create_engine_inspector()
    shares = layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return shares, engine_device_memory(engine)


def engine_device_memory(engine: Any) -> int | None:
    """Device memory TensorRT needs for an execution context (activations): `device_memory_size_v2`
    (TensorRT >= 10), `device_memory_size` (8.x; removed in 11)."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    if hasattr(engine, "device_memory_size"):
        return int(engine.device_memory_size)
    return None


def build_engine(onnx_path: str | Path, engine_path: str | Path, build: BuildOptions | None = None, *,
                 reuse: bool = True, echo: Callable[[str], None] | None = None) -> EngineMetadata:
    """Build a TensorRT engine from an ONNX file on this device and write it with its metadata (both
    atomically); prints the equivalent trtexec command and TensorRT's warnings through `echo`. With
    `reuse`, an existing engine built from the same request on a device like this one is kept."""
    build = build or BuildOptions()
    echo = echo or (lambda line: None)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt = _import_tensorrt()
    plan = plan_build(onnx_path, engine_path, trt.__version__, build)
    current = current_device_facts()
    if reuse and (existing := find_reusable_engine(engine_path, plan.request, current)) is not None:
        return existing
    if plan.options["needs_fp16_graph"]:
        write_fp16_onnx(onnx_path, plan.source)
    echo(f"building {engine_path.name} ({plan.options['precision']}); the same with trtexec:\n  {plan.trtexec}")
    logger = _collecting_logger(trt)
    builder, network, _parser = _parse(trt, plan, logger)
    config = _configure(trt, builder, plan)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgecvError(f"{onnx_path}: TensorRT could not build an engine: {'; '.join(logger.messages[-3:])}")
    data = bytes(memoryview(serialized))
    if plan.timing_cache is not None:
        atomic_write_bytes(plan.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    shares, memory = _inspect_engine(trt, data, logger)
    meta = engine_metadata(plan, current, shares, memory, logger.messages)
    for line in meta.builder_warnings:
        echo(f"TensorRT: {line}")
    echo(f"built {engine_path.name}: {format_precisions(shares)}")
    metadata_path(engine_path).unlink(missing_ok=True)  # old metadata must never describe the new engine
    atomic_write_bytes(engine_path, data)
    write_metadata(engine_path, meta)
    return meta


def engine_metadata(plan: BuildPlan, current: dict, shares: dict | None, memory: int | None,
                    warnings: Sequence[str]) -> EngineMetadata:
    """The metadata of an engine built from `plan` on the device `current` describes (unknown facts stay
    None, never "unknown" strings that would later refuse the engine)."""
    shapes = plan.options["profile"]
    return EngineMetadata(
        tensorrt_version=plan.trt_version, precision=plan.options["precision"],
        onnx_sha256=plan.request["onnx_sha256"], input_name=plan.input_name,
        input_shape_min=shapes["min"], input_shape_opt=shapes["opt"], input_shape_max=shapes["max"],
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        compute_capability=current.get("compute_capability"), device_name=current.get("device_name"),
        jetpack=current.get("jetpack"), l4t=current.get("l4t"), onnx_file=plan.onnx_path.name,
        built_precision=shares, builder_warnings=list(dict.fromkeys(w for w in warnings if w))[:50],
        device_memory_bytes=memory,
        options={**{k: v for k, v in plan.options.items() if k != "profile"}, "request": plan.request},
        trtexec=plan.trtexec,
    )  # fmt: skip


def engine_path_for(onnx_path: str | Path) -> Path:
    """`model.int8.onnx` -> `model.int8.engine`: where an engine built from an ONNX file is written."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_suffix(".engine")


# ------------------------------------------------------------------------------------- reading engines
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
    trt = _import_tensorrt()
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
