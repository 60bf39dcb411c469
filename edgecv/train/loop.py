"""The training loop shared by baseline training, fine-tuning, distillation and QAT.

Resumable: the full state (model, optimizer, scaler, EMA, epochs done) is saved atomically by rank 0
after every epoch to `state_path`; calling `fit` again with the same path continues from the last
finished epoch, at any world size (the schedule is positioned from the epochs done, rank 0 reads the
file and sends it to the other ranks).

Speed options (train config): AMP (bfloat16, or float16 with a gradient scaler), channels_last,
torch.compile, EMA of the weights, gradient accumulation, cudnn.benchmark; under torchrun on CUDA,
SyncBatchNorm. Each epoch's record in the log has images/s, time, and peak GPU memory on CUDA.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgecv.console import console, make_progress
from edgecv.device import is_cuda
from edgecv.errors import EdgecvError
from edgecv.io import atomic_torch_save
from edgecv.train.config import TrainConfig
from edgecv.train.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_object,
    convert_sync_batchnorm,
    gather_objects,
    revert_sync_batchnorm,
)
from edgecv.train.ema import WeightAverage
from edgecv.train.optim import build_optimizer, build_scheduler, scaled_lr

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
STATUS_EVERY = 20  # steps between progress updates (each one waits for the GPU)


class CrossEntropy(nn.Module):
    """The default loss: cross-entropy with label smoothing, as a `LossFn`."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


def evaluate_model(model: nn.Module, loader: Iterable, device: str = "cpu", progress=None, label: str = "eval",
                   dist_info: DistInfo | None = None) -> dict:
    """Top-1 / top-5 accuracy (%) of a torch model over a loader, on `device`. With `dist_info`, each rank
    evaluates its own part of the validation set and the counts are summed over the ranks."""
    from edgecv.bench.accuracy import evaluate

    was_training = model.training
    model.to(device).eval()

    @torch.no_grad()
    def predict(images: torch.Tensor) -> np.ndarray:
        return model(torch.as_tensor(images).to(device, non_blocking=True)).float().cpu().numpy()

    task = progress.add_task(label, total=len(loader), status="") if progress is not None else None
    try:
        local = {"top1": 0.0, "top5": 0.0, "n": 0}
        if len(loader) or dist_info is None:  # a rank's part may be empty when ranks outnumber batches
            local = evaluate(predict, loader, progress=(lambda n: progress.advance(task, n)) if task is not None else None)
    finally:
        if task is not None:
            progress.remove_task(task)
        model.train(was_training)
    if dist_info is None:
        return local
    top1, top5, n = all_reduce_sum([local["top1"] * local["n"], local["top5"] * local["n"], local["n"]], dist_info)
    if n == 0:
        raise EdgecvError("no images to evaluate: the dataset split is empty")
    return {"top1": top1 / n, "top5": top5 / n, "n": int(n)}


def _append_jsonl(path: Path | None, record: dict) -> None:
    if path is None:
        return
    with open(path, "a") as f:  # an append-only log; a torn last line is tolerated by readers
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the session


@dataclass
class TrainSession:
    """Everything one `fit` call trains with."""

    model: nn.Module  # the module whose weights are trained and returned
    cfg: TrainConfig
    device: str
    dist: DistInfo
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    lr: float  # the base lr for this run's global batch
    global_batch: int
    steps_per_epoch: int  # optimizer steps (batches / grad_accum)
    ema: WeightAverage | None = None
    scheduler: object = None
    train_model: nn.Module | None = None  # what the forward pass calls: DDP and/or compiled
    ddp: nn.parallel.DistributedDataParallel | None = None
    sync_bn: dict = field(default_factory=dict)
    logged_skips: set = field(default_factory=set)


def _trainable(model: nn.Module, loss_fn: LossFn) -> nn.Module:
    """What the optimizer updates: the model, and a loss's own parameters (feature distillation's 1x1
    adapters; a frozen teacher has none that require grad)."""
    return nn.ModuleList([model, loss_fn]) if isinstance(loss_fn, nn.Module) else model


def start_session(model: nn.Module, train_loader: Iterable, cfg: TrainConfig, device: str, dist: DistInfo,
                  loss_fn: LossFn | None) -> TrainSession:
    """Model on its device and layout, the loss, optimizer (lr for the global batch), scaler and EMA."""
    batches = len(train_loader)
    steps = batches // cfg.grad_accum
    if steps == 0 and cfg.epochs > 0:
        raise EdgecvError(f"train.grad_accum {cfg.grad_accum} is more than the {batches} batches of an epoch")
    batch = getattr(train_loader, "batch_size", None) or 0
    if not batch and cfg.lr_scale != "none":
        raise EdgecvError(f"train.lr_scale {cfg.lr_scale!r} needs a loader that states its batch size")
    global_batch = batch * dist.world_size * cfg.grad_accum
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = loss_fn if loss_fn is not None else CrossEntropy(cfg.label_smoothing)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    amp_dtype = _amp_dtype(cfg, device)
    lr = scaled_lr(cfg, global_batch)
    return TrainSession(
        model=model, cfg=cfg, device=device, dist=dist, loss_fn=loss_fn,
        optimizer=build_optimizer(_trainable(model, loss_fn), cfg, lr),
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        amp_dtype=amp_dtype, lr=lr, global_batch=global_batch, steps_per_epoch=steps,
        ema=WeightAverage(model, cfg.ema_decay, cfg.ema_steps) if cfg.ema_decay else None,
    )  # fmt: skip


def _amp_dtype(cfg: TrainConfig, device: str) -> torch.dtype | None:
    """The autocast dtype on CUDA (None: full precision; AMP is a CUDA feature here)."""
    if not (cfg.amp and is_cuda(device)):
        return None
    if cfg.amp_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise EdgecvError(f"train.amp_dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; "
                          "set train.amp_dtype: float16")
    return torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16


def wrap_for_training(s: TrainSession) -> None:
    """SyncBatchNorm and DDP across ranks, torch.compile, cudnn.benchmark; positions the schedule."""
    for group in s.optimizer.param_groups:
        group["lr"] = s.lr
    s.train_model = s.model
    if s.dist.enabled:
        if is_cuda(s.device):  # SyncBatchNorm is CUDA-only in PyTorch; on CPU each rank keeps its own statistics
            s.sync_bn = convert_sync_batchnorm(s.model)
        ids = [torch.device(s.device).index or 0] if is_cuda(s.device) else None
        s.ddp = nn.parallel.DistributedDataParallel(s.model, device_ids=ids)
        s.train_model = s.ddp
    if s.cfg.compile:
        s.train_model = torch.compile(s.train_model)
    if is_cuda(s.device):
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels


def finish_session(s: TrainSession, success: bool) -> None:
    """Plain BatchNorm back in the model; the EMA weights in it when the run finished."""
    revert_sync_batchnorm(s.model, s.sync_bn)
    s.sync_bn = {}
    if success and s.ema is not None:
        s.ema.copy_to(s.model)


# --------------------------------------------------------------------------- state on disk


def save_state(s: TrainSession, path: Path, epochs_done: int, history: list[dict]) -> None:
    """Everything a resumed run needs, written atomically (rank 0 only)."""
    atomic_torch_save({
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scaler": s.scaler.state_dict(),
        "ema": s.ema.state_dict() if s.ema is not None else None,
        "epochs_done": epochs_done,
        "history": history,
        "world_size": s.dist.world_size,
        "global_batch": s.global_batch,
    }, path)  # fmt: skip


def restore_state(s: TrainSession, path: Path | None, log_path: Path | None, label: str) -> tuple[int, list[dict]]:
    """(epochs done, history) from `path` if it exists; rank 0 reads it, every rank loads the same."""
    state = None
    if s.dist.is_main and path is not None and Path(path).exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = broadcast_object(state, s.dist)
    if state is None:
        return 0, []
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scaler.load_state_dict(state["scaler"])
    if s.ema is not None and state.get("ema") is not None:
        s.ema.load_state_dict(state["ema"])
    done = state["epochs_done"]
    if s.dist.is_main:
        was = state.get("world_size", 1)
        note = f", written by {was} process(es), continued by {s.dist.world_size}" if was != s.dist.world_size else ""
        console.print(f"[yellow]resuming {label} from epoch {done + 1}/{s.cfg.epochs}[/] ({path}{note})")
        _append_jsonl(log_path, {"event": "resume", "stage": label, "epochs_done": done,
                                 "world_size": s.dist.world_size, "written_by_world_size": was})
    return done, state["history"]


# --------------------------------------------------------------------------- steps and epochs


def train_step(s: TrainSession, x: torch.Tensor, y: torch.Tensor, update: bool) -> torch.Tensor:
    """Forward and backward one batch; with `update`, step the optimizer (gradients of the batches since
    the last update are summed: gradient accumulation). Returns the batch's summed loss, detached."""
    x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
    if s.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=s.amp_dtype) if s.amp_dtype is not None else nullcontext()
    no_sync = s.ddp.no_sync() if s.ddp is not None and not update else nullcontext()  # all-reduce once per update
    with no_sync:
        with autocast:
            loss = s.loss_fn(s.train_model(x).float(), x, y)
        s.scaler.scale(loss / s.cfg.grad_accum).backward()
    if update:
        if s.cfg.grad_clip:
            s.scaler.unscale_(s.optimizer)
            nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.grad_clip)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)
        s.scheduler.step()
        if s.ema is not None:
            s.ema.step(s.model)
    return loss.detach() * len(y)


def train_one_epoch(s: TrainSession, loader: Iterable, epoch: int, progress, label: str) -> dict:
    """One pass over this rank's shard: {"loss", "images", "seconds"} (loss and images over all ranks)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)
    s.train_model.train()
    batches = s.steps_per_epoch * s.cfg.grad_accum  # a last partial accumulation is left out
    task = progress.add_task(f"{label} epoch {epoch + 1}/{s.cfg.epochs}", total=batches, status="")
    loss_sum, images = torch.zeros((), device=s.device), 0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        loss_sum += train_step(s, x, y, update=(i + 1) % s.cfg.grad_accum == 0)
        images += len(y)
        if (i + 1) % STATUS_EVERY == 0:
            _check_finite(loss_sum, label, epoch, i)
            progress.update(task, status=f"loss {loss_sum.item() / images:.4f}")
        progress.advance(task)
    if is_cuda(s.device):
        torch.cuda.synchronize(s.device)
    seconds = time.perf_counter() - t0
    progress.remove_task(task)
    _check_finite(loss_sum, label, epoch, batches)
    total_loss, total_images = all_reduce_sum([float(loss_sum), images], s.dist)
    return {"loss": total_loss / max(1, total_images), "images": int(total_images), "seconds": seconds}


def _check_finite(loss_sum: torch.Tensor, label: str, epoch: int, step: int) -> None:
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(f"{label}: loss became {loss_sum.item()} by epoch {epoch + 1} step {step}")


def run_epoch(s: TrainSession, loaders: tuple[Iterable, Iterable], epoch: int, progress, label: str,
              log_path: Path | None) -> dict:
    """Train one epoch, evaluate (the EMA weights when kept), log skipped files; the epoch's record."""
    train_loader, val_loader = loaders
    if is_cuda(s.device):
        torch.cuda.reset_peak_memory_stats(s.device)
    trained = train_one_epoch(s, train_loader, epoch, progress, label)
    t0 = time.perf_counter()
    evaluated = s.ema.module if s.ema is not None else s.model
    val = evaluate_model(evaluated, val_loader, s.device, progress, f"{label} eval", s.dist if s.dist.enabled else None)
    record = {
        "epoch": epoch + 1,
        "train_loss": round(trained["loss"], 5),
        "top1": round(val["top1"], 3),
        "top5": round(val["top5"], 3),
        "lr": s.optimizer.param_groups[0]["lr"],
        "epoch_s": round(trained["seconds"] + time.perf_counter() - t0, 2),
        "train_s": round(trained["seconds"], 2),
        "images_per_s": round(trained["images"] / max(trained["seconds"], 1e-9), 1),
        "skipped_images": log_skipped(s, loaders, label, epoch, log_path),
    }
    if is_cuda(s.device):
        record["gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(s.device) / 2**20, 1)
    return record


def log_skipped(s: TrainSession, loaders: tuple[Iterable, ...], label: str, epoch: int, log_path: Path | None) -> int:
    """Files the loaders skipped this epoch on any rank: each named once in the log; their count."""
    mine = [item for loader in loaders for item in (loader.take_skipped() if hasattr(loader, "take_skipped") else [])]
    by_rank = gather_objects(mine, s.dist)
    if s.dist.is_main:
        for rank, part in enumerate(by_rank):
            for path, why in part:
                if path in s.logged_skips:
                    continue
                s.logged_skips.add(path)
                if rank != 0:  # rank 0's loader warned already; the other ranks' consoles are quiet
                    console.print(f"warning: skipped unreadable image {path} ({why}) [rank {rank}]", markup=False)
                _append_jsonl(log_path, {"event": "skipped_image", "stage": label, "epoch": epoch + 1, "path": path,
                                         "reason": why, "rank": rank})
    return sum(len(part) for part in by_rank)


# --------------------------------------------------------------------------- fit


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    cfg: TrainConfig,
    *,
    state_path: Path | None = None,
    log_path: Path | None = None,
    device: str = "cpu",
    label: str = "train",
    loss_fn: LossFn | None = None,
    epoch_hook: Callable[[int, nn.Module], None] | None = None,
    dist_info: DistInfo | None = None,
) -> dict:
    """Train `model` in place for `cfg.epochs` epochs; return the final validation metrics.
    `loss_fn(logits, images, labels)` replaces cross-entropy (distillation passes its loss here). Under
    torchrun, `val_loader` is this rank's part of the validation set (the counts are summed)."""
    dist = dist_info or DistInfo()
    if cfg.bn_momentum is not None:  # running statistics that keep up with a short schedule
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    s = start_session(model, train_loader, cfg, device, dist, loss_fn)
    start_epoch, history = restore_state(s, state_path, log_path, label)
    s.scheduler = build_scheduler(s.optimizer, cfg, max(1, s.steps_per_epoch), start_epoch * s.steps_per_epoch)
    wrap_for_training(s)
    if dist.is_main and start_epoch < cfg.epochs:
        _announce(s, label, log_path)
    metrics, success = (history[-1] if history else None), False
    try:
        with make_progress(disable=not dist.is_main) as progress:
            for epoch in range(start_epoch, cfg.epochs):
                if epoch_hook is not None:
                    epoch_hook(epoch, model)
                metrics = run_epoch(s, (train_loader, val_loader), epoch, progress, label, log_path)
                history.append(metrics)
                if dist.is_main:
                    _report_epoch(s, metrics, label, log_path)
                    if state_path is not None:
                        save_state(s, state_path, epoch + 1, history)
            if metrics is None:  # zero epochs: just measure
                val = evaluate_model(model, val_loader, device, progress, f"{label} eval", dist if dist.enabled else None)
                metrics = {"epoch": 0, "top1": round(val["top1"], 3), "top5": round(val["top5"], 3),
                           "skipped_images": log_skipped(s, (val_loader,), label, -1, log_path)}
        success = True
    finally:
        finish_session(s, success)
    model.eval()
    return {"top1": metrics["top1"], "top5": metrics["top5"], "epochs": cfg.epochs, "history": history}


def _announce(s: TrainSession, label: str, log_path: Path | None) -> None:
    cfg = s.cfg
    scale = "" if cfg.lr_scale == "none" else (
        f" = {cfg.lr:g} x {s.global_batch}/{cfg.lr_reference_batch} ({cfg.lr_scale} scaling)")
    amp = {None: "off", torch.bfloat16: "bfloat16", torch.float16: "float16 + scaler"}[s.amp_dtype]
    console.print(f"{label}: {s.dist.world_size} process(es), global batch {s.global_batch}, lr {s.lr:.4g}{scale}, "
                  f"AMP {amp}" + (", channels_last" if cfg.channels_last else "") + (", compiled" if cfg.compile else "")
                  + (f", EMA {cfg.ema_decay}" if cfg.ema_decay else ""))
    _append_jsonl(log_path, {"event": "start", "stage": label, "world_size": s.dist.world_size,
                             "global_batch": s.global_batch, "lr": s.lr, "amp": amp, "device": s.device,
                             "steps_per_epoch": s.steps_per_epoch})


def _report_epoch(s: TrainSession, m: dict, label: str, log_path: Path | None) -> None:
    memory = f", {m['gpu_mem_mb']:.0f} MB GPU" if "gpu_mem_mb" in m else ""
    skipped = f", {m['skipped_images']} unreadable images skipped" if m["skipped_images"] else ""
    console.print(f"{label} epoch {m['epoch']}/{s.cfg.epochs}: loss {m['train_loss']:.4f}  top-1 {m['top1']:.2f}%  "
                  f"({m['epoch_s']:.0f} s, {m['images_per_s']:.0f} images/s{memory}{skipped})")
    _append_jsonl(log_path, {"event": "epoch", "stage": label, **m})
