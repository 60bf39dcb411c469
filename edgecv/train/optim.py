"""Optimizers, the learning rate for the global batch, and per-step learning-rate schedules (cosine or
step decay with warm-up, one-cycle, constant)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from edgecv.errors import EdgecvError
from edgecv.train.config import TrainConfig

# torchvision's reference RMSprop (references/classification/train.py): TensorFlow's epsilon sits inside
# the square root, so eps = sqrt(1e-3) gives PyTorch's RMSprop the same behaviour.
RMSPROP = {"alpha": 0.9, "eps": 0.0316}


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """No weight decay on biases, norm parameters and quantizer ranges (1-d tensors). `lr`: the learning
    rate after scaling for the global batch (default: cfg.lr)."""
    lr = cfg.lr if lr is None else lr
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=cfg.momentum, **RMSPROP)
    return torch.optim.AdamW(groups, lr=lr)


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The base learning rate for `global_batch` images per optimizer step: `cfg.lr` as written
    (lr_scale none), times global_batch / lr_reference_batch (linear) or its square root (sqrt)."""
    ratio = global_batch / cfg.lr_reference_batch
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scale]


def lr_factor(step: int, total: int, warmup: int, schedule: str, steps_per_epoch: int = 1,
              step_epochs: float | None = None, gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate at `step` (0-based) of `total` steps. The step schedule
    multiplies by `gamma` every `step_epochs` epochs, counted from the start (warm-up included)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        if not step_epochs:
            raise EdgecvError("schedule 'step' needs step_epochs")
        return gamma ** math.floor(step / steps_per_epoch / step_epochs + 1e-9)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, start_step: int = 0):
    """A per-optimizer-step schedule, positioned at `start_step` (resuming). The position is computed from
    the epochs done and this run's steps per epoch, so a run resumed at another world size (other
    steps per epoch) continues at the same point of its schedule."""
    total = max(1, cfg.epochs * steps_per_epoch)
    for group in optimizer.param_groups:  # the base lr is this run's, not a restored optimizer's
        group["initial_lr"] = group["lr"]
    scheduler = None
    if cfg.schedule == "onecycle":
        pct = cfg.warmup_epochs / max(1, cfg.epochs) if cfg.warmup_epochs else 0.25
        pct = min(0.5, max(pct, 2.0 / total))  # at least two warm-up steps, or OneCycleLR divides by zero
        if total >= 4:
            max_lr = [g["lr"] for g in optimizer.param_groups]
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=pct)
    if scheduler is None:
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, total, warmup, cfg.schedule, steps_per_epoch, cfg.step_epochs, cfg.gamma))
    if start_step:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            scheduler.last_epoch = min(start_step, total) - 1
            scheduler.step()
    return scheduler
