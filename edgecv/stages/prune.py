"""The `prune` stage: structured channel pruning with torch-pruning."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from edgecv.compress.prune import TAYLOR_BATCHES, PruneConfig, prune_model
from edgecv.console import console
from edgecv.stages.base import StageConfig, StageContext, stage
from edgecv.train.loop import evaluate_model


class PruneStageConfig(PruneConfig, StageConfig):
    stage: ClassVar[str] = "prune"


@stage(PruneStageConfig, "remove channels with torch-pruning (ratio or MACs target)")
def prune_stage(model: nn.Module, cfg: PruneStageConfig, ctx: StageContext) -> nn.Module:
    batches = []
    if cfg.importance == "taylor":
        for x, y in ctx.data.calib:
            batches.append((x, y))
            if len(batches) >= (cfg.taylor_batches or TAYLOR_BATCHES):
                break
    pruned, info = prune_model(model.cpu(), cfg, ctx.spec.example_input(), batches)
    shared = ctx.dist if ctx.dist is not None and ctx.dist.enabled else None
    acc = evaluate_model(pruned, ctx.data.eval_part if shared else ctx.data.val, ctx.device, dist_info=shared)
    ctx.metrics.update(info, top1=acc["top1"], top5=acc["top5"])
    console.print(
        f"pruned at ratio {info['ratio']}: MACs {info['macs_before']:,} -> {info['macs_after']:,} "
        f"({100 * info['macs_kept']:.1f}% kept), params {info['params_before']:,} -> {info['params_after']:,}; "
        f"top-1 before fine-tuning {acc['top1']:.2f}%"
    )
    return pruned
