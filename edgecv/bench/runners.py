"""Runners: one small protocol that turns an NCHW batch into float32 logits, one registry entry per backend.

A runner whose model takes camera frames (`input_kind` "uint8-nhwc": an ONNX file or engine made by
`export --input uint8-nhwc`) is called with uint8 N x H x W x C frames; given a normalized float NCHW
batch (a validation loader's), it turns it back into frames with the normalization the file records.

`onnxruntime`, `tensorrt` and cuda-python are imported only inside the runner that needs them, so
`import edgecv.bench` works on a machine that lacks them.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from edgecv.errors import EdgecvError
from edgecv.export.normalization import FLOAT_NCHW, UINT8_NHWC, Normalization, normalization_in
from edgecv.registry import Registry

if TYPE_CHECKING:
    from torch import nn

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@runtime_checkable
class Runner(Protocol):
    backend: str

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW batch in (or, when `input_kind` is "uint8-nhwc", uint8 NHWC frames), float32
        logits (N, classes) out."""
        ...

    def describe(self) -> dict:
        """backend, device, threads, versions, providers, file: what a benchmark row must say it ran on."""
        ...


RunnerFactory = Callable[..., Runner]
RUNNERS: Registry[RunnerFactory] = Registry("bench backend")


def create_runner(
    backend: str, model: nn.Module | str | Path, *, device: str = "cpu", threads: int | None = None
) -> Runner:
    """Build the runner for `backend` ("torch", "onnxruntime", "tensorrt") on `model`; `device` is "cpu",
    "cuda" or "cuda:N" (the index is kept: GPU N runs it)."""
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise EdgecvError(f"device {device!r} is not supported; choose 'cpu', 'cuda' or 'cuda:N'")
    if threads is not None and threads < 1:
        raise EdgecvError(f"threads must be >= 1, got {threads}")
    factory = RUNNERS.get(backend)
    return factory(model, device=device, threads=threads)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _model_file(model: Any, backend: str, suffixes: tuple[str, ...], what: str) -> Path:
    """The existing file a file-based backend runs, or an EdgecvError naming what is wrong with it."""
    if not isinstance(model, (str, Path)):
        raise EdgecvError(
            f"backend {backend!r} runs {what} file ({', '.join(suffixes)}), not a {type(model).__name__}"
        )
    path = Path(model)
    if not path.is_file():
        raise EdgecvError(f"model file not found: {path}")
    if path.suffix.lower() not in suffixes:
        raise EdgecvError(f"{path}: backend {backend!r} runs {what} file ({', '.join(suffixes)})")
    return path


def _as_input(batch: np.ndarray) -> np.ndarray:
    if batch.ndim != 4:
        raise EdgecvError(f"a batch must be NCHW (4 dimensions), got shape {tuple(batch.shape)}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def input_kind(runner: object) -> str:
    """What `runner`'s model takes: "float-nchw" (normalized tensors) or "uint8-nhwc" (camera frames)."""
    return getattr(runner, "input_kind", FLOAT_NCHW)


def _as_frames(batch: Any, channels: int, normalization: Normalization | None, where: object) -> np.ndarray:
    """uint8 N x H x W x C frames for a frame-input model: frames pass as they are; a normalized float NCHW
    batch is turned back into frames with the model's normalization."""
    if getattr(batch, "dtype", None) == np.uint8:
        if batch.ndim != 4 or batch.shape[3] != channels:
            raise EdgecvError(f"{where}: frames must be uint8 N x H x W x {channels}, got shape {tuple(batch.shape)}")
        return np.ascontiguousarray(batch)
    if normalization is None:
        raise EdgecvError(
            f"{where}: the model takes uint8 NHWC frames and records no normalization to turn a normalized "
            "float batch into frames; feed it frames"
        )
    return normalization.to_frames(np.asarray(batch))


# --------------------------------------------------------------------------------------------- torch
class TorchRunner:
    """An nn.Module in eval mode under inference_mode; on CUDA the output copy synchronises."""

    backend = "torch"
    input_kind = FLOAT_NCHW

    def __init__(self, model: Any, *, device: str = "cpu", threads: int | None = None) -> None:
        import torch
        from torch import nn

        if not isinstance(model, nn.Module):
            where = f": {model}" if isinstance(model, (str, Path)) else ""
            raise EdgecvError(
                f"backend 'torch' runs a model built in Python (nn.Module), not a file{where}; "
                "load the checkpoint first, or use --backend onnxruntime for a .onnx file"
            )
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgecvError("device 'cuda' requested for backend 'torch' but torch sees no CUDA GPU")
        if threads is not None:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(True)  # as ONNX Runtime's session.set_denormal_as_zero: a fair comparison
        self._torch = torch
        self.device = device
        self.threads = torch.get_num_threads() if device == "cpu" else None
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        self.model = model.to(device).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(_as_input(batch)).to(self.device)
            return self.model(x).float().cpu().numpy()

    def memory_mb(self, batch: np.ndarray) -> float | None:
        """On CUDA: the peak GPU memory torch's allocator holds while running `batch` (weights included).
        None on the CPU, where the process's resident set is measured instead."""
        if not self.device.startswith("cuda"):
            return None
        torch = self._torch
        device = torch.device(self.device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20

    def describe(self) -> dict:
        torch = self._torch
        return {
            "backend": self.backend,
            "device": self.device,
            "device_name": torch.cuda.get_device_name(torch.device(self.device)) if self.device != "cpu" else None,
            "threads": self.threads,
            "versions": {"torch": torch.__version__},
            "providers": [],
            "file": None,
            "model": type(self.model).__name__,
        }


# --------------------------------------------------------------------------------------- onnxruntime
class OnnxRuntimeRunner:
    """An InferenceSession: sequential, inter-op 1 thread, intra-op `threads`, all graph optimisations."""

    backend = "onnxruntime"

    def __init__(self, model: Any, *, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        path = _model_file(model, self.backend, (".onnx",), "an ONNX")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ORT picks one per physical core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: users see our one line, not ORT's warnings
        # Denormal floats make float kernels up to 10x slower on x86; deployments flush them (torch too, below).
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EdgecvError(
                    "device 'cuda' requested but this onnxruntime has no CUDAExecutionProvider "
                    "(install onnxruntime-gpu)"
                )
            index = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises Fail / InvalidProtobuf / InvalidGraph / NotImplemented
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgecvError(f"{path}: onnxruntime cannot load this model ({reason[:200]})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise EdgecvError(f"{path}: expected one image input, the model has {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_kind = UINT8_NHWC if inputs[0].type == "tensor(uint8)" else FLOAT_NCHW
        self.normalization = normalization_in(self.session.get_modelmeta().custom_metadata_map, path)
        self._channels = inputs[0].shape[-1]
        self.path = path
        self.device = device
        self.threads = threads
        self._ort = ort

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.input_kind == UINT8_NHWC:
            return self.session.run(None, {self.input_name: _as_frames(batch, self._channels, self.normalization,
                                                                       self.path)})[0]
        return self.session.run(None, {self.input_name: _as_input(batch)})[0]

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "device": self.device,
            "threads": self.threads,
            "versions": {"onnxruntime": self._ort.__version__},
            "providers": self.session.get_providers(),
            "file": str(self.path),
        }


# ------------------------------------------------------------------------------------------ tensorrt
def _cudart() -> Any:
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6), else `cuda.cudart`."""
    from edgecv.device import cuda_runtime

    runtime = cuda_runtime()
    if runtime is None:
        raise EdgecvError(
            "backend 'tensorrt' needs cuda-python matching this device's CUDA major version "
            "(tools/jetson_setup.sh installs it; elsewhere pip install 'edgecv[tensorrt]')"
        )
    return runtime


def _check_cuda(result: Any, what: str) -> Any:
    """cuda-python calls return (err, *values); raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", None) or str(err)
        raise EdgecvError(f"CUDA error in {what}: {name} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def native_handle(obj: Any) -> int:
    """The address behind a cuda-python handle (a stream): `get_cuda_native_handle` where cuda-bindings has
    it (12.9+, 13: `int(handle)` is deprecated there), else int()."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def free_cuda_memory(cudart: Any) -> int | None:
    """Free device memory in bytes (cudaMemGetInfo), None when it cannot be read."""
    try:
        err, free, _total = cudart.cudaMemGetInfo()
    except (RuntimeError, OSError):
        return None
    return int(free) if int(err) == 0 else None


def cuda_memory_mb(free_before: int | None, free_after: int | None) -> float | None:
    """Device memory taken between two cudaMemGetInfo readings, in MiB; None when either reading is
    missing or memory was freed meanwhile (another process: the difference measures nothing)."""
    if free_before is None or free_after is None or free_after > free_before:
        return None
    return (free_before - free_after) / 2**20


@dataclass(frozen=True)
class Chunk:
    """Rows start:stop of a batch, padded with `pad` zero rows up to the engine's smallest batch."""

    start: int
    stop: int
    pad: int = 0


def plan_chunks(n: int, min_batch: int, max_batch: int) -> list[Chunk]:
    """Split a batch of n images into calls the engine can run: at most `max_batch` each, and a remainder
    below `min_batch` padded (its extra outputs are dropped)."""
    if min_batch < 1 or max_batch < min_batch:
        raise EdgecvError(f"engine batch range {min_batch}..{max_batch} is not valid")
    chunks = []
    for start in range(0, n, max_batch):
        stop = min(n, start + max_batch)
        chunks.append(Chunk(start, stop, max(0, min_batch - (stop - start))))
    return chunks


def engine_batches(batch: np.ndarray, dtype: str, min_batch: int, max_batch: int) -> list[tuple[np.ndarray, int]]:
    """A batch as the engine takes it: in the engine's input dtype, split into calls its profile allows;
    (contiguous array, rows of its output to keep) per call."""
    x = np.ascontiguousarray(_as_input(batch), dtype=np.dtype(dtype))
    parts = []
    for chunk in plan_chunks(len(x), min_batch, max_batch):
        part = x[chunk.start : chunk.stop]
        if chunk.pad:
            part = np.concatenate([part, np.zeros((chunk.pad, *part.shape[1:]), dtype=part.dtype)])
        parts.append((np.ascontiguousarray(part), chunk.stop - chunk.start))
    return parts


class TensorRTRunner:
    """A deserialised TensorRT engine: one input, one output, device buffers grown on demand. Any batch
    runs (split into calls the optimization profile allows); inputs are sent in the engine's own dtype."""

    backend = "tensorrt"

    def __init__(self, model: Any, *, device: str = "cuda", threads: int | None = None) -> None:
        from edgecv.device import device_index
        from edgecv.export.trt import engine as trt_engine
        from edgecv.export.trt import metadata as trt_meta

        path = _model_file(model, self.backend, ENGINE_SUFFIXES, "a TensorRT engine")
        meta = trt_meta.read_metadata(path) if trt_meta.metadata_path(path).is_file() else None
        self.current = trt_meta.current_device_facts()
        if meta is not None:  # before TensorRT loads it: a mismatch gets one clear line, not a crash
            trt_meta.check_compatible(meta, self.current, path)
        trt_engine.import_tensorrt()  # no metadata (trtexec built it): TensorRT's own check applies
        cudart = _cudart()
        self.meta, self._cudart, self.path, self.device = meta, cudart, path, device
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        _check_cuda(cudart.cudaSetDevice(device_index(device)), "cudaSetDevice")
        self._free_at_start = free_cuda_memory(cudart)
        self._trt, self.runtime, self.engine = trt_engine.deserialize(path)
        self.io = trt_engine.engine_io(self._trt, self.engine, path)
        self.min_batch, self.max_batch = trt_engine.batch_limits(self.io)
        frames = self.io.input_dtype == "uint8"  # a frame-input file (export --input uint8-nhwc)
        self.input_kind = UINT8_NHWC if frames else FLOAT_NCHW
        self.normalization: Normalization | None = None  # set by whoever knows it (model_files: the ONNX file)
        self._channels = int(self.io.input_shape[-1])
        self.context = self.engine.create_execution_context()
        self.stream = _check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check_cuda(self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_check_cuda(self._cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._buffers[name] = (ptr, nbytes)
            self.context.set_tensor_address(name, ptr)
        return ptr

    def _run(self, x: np.ndarray) -> np.ndarray:
        """One engine call on a batch inside the profile."""
        cudart = self._cudart
        if not self.context.set_input_shape(self.io.input_name, x.shape):
            raise EdgecvError(f"{self.path}: input shape {x.shape} is outside the engine's optimization profile")
        out = np.empty(tuple(self.context.get_tensor_shape(self.io.output_name)), dtype=self.io.output_dtype)
        d_in = self._buffer(self.io.input_name, x.nbytes)
        d_out = self._buffer(self.io.output_name, out.nbytes)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check_cuda(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self.stream), "H2D copy")
        if not self.context.execute_async_v3(native_handle(self.stream)):
            raise EdgecvError(f"{self.path}: TensorRT execute_async_v3 failed")
        _check_cuda(cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, self.stream), "D2H copy")
        _check_cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.input_kind == UINT8_NHWC:
            batch = _as_frames(batch, self._channels, self.normalization, self.path)
        outputs = [self._run(part)[:keep] for part, keep in
                   engine_batches(batch, self.io.input_dtype, self.min_batch, self.max_batch)]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def memory_mb(self, batch: np.ndarray) -> float | None:
        """Device memory the engine, its context and its buffers for `batch` take: free memory
        (cudaMemGetInfo) before the engine was loaded minus free memory now; None when not measurable."""
        self(batch)
        return cuda_memory_mb(self._free_at_start, free_cuda_memory(self._cudart))

    def describe(self) -> dict:
        from edgecv.export.trt.engine import engine_device_memory

        memory = engine_device_memory(self.engine)
        return {
            "backend": self.backend,
            "device": self.current.get("device_name") or self.device,
            "threads": None,
            "versions": {"tensorrt": self._trt.__version__, "cuda-python": _version("cuda-python"),
                         "cuda-bindings": _version("cuda-bindings")},
            "providers": [],
            "file": str(self.path),
            "compute_capability": self.current.get("compute_capability"),
            "precision": self.meta.precision if self.meta else None,
            "built_precision": self.meta.built_precision if self.meta else None,
            "input_dtype": self.io.input_dtype,
            "batch_range": [self.min_batch, self.max_batch],
            "engine_device_memory_mb": None if memory is None else round(memory / 2**20, 1),
        }

    def __del__(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)


RUNNERS.register("torch", TorchRunner)
RUNNERS.register("onnxruntime", OnnxRuntimeRunner)
RUNNERS.register("tensorrt", TensorRTRunner)


def backend_available(backend: str) -> bool:
    """Whether `backend`'s libraries import here (the CLI and tests use it to skip a backend cleanly)."""
    modules = {"torch": ["torch"], "onnxruntime": ["onnxruntime"], "tensorrt": ["tensorrt"]}
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules.get(backend, [backend]))
