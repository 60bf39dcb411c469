"""How to build an engine, decided without TensorRT: the precision, network and builder flags for each
TensorRT version, the optimization profile, DLA, and the equivalent `trtexec` command line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgecv.errors import EdgecvError
from edgecv.export.trt.metadata import parse_version

PRECISIONS = ("fp32", "fp16", "int8")
REQUESTS = ("auto", *PRECISIONS)  # auto: int8 for a Q/DQ graph, else fp16
MIN_TENSORRT = (8, 5)  # JetPack 5.1; older releases lack the execute_async_v3 / named-tensor API
Shape = Sequence[int]


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
