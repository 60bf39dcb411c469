"""The baseline (`train`) and `finetune` stages: the one training loop, with distillation when asked."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from edgecv.compress.distill import DistillationLoss, DistillConfig, torchvision_teacher
from edgecv.console import console
from edgecv.stages.base import StageConfig, StageContext, stage
from edgecv.train.config import TrainConfig, TrainOverrides
from edgecv.train.loop import LossFn, fit


class TrainStageConfig(TrainConfig, StageConfig):
    """The recipe's `train` section, run as stage 00-train."""

    stage: ClassVar[str] = "train"


class FinetuneConfig(TrainOverrides, StageConfig):
    stage: ClassVar[str] = "finetune"
    distill: DistillConfig | None = None
    compare_without_distill: bool = Field(
        False, description="also run the same fine-tune without distillation; both results go in the report"
    )

    @model_validator(mode="after")
    def _comparison_needs_distill(self) -> FinetuneConfig:
        if self.compare_without_distill and self.distill is None:
            raise ValueError("compare_without_distill: this finetune has no 'distill' section to compare with")
        return self


def distillation(cfg: FinetuneConfig, ctx: StageContext, train_cfg: TrainConfig,
                 student: nn.Module | None = None) -> LossFn | None:
    """The distillation loss a stage asked for (its teacher loaded), or None for plain cross-entropy."""
    if cfg.distill is None:
        return None
    name = cfg.distill.teacher
    teacher = torchvision_teacher(name) if name.startswith("torchvision:") else ctx.load(name)
    return DistillationLoss(teacher, cfg.distill, train_cfg.label_smoothing, student=student,
                            example_input=ctx.spec.example_input())


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
    from edgecv.models import build_with_weights

    torch.manual_seed(ctx.recipe.seed)
    m = ctx.recipe.model
    model, loaded = build_with_weights(ctx.spec.name, m.weights, m.head, **ctx.spec.build_kwargs())
    if loaded is not None:
        console.print(loaded.summary(), markup=False, highlight=False)
        ctx.metrics["weights"] = loaded.to_dict()
        if loaded.head == "new" and cfg.epochs == 0:
            console.print("[yellow]warning: model.head: new with train.epochs 0: the baseline's classifier is "
                          "untrained (set train.epochs to train it)[/]")
    elif cfg.epochs == 0 and not m.weights:
        console.print("[yellow]warning: train.epochs is 0 and model.weights is not set: the baseline is an "
                      "untrained model (set model.weights=PATH to compress your own)[/]")
    train_metrics(ctx, run_fit(model, cfg, ctx, "train"))
    return model.cpu()


@stage(FinetuneConfig, "fine-tune, optionally distilling from the baseline")
def finetune_stage(model: nn.Module, cfg: FinetuneConfig, ctx: StageContext) -> nn.Module:
    train_cfg = cfg.merged(ctx.recipe.train)
    control = copy.deepcopy(model) if cfg.compare_without_distill else None
    torch.manual_seed(ctx.recipe.seed + ctx.index)
    loss_fn = distillation(cfg, ctx, train_cfg, model)
    try:
        train_metrics(ctx, run_fit(model, train_cfg, ctx, "finetune", loss_fn))
    finally:
        if isinstance(loss_fn, DistillationLoss):
            loss_fn.close()
    if control is not None:
        torch.manual_seed(ctx.recipe.seed + ctx.index)  # the same start, seed and schedule; only the loss differs
        plain = fit(control, ctx.data.train, ctx.data.val, train_cfg, state_path=ctx.stage_dir / "state.no-distill.pt",
                    log_path=ctx.log_path, device=ctx.device, label="finetune without distillation",
                    dist_info=ctx.dist)
        ctx.metrics["distill_comparison"] = [
            {"finetune": "with distillation", "teacher": cfg.distill.teacher, "top1": ctx.metrics["top1"],
             "top5": ctx.metrics["top5"]},
            {"finetune": "without distillation", "teacher": None, "top1": plain["top1"], "top5": plain["top5"]},
        ]
    return model.cpu()
