"""torchrun / DDP: one process per device, NCCL on CUDA and gloo on CPU (PyTorch's own engine).

Every collective here puts its tensor on `DistInfo.device`, the device its backend works on: NCCL takes
only CUDA tensors of the process's own GPU, gloo and MPI take CPU tensors. Rank 0 reads and writes the
run's files; the other ranks get what they need from it through these collectives.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edgecv.device import device_index, is_cuda
from edgecv.errors import EdgecvError

# How long a rank waits in a collective for the others. Rank 0 alone calibrates, exports and measures
# between the training stages (minutes on ImageNet), so this is longer than torch's 10-minute default.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. `device` is where collective tensors must live (see
    `collective_device`); `backend` is "" for a single process without a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def collective_device(backend: str, gpu: int) -> str:
    """The device a backend's collectives take tensors on: NCCL works on CUDA tensors of this process's
    GPU only (a CPU tensor fails with "No backend type associated with device type cpu"); gloo and MPI
    on CPU tensors."""
    return f"cuda:{gpu}" if backend == "nccl" else "cpu"


def process_gpu(device: str, local_rank: int, gpus: int) -> int:
    """The GPU of the process with `local_rank` on its node: one GPU per process, in LOCAL_RANK order; a
    process that sees a single GPU (a scheduler bound it with CUDA_VISIBLE_DEVICES) uses that one."""
    if ":" in device:
        raise EdgecvError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                          "pass --device cuda")
    if gpus == 1:
        return 0
    if local_rank >= gpus:
        raise EdgecvError(f"torchrun started more processes on this node than it has GPUs ({gpus}): NCCL needs "
                          f"one GPU per process; use --nproc_per_node={gpus}")
    return local_rank


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if is_cuda(device) else "gloo"
    gpu = process_gpu(device, local_rank, torch.cuda.device_count()) if backend == "nccl" else 0
    on = collective_device(backend, gpu)
    if backend == "nccl":
        torch.cuda.set_device(on)
    if not dist.is_initialized():
        extra = {"device_id": torch.device(on)} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **extra)
        atexit.register(_leave)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, on)


def _leave() -> None:
    """Leave the process group before the interpreter exits (its communication threads would otherwise be
    torn down mid-flight: "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (NCCL is told which GPU is this process's, not left to guess)."""
    if not _active():
        return
    if info.backend == "nccl":
        dist.barrier(device_ids=[device_index(info.device)])
    else:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, on the backend's device)."""
    if not _active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu().tolist()]


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of `value` over all ranks."""
    if not _active():
        return value
    return all_reduce_sum([value], info)[0] / info.world_size


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """`obj` as rank `src` has it (any picklable value; the others pass anything, e.g. None)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=torch.device(info.device))
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small values: skipped-file lists, counts)."""
    if not _active():
        return [obj]
    return [broadcast_object(obj if info.rank == r else None, info, src=r) for r in range(info.world_size)]


def broadcast_module_state(module: nn.Module, info: DistInfo, src: int = 0) -> None:
    """Overwrite every parameter and buffer of `module` with rank `src`'s values, in place. One
    collective per dtype (the tensors are flattened into one), on the backend's device."""
    if not _active():
        return
    tensors = [t for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        wire_dtype = torch.uint8 if dtype == torch.bool else dtype  # NCCL has no bool
        flat = torch.cat([t.detach().reshape(-1).to(wire_dtype) for t in group]).to(info.device)
        dist.broadcast(flat, src=src)
        flat = flat.cpu()
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].reshape(t.shape).to(dtype))
                offset += n


# --------------------------------------------------------------------------- BatchNorm across ranks


def convert_sync_batchnorm(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Replace every BatchNorm module by a SyncBatchNorm sharing its parameters and buffers (statistics
    over the global batch: CUDA only in PyTorch); returns {name: original class} for `revert_sync_batchnorm`."""
    replaced: dict[str, type[nn.Module]] = {}
    for name, module in list(model.named_modules()):
        if name and isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            _swap(model, name, module, nn.SyncBatchNorm)
            replaced[name] = type(module)
    return replaced


def revert_sync_batchnorm(model: nn.Module, replaced: dict[str, type[nn.Module]]) -> None:
    """Put back the BatchNorm classes `convert_sync_batchnorm` replaced (exports and quantization rely
    on them), with the trained parameters and statistics."""
    for name, cls in replaced.items():
        _swap(model, name, model.get_submodule(name), cls)


def _swap(model: nn.Module, name: str, module: nn.Module, cls: type[nn.Module]) -> None:
    new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    new.weight, new.bias = module.weight, module.bias
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
