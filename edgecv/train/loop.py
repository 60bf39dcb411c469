"""The training loop shared by baseline training, fine-tuning, distillation and QAT.

Resumable: the full state (model, optimizer, schedule, scaler, epoch) is saved atomically after every
epoch to `state_path`; calling `fit` again with the same path continues from the last finished epoch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgecv.console import console, make_progress
from edgecv.io import atomic_torch_save
from edgecv.train.config import TrainConfig
from edgecv.train.distributed import DistInfo, all_reduce_mean
from edgecv.train.optim import build_optimizer, build_scheduler

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CrossEntropy(nn.Module):
    """The default loss: cross-entropy with label smoothing, as a `LossFn`."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


def evaluate_model(model: nn.Module, loader: Iterable, device: str = "cpu", progress=None, label: str = "eval") -> dict:
    """Top-1 / top-5 accuracy (%) of a torch model over a loader, on `device`."""
    from edgecv.bench.accuracy import evaluate

    was_training = model.training
    model.to(device).eval()

    @torch.no_grad()
    def predict(images: torch.Tensor) -> np.ndarray:
        return model(torch.as_tensor(images).to(device, non_blocking=True)).float().cpu().numpy()

    task = progress.add_task(label, total=len(loader), status="") if progress is not None else None
    try:
        return evaluate(predict, loader, progress=(lambda n: progress.advance(task, n)) if task is not None else None)
    finally:
        if task is not None:
            progress.remove_task(task)
        model.train(was_training)


def _append_jsonl(path: Path | None, record: dict) -> None:
    if path is None:
        return
    with open(path, "a") as f:  # an append-only log; a torn last line is tolerated by readers
        f.write(json.dumps(record) + "\n")


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
    `loss_fn(logits, images, labels)` replaces cross-entropy (distillation passes its loss here)."""
    dist_info = dist_info or DistInfo()
    model.to(device)
    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if device.startswith("cuda") else None
        )
    if loss_fn is None:
        loss_fn = CrossEntropy(cfg.label_smoothing)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    trainable = nn.ModuleList([model, loss_fn]) if isinstance(loss_fn, nn.Module) else model  # KD adapters
    optimizer = build_optimizer(trainable, cfg)
    steps = len(train_loader)
    scheduler = build_scheduler(optimizer, cfg, steps)
    use_amp = cfg.amp and device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, history = 0, []
    if state_path is not None and Path(state_path).exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epochs_done"], state["history"]
        if dist_info.is_main:
            console.print(f"[yellow]resuming {label} from epoch {start_epoch + 1}/{cfg.epochs}[/] ({state_path})")
        _append_jsonl(log_path, {"event": "resume", "stage": label, "epochs_done": start_epoch})

    metrics = history[-1] if history else None
    with make_progress(disable=not dist_info.is_main) as progress:
        for epoch in range(start_epoch, cfg.epochs):
            if epoch_hook is not None:
                epoch_hook(epoch, model)
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            train_model.train()
            t0 = time.perf_counter()
            total_loss, seen = 0.0, 0
            task = progress.add_task(f"{label} epoch {epoch + 1}/{cfg.epochs}", total=steps, status="")
            for step, (x, y) in enumerate(train_loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                amp_ctx = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
                with amp_ctx:
                    loss = loss_fn(train_model(x).float(), x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{label}: loss became {loss.item()} at epoch {epoch + 1} step {step}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total_loss += loss.item() * len(y)
                seen += len(y)
                if step % 10 == 0:
                    progress.update(task, status=f"loss {total_loss / seen:.4f}")
                progress.advance(task)
            progress.remove_task(task)
            train_loss = all_reduce_mean(total_loss / max(1, seen), dist_info)
            val = evaluate_model(model, val_loader, device, progress, label=f"{label} eval")
            metrics = {
                "epoch": epoch + 1,
                "train_loss": round(train_loss, 5),
                "top1": round(val["top1"], 3),
                "top5": round(val["top5"], 3),
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_s": round(time.perf_counter() - t0, 2),
            }
            history.append(metrics)
            if dist_info.is_main:
                console.print(
                    f"{label} epoch {epoch + 1}/{cfg.epochs}: loss {train_loss:.4f}  "
                    f"top-1 {val['top1']:.2f}%  ({metrics['epoch_s']:.0f} s)"
                )
                _append_jsonl(log_path, {"event": "epoch", "stage": label, **metrics})
                if state_path is not None:
                    atomic_torch_save(
                        {
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(),
                            "epochs_done": epoch + 1,
                            "history": history,
                        },
                        state_path,
                    )
        if metrics is None:  # zero epochs: just measure
            val = evaluate_model(model, val_loader, device, progress, label=f"{label} eval")
            metrics = {"epoch": 0, "top1": round(val["top1"], 3), "top5": round(val["top5"], 3)}
    model.eval()
    return {"top1": metrics["top1"], "top5": metrics["top5"], "epochs": cfg.epochs, "history": history}
