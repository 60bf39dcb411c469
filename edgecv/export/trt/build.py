"""Building an engine on this device: plan every decision from the ONNX file (no TensorRT call), reuse an
engine built from the same request on a device like this one, else build with thin TensorRT calls and
write the engine and its metadata, each atomically."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecv.errors import EdgecvError
from edgecv.export.trt.engine import (
    engine_device_memory,
    format_precisions,
    import_tensorrt,
    layer_precisions,
)
from edgecv.export.trt.graph import fp16_onnx_path, onnx_has_qdq, onnx_input, onnx_is_fp16, write_fp16_onnx
from edgecv.export.trt.metadata import (
    EngineMetadata,
    check_compatible,
    current_device_facts,
    metadata_path,
    read_metadata,
    sha256_file,
    write_metadata,
)
from edgecv.export.trt.options import (
    builder_options,
    check_dla_core,
    profile_shapes,
    resolve_precision,
    trtexec_command,
)
from edgecv.io import atomic_write_bytes


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


def build_engine(onnx_path: str | Path, engine_path: str | Path, build: BuildOptions | None = None, *,
                 reuse: bool = True, echo: Callable[[str], None] | None = None) -> EngineMetadata:
    """Build a TensorRT engine from an ONNX file on this device and write it with its metadata (both
    atomically); prints the equivalent trtexec command and TensorRT's warnings through `echo`. With
    `reuse`, an existing engine built from the same request on a device like this one is kept."""
    build = build or BuildOptions()
    echo = echo or (lambda line: None)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt = import_tensorrt()
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
