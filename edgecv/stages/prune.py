"""The `prune` stage: structured channel pruning with torch-pruning, to a ratio, a MACs fraction or a
latency measured on the target backend (through the same measurement path as the report), optionally in
steps with fine-tuning between them."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from edgecv.compress.prune import (
    TAYLOR_BATCHES,
    GroupPruner,
    MeasureMs,
    PruneConfig,
    latency_table,
    latency_weights,
    prune_model,
    prune_to_latency,
)
from edgecv.compress.reparam import reparameterize
from edgecv.console import console
from edgecv.stages.base import StageConfig, StageContext, stage
from edgecv.train.config import TrainOverrides
from edgecv.train.loop import evaluate_model

SEARCH_WARMUP, SEARCH_RUNS, SEARCH_ROUNDS = 10, 30, 3  # blocks per candidate in a latency search


class PruneStageConfig(PruneConfig, StageConfig):
    stage: ClassVar[str] = "prune"
    renamed: ClassVar[dict[str, str]] = {"iterative_steps": "steps"}
    steps: int = Field(1, ge=1, description="prune in this many steps, fine-tuning between them (the goal is "
                       "reached in equal steps: ratio and target_macs geometrically, a latency on the last step)")
    finetune_between: TrainOverrides | None = Field(
        None, description="training between steps (default: 1 epoch with the recipe's train settings)"
    )


def latency_measurer(cfg: PruneConfig, example_input: torch.Tensor, runs: int = SEARCH_RUNS,
                     rounds: int = SEARCH_ROUNDS, threads: int | None = None) -> MeasureMs:
    """A function measuring models' median latency on `cfg.backend` at `cfg.measure_precision` and
    `cfg.batch_size` with `edgecv.bench.measure`, all of them together in blocks (INT8: edgecv's Q/DQ export, calibrated
    with max ranges on random inputs: the ranges do not change the speed)."""
    from edgecv.bench.measure import BenchSettings, Subject, measure
    from edgecv.bench.runners import create_runner
    from edgecv.export.onnx import export_onnx

    def measure_ms(models: list[nn.Module]) -> list[float]:
        with tempfile.TemporaryDirectory(prefix="edgecv-latency-") as tmp:
            subjects = []
            for i, model in enumerate(models):
                target = model.eval()
                if cfg.measure_precision == "int8":
                    from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat

                    target = prepare_qat(model, "onnxruntime", example_input)
                    calib = [torch.randn(4, *example_input.shape[1:], generator=torch.Generator().manual_seed(j))
                             for j in range(2)]
                    apply_calibrator(target, collect_stats(target, calib), "max")
                runner_input: nn.Module | Path = target
                if cfg.backend != "torch":
                    runner_input = export_onnx(target, Path(tmp) / f"candidate{i}.onnx", example_input[:1])
                elif cfg.measure_precision == "int8":
                    raise ValueError("prune.measure_precision int8 is measured in ONNX Runtime, not torch")
                runner = create_runner(cfg.backend, runner_input, threads=threads)
                subjects.append(Subject(model=f"candidate {i}", runner=runner, format=cfg.backend))
            settings = BenchSettings((cfg.batch_size,), SEARCH_WARMUP, runs, rounds, accuracy=False, memory=False,
                                     frames=False)  # the model alone, as the target means it
            rows = measure(subjects, settings, tuple(example_input.shape[1:]))
        return [row.latency[0].p50_ms for row in rows]

    return measure_ms


def _taylor_batches(cfg: PruneStageConfig, ctx: StageContext) -> list:
    batches = []
    if cfg.importance == "taylor":
        for x, y in ctx.data.calib:
            batches.append((x, y))
            if len(batches) >= TAYLOR_BATCHES:
                break
    return batches


def _rank0_measures(measure_ms, ctx: StageContext):
    """Under torchrun, rank 0 times the candidates and every rank gets its figures, so all ranks take the same
    steps of the search and prune the same channels."""
    dist = ctx.dist
    if dist is None or not dist.enabled:
        return measure_ms
    from edgecv.train.distributed import broadcast_object

    def shared(models: list[nn.Module]) -> list[float]:
        return broadcast_object(measure_ms(models) if dist.is_main else None, dist)

    return shared


def _prune_once(model: nn.Module, cfg: PruneStageConfig, ctx: StageContext) -> tuple[nn.Module, dict]:
    example = ctx.spec.example_input()
    batches = _taylor_batches(cfg, ctx)
    weights, measure_ms = None, None
    if cfg.target_latency_ms is not None or cfg.allocation == "latency":
        measure_ms = _rank0_measures(latency_measurer(cfg, example), ctx)
    if cfg.allocation == "latency":
        table = latency_table(model, cfg, example, measure_ms)
        weights = latency_weights(GroupPruner(model, cfg, example, []).groups, table)
        ctx.metrics["latency_table"] = {root: {str(w): round(ms, 4) for w, ms in row.items()}
                                        for root, row in table.items()}
        ctx.metrics["latency_weights"] = {root: round(w, 3) for root, w in weights.items()}
    if cfg.target_latency_ms is None:
        return prune_model(model, cfg, example, batches, weights)
    pruned, info, search = prune_to_latency(model, cfg, example, measure_ms, batches, weights)
    ctx.metrics["latency_search"] = search.rows(cfg)
    console.print(f"latency search: {info['latency_ms']:.3f} ms for a target of {info['target_latency_ms']:g} ms "
                  f"on {cfg.backend} {cfg.measure_precision} batch {cfg.batch_size} after {info['trials']} candidates"
                  + (f" ({search.reason})" if search.reason else ""))
    if search.reason:
        info["search_note"] = search.reason
    return pruned, info


def _step_config(cfg: PruneStageConfig, step: int) -> PruneStageConfig:
    """The goal of step `step` of `cfg.steps`: ratio and MACs fraction reached in equal steps of the
    original model (a later step prunes the already pruned model further)."""
    if cfg.steps == 1:
        return cfg
    f = step / cfg.steps
    if cfg.ratio is not None:  # channels kept shrink geometrically to (1 - ratio)
        done = 1 - (1 - cfg.ratio) ** ((step - 1) / cfg.steps)
        now = 1 - (1 - cfg.ratio) ** f
        return cfg.model_copy(update={"ratio": 1 - (1 - now) / (1 - done)})
    if cfg.target_macs is not None:
        done, now = cfg.target_macs ** ((step - 1) / cfg.steps), cfg.target_macs ** f
        return cfg.model_copy(update={"target_macs": now / done})
    return cfg  # a latency target is searched on the last step only


@stage(PruneStageConfig, "remove channels with torch-pruning (ratio, MACs or measured latency target)")
def prune_stage(model: nn.Module, cfg: PruneStageConfig, ctx: StageContext) -> nn.Module:
    base_macs = base_params = None
    model, fused = reparameterize(model.cpu(), ctx.spec.example_input())
    if fused is not None:  # torch-pruning cannot follow MobileOne-style train-time branches: fuse first
        ctx.metrics["reparameterized"] = {**fused.to_dict(), "note": "fused before pruning"}
        console.print(f"reparameterized {fused.blocks} blocks before pruning (SQNR {fused.sqnr_db:.0f} dB)")
    steps = []
    for step in range(1, cfg.steps + 1):
        goal = _step_config(cfg, step)
        if cfg.steps > 1 and cfg.target_latency_ms is not None and step < cfg.steps:
            goal = cfg.model_copy(update={"target_latency_ms": None,
                                          "ratio": 1 - 0.5 ** (step / cfg.steps)})  # halve channels by the end
        model, info = _prune_once(model, goal, ctx)
        base_macs, base_params = base_macs or info["macs_before"], base_params or info["params_before"]
        if step < cfg.steps:
            model = _finetune_between(model, cfg, ctx, step)
        steps.append({"step": step, "macs": info["macs_after"], "params": info["params_after"]})
    info.update(macs_before=base_macs, params_before=base_params, macs_kept=round(info["macs_after"] / base_macs, 4))
    if cfg.steps > 1:
        info["steps"] = steps
    shared = ctx.dist if ctx.dist is not None and ctx.dist.enabled else None
    acc = evaluate_model(model, ctx.data.eval_part if shared else ctx.data.val, ctx.device, dist_info=shared)
    ctx.metrics.update(info, top1=acc["top1"], top5=acc["top5"])
    console.print(
        f"pruned at ratio {info['ratio']}: MACs {info['macs_before']:,} -> {info['macs_after']:,} "
        f"({100 * info['macs_kept']:.1f}% kept), params {info['params_before']:,} -> {info['params_after']:,}; "
        f"top-1 before fine-tuning {acc['top1']:.2f}%"
    )
    return model


def _finetune_between(model: nn.Module, cfg: PruneStageConfig, ctx: StageContext, step: int) -> nn.Module:
    """Train the partly pruned model (its own state file per step, so an interrupted step resumes)."""
    from edgecv.train.loop import fit

    overrides = cfg.finetune_between or TrainOverrides(epochs=1)
    train_cfg = overrides.merged(ctx.recipe.train)
    torch.manual_seed(ctx.recipe.seed + 100 * ctx.index + step)
    result = fit(model, ctx.data.train, ctx.data.val, train_cfg, state_path=ctx.stage_dir / f"state.step{step}.pt",
                 log_path=ctx.log_path, device=ctx.device, label=f"prune step {step}/{cfg.steps}",
                 dist_info=ctx.dist)
    console.print(f"prune step {step}/{cfg.steps}: top-1 {result['top1']:.2f}% after fine-tuning")
    return model.cpu()
