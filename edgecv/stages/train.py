"""The baseline (`train`) and `finetune` stages: the one training loop, with distillation when asked."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from edgecv.compress.distill import DistillationLoss, DistillConfig
from edgecv.stages.base import StageConfig, StageContext, stage
from edgecv.train.config import TrainConfig, TrainOverrides
from edgecv.train.loop import LossFn, fit


class TrainStageConfig(TrainConfig, StageConfig):
    """The recipe's `train` section, run as stage 00-train."""

    stage: ClassVar[str] = "train"


class FinetuneConfig(TrainOverrides, StageConfig):
    stage: ClassVar[str] = "finetune"
    distill: DistillConfig | None = None


def distillation(cfg: FinetuneConfig, ctx: StageContext, train_cfg: TrainConfig) -> LossFn | None:
    """The distillation loss a stage asked for (its teacher loaded), or None for plain cross-entropy."""
    if cfg.distill is None:
        return None
    return DistillationLoss(ctx.load(cfg.distill.teacher), cfg.distill, train_cfg.label_smoothing)


def train_metrics(ctx: StageContext, result: dict) -> None:
    ctx.metrics.update(top1=result["top1"], top5=result["top5"], epochs=result["epochs"])
    if result.get("history"):
        ctx.metrics["history"] = result["history"]


def run_fit(model: nn.Module, cfg: TrainConfig, ctx: StageContext, label: str, loss_fn: LossFn | None = None,
            **kwargs) -> dict:
    """`fit` with the stage's data, device, resumable state file, log and process group (each rank
    evaluates its part of the validation set)."""
    return fit(model, ctx.data.train, ctx.data.eval_part, cfg, state_path=ctx.state_path, log_path=ctx.log_path,
               device=ctx.device, label=label, loss_fn=loss_fn, dist_info=ctx.dist, **kwargs)


@stage(TrainStageConfig, "train the baseline from the recipe's model and train sections", listed=False)
def train_stage(model: nn.Module | None, cfg: TrainConfig, ctx: StageContext) -> nn.Module:
    from edgecv.models import build_model

    torch.manual_seed(ctx.recipe.seed)
    model = build_model(ctx.spec.name, weights=ctx.recipe.model.weights, **ctx.spec.build_kwargs())
    train_metrics(ctx, run_fit(model, cfg, ctx, "train"))
    return model.cpu()


@stage(FinetuneConfig, "fine-tune, optionally distilling from the baseline")
def finetune_stage(model: nn.Module, cfg: FinetuneConfig, ctx: StageContext) -> nn.Module:
    torch.manual_seed(ctx.recipe.seed + ctx.index)
    train_cfg = cfg.merged(ctx.recipe.train)
    train_metrics(ctx, run_fit(model, train_cfg, ctx, "finetune", distillation(cfg, ctx, train_cfg)))
    return model.cpu()
