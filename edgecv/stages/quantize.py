"""The `ptq` and `qat` stages: INT8 fake-quant models for a backend, with accuracy measured on the
exported INT8 graph in ONNX Runtime (as deployed, not as simulated). For the onnxruntime backend each stage
also times INT8 against float at `batch_size`, says in one line when INT8 is the slower, and with
`ship_precision: auto` returns (ships) whichever is faster within the accuracy budget: the float model when it
wins, recorded in the stage's metrics and `precision.json`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from edgecv.compress import quantize as Q
from edgecv.compress.distill import DistillConfig
from edgecv.compress.quantize.calibrate import DEFAULT_PERCENTILE, PERCENTILE_BOUNDS
from edgecv.config import Strict, registry_choice
from edgecv.console import console
from edgecv.data.datasets import DataBundle
from edgecv.errors import EdgecvError
from edgecv.io import write_json
from edgecv.stages.base import StageConfig, StageContext, stage
from edgecv.stages.precision import choose_precision, compare_precisions, record_precision
from edgecv.stages.train import distillation, run_fit
from edgecv.train.config import TrainOverrides
from edgecv.train.distributed import DistInfo, broadcast_module_state, broadcast_object

Backend = registry_choice(lambda: Q.PROFILES)
DEFAULT_BUDGET = 0.5  # ship_precision auto: top-1 points the faster model may lose
CalibratorName = registry_choice(lambda: Q.CALIBRATORS)


class QuantConfig(Strict):
    """Keys shared by `ptq` and `qat`."""

    renamed: ClassVar[dict[str, str]] = {"target": "backend", "precision": "ship_precision",
                                         "deploy_batch": "batch_size"}
    backend: Backend = Field(  # type: ignore[valid-type]
        "onnxruntime", description="the runtime the INT8 model is quantized for (its Q/DQ placement rules)")
    calibrator: CalibratorName = "max"  # type: ignore[valid-type]
    percentile: float = Field(
        DEFAULT_PERCENTILE, gt=PERCENTILE_BOUNDS[0], lt=PERCENTILE_BOUNDS[1],
        description="calibrator percentile: % of values inside the range",
    )  # fmt: skip
    calib_batches: int = Field(8, ge=1)
    skip_layers: list[str] | str = Field(
        default_factory=list, description="layers kept in float: names, or 'auto:N' (N most sensitive)"
    )

    @field_validator("skip_layers")
    @classmethod
    def _auto(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):
            head, _, n = v.partition(":")
            if head != "auto" or not n.isdigit():
                raise ValueError(f"skip_layers must be a list of layer names or 'auto:N', got {v!r}")
        return v

    ship_precision: Literal["int8", "auto"] = Field(
        "int8", description="int8: ship INT8; auto: ship whichever of INT8 and float is faster on the backend "
        "at batch_size, within accuracy_budget (measured; onnxruntime backend)",
    )
    accuracy_budget: float = Field(
        DEFAULT_BUDGET, ge=0.0, description="ship_precision auto: top-1 points the faster model may lose"
    )
    batch_size: int | None = Field(
        None, ge=1, description="batch size INT8 and float are timed at (null: the smallest of bench.batch_sizes)"
    )

    def calibrators_used(self) -> set[str]:
        return {self.calibrator}

    @model_validator(mode="after")
    def _auto_options(self) -> QuantConfig:
        if self.accuracy_budget != DEFAULT_BUDGET and self.ship_precision != "auto":
            raise ValueError("accuracy_budget: only ship_precision 'auto' takes it")
        if self.ship_precision == "auto" and self.backend != "onnxruntime":
            raise ValueError(
                f"ship_precision auto times INT8 and float in ONNX Runtime; with backend {self.backend!r} build "
                "both on the device and compare them with edgecv bench"
            )
        return self

    def calibrator_options(self, method: str) -> dict[str, float]:
        """The options `method` takes from this config (only the percentile calibrator takes one)."""
        return {"percentile": self.percentile} if method == "percentile" else {}

    @model_validator(mode="after")
    def _percentile_needs_its_calibrator(self) -> QuantConfig:
        if self.percentile != DEFAULT_PERCENTILE and "percentile" not in self.calibrators_used():
            raise ValueError("percentile: only the 'percentile' calibrator takes it, and it is not used here")
        return self


class PTQConfig(QuantConfig, StageConfig):
    stage: ClassVar[str] = "ptq"
    calibrator: registry_choice(lambda: Q.CALIBRATORS, "best") = "best"  # type: ignore[valid-type]
    compare: list[CalibratorName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["max", "percentile", "mse", "entropy"],
        description="calibrators evaluated and reported; the best one is kept when calibrator is 'best'",
    )

    def calibrators_used(self) -> set[str]:
        return (set(self.compare) | {self.calibrator}) - {"best"}


class QATConfig(QuantConfig, TrainOverrides, StageConfig):
    stage: ClassVar[str] = "qat"
    removed: ClassVar[dict[str, str]] = {"freeze_bn_epoch": "BatchNorm is folded from the start (leave the key out)"}
    epochs: int = Field(1, ge=0)
    learnable_ranges: bool = True
    distill: DistillConfig | None = None


def sensitivity_rows(model: nn.Module, target: str, data: DataBundle, example_input: torch.Tensor,
                     metric: str = "sqnr", calib_batches: int = 4, eval_batches: int = 4) -> list[dict]:
    """Per-layer INT8 sensitivity of `model` on a few calibration and validation batches."""
    calib = data.calibration_batches(calib_batches)
    evals = []
    for x, y in data.val:
        evals.append((x, y))
        if len(evals) >= eval_batches:
            break
    return Q.layer_sensitivity(model.cpu().eval(), target, example_input, calib, evals, metric=metric)


def _dist(ctx: StageContext) -> DistInfo:
    return ctx.dist or DistInfo()


def _prepare(model: nn.Module, cfg: QuantConfig, ctx: StageContext, freeze_bn: bool = True):
    """The fake-quant model (layers to skip resolved, `auto:N` by sensitivity) and its calibration stats.
    Under torchrun rank 0 alone measures sensitivity and calibrates (the stats are None elsewhere): it
    sets the ranges and `share_ranges` sends them, so every rank quantizes identically."""
    dist = _dist(ctx)
    sens = None
    if isinstance(cfg.skip_layers, str):
        rows = sensitivity_rows(model, cfg.backend, ctx.data, ctx.spec.example_input()) if dist.is_main else None
        sens = broadcast_object(rows, dist)
        ctx.metrics["sensitivity"] = sens
        if dist.is_main:
            write_json(ctx.stage_dir / "sensitivity.json", sens)
    skip = Q.resolve_skip_layers(cfg.skip_layers, sens)
    qmodel = Q.prepare_qat(model.cpu().eval(), cfg.backend, ctx.spec.example_input(), skip_layers=skip,
                           freeze_bn=freeze_bn)
    if Q.reparam_check(qmodel) is not None:  # MobileOne & co. were fused first; the report says so
        ctx.metrics["reparameterized"] = Q.reparam_check(qmodel)
    stats = None
    if dist.is_main:
        with torch.no_grad():
            stats = Q.collect_stats(qmodel, ctx.data.calibration_batches(cfg.calib_batches))
    if skip:
        ctx.metrics["skipped_layers"] = skip
    return qmodel, stats


def share_ranges(qmodel: nn.Module, ctx: StageContext) -> None:
    """Rank 0's quantization ranges (and every other parameter and buffer) on every rank."""
    broadcast_module_state(qmodel, _dist(ctx))


def onnx_accuracy(qmodel: nn.Module, ctx: StageContext) -> dict:
    """Export `qmodel` to a scratch file and measure it in ONNX Runtime on the validation set."""
    from edgecv.bench.accuracy import evaluate
    from edgecv.bench.runners import create_runner
    from edgecv.export.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="edgecv-") as tmp:
        path = export_onnx(qmodel, Path(tmp) / "model.int8.onnx", ctx.spec.example_input())
        return evaluate(create_runner("onnxruntime", path), ctx.data.val)


@stage(PTQConfig, "INT8 post-training quantization: calibrate, compare calibrators, keep the best")
def ptq_stage(model: nn.Module, cfg: PTQConfig, ctx: StageContext) -> nn.Module:
    if Q.is_quantized(model):
        raise EdgecvError("stages: 'ptq' needs a float model, but the previous stage already quantized it")
    qmodel, stats = _prepare(model, cfg, ctx)
    if _dist(ctx).is_main:
        _compare_calibrators(qmodel, stats, cfg, ctx)
    share_ranges(qmodel, ctx)  # the ranges, and the quantizers' on/off switches (buffers), from rank 0
    return _ship(model, qmodel, cfg, ctx, int8_top1=ctx.metrics.get("top1"))


def _compare_calibrators(qmodel: nn.Module, stats: Q.CalibStats, cfg: PTQConfig, ctx: StageContext) -> None:
    """Measure each calibrator's INT8 accuracy in ONNX Runtime; keep the best (or the one asked for)."""
    results = []
    for method in dict.fromkeys([*cfg.compare, cfg.calibrator] if cfg.calibrator != "best" else cfg.compare):
        Q.apply_calibrator(qmodel, stats, method, **cfg.calibrator_options(method))
        acc = onnx_accuracy(qmodel, ctx)
        results.append({"calibrator": method, "top1": round(acc["top1"], 3), "top5": round(acc["top5"], 3)})
        console.print(f"PTQ {method:>10}: INT8 top-1 in ONNX Runtime {acc['top1']:.2f}%")
    best = max(results, key=lambda r: r["top1"])["calibrator"] if cfg.calibrator == "best" else cfg.calibrator
    Q.apply_calibrator(qmodel, stats, best, **cfg.calibrator_options(best))
    chosen = next(r for r in results if r["calibrator"] == best)
    ctx.metrics.update(calibrators=results, calibrator=best, top1=chosen["top1"], top5=chosen["top5"],
                       target=cfg.backend, accuracy_backend="onnxruntime")


def _ship(float_model: nn.Module, qmodel: nn.Module, cfg: QuantConfig, ctx: StageContext,
          int8_top1: float | None, before_training: bool = False) -> nn.Module:
    """INT8 against float on the backend (onnxruntime): the verdict line, and for ship_precision auto the model that
    ships. `before_training` (QAT): only speed is known yet; a float win skips the training. Under torchrun,
    rank 0 measures and decides; every rank ships what it chose."""
    if cfg.backend != "onnxruntime":
        return qmodel  # timed on the device (edgecv bench), not here
    auto = cfg.ship_precision == "auto"
    dist = _dist(ctx)
    if not dist.is_main:
        chosen = broadcast_object(None, dist)
        return float_model if auto and chosen == "float" else qmodel
    batch = cfg.batch_size or min(ctx.recipe.bench.batch_sizes)
    cmp = compare_precisions(float_model, qmodel, ctx, batch, int8_top1, with_accuracy=auto,
                             time_ms=ctx.time_precisions)
    chosen, why = choose_precision(cmp, cfg.accuracy_budget) if auto else ("int8", "ship_precision: int8 was asked")
    broadcast_object(chosen, dist)
    if before_training and chosen == "int8":
        return qmodel  # decided once QAT has trained it
    console.print(("[yellow]" if cmp.ratio > 1 else "") + cmp.verdict() + ("[/]" if cmp.ratio > 1 else ""))
    record_precision(ctx, cmp, cfg.ship_precision, chosen, why, cfg.accuracy_budget if auto else None)
    if not auto:
        return qmodel
    console.print(f"ship_precision auto: {chosen} ships ({why})")
    if chosen == "float":
        ctx.metrics.update(top1=cmp.float_top1, shipped="float")
        return float_model
    return qmodel


def _qat_model(model: nn.Module, cfg: QATConfig, ctx: StageContext) -> nn.Module:
    """The model QAT starts from, BatchNorm folded: the PTQ stage's calibrated model, or a freshly calibrated
    one."""
    if Q.is_quantized(model):
        ptq_target = Q.quant_spec(model).target
        if ptq_target != cfg.backend:
            raise EdgecvError(f"qat.backend {cfg.backend!r} differs from the ptq stage's backend {ptq_target!r}")
        return model  # continue from the PTQ stage's calibrated ranges (BatchNorm already folded)
    qmodel, stats = _prepare(model, cfg, ctx, freeze_bn=True)
    if stats is not None:
        Q.apply_calibrator(qmodel, stats, cfg.calibrator, **cfg.calibrator_options(cfg.calibrator))
    share_ranges(qmodel, ctx)
    return qmodel


@stage(QATConfig, "INT8 quantization-aware training from calibrated ranges")
def qat_stage(model: nn.Module, cfg: QATConfig, ctx: StageContext) -> nn.Module:
    torch.manual_seed(ctx.recipe.seed + ctx.index)
    qmodel = _qat_model(model, cfg, ctx)
    float_model = model if not Q.is_quantized(model) else ctx.load("parent")
    if cfg.ship_precision == "auto":  # speed does not change with training: a float win needs no QAT
        shipped = _ship(float_model, qmodel, cfg, ctx, int8_top1=None, before_training=True)
        if shipped is float_model:
            ctx.metrics.update(epochs=0, target=cfg.backend, accuracy_backend="onnxruntime")
            return float_model
    Q.set_learnable_ranges(qmodel, cfg.learnable_ranges)

    train_cfg = cfg.merged(ctx.recipe.train)
    result = run_fit(qmodel, train_cfg, ctx, "qat", distillation(cfg, ctx, train_cfg))
    qmodel = qmodel.cpu().eval()
    if _dist(ctx).is_main:  # the others' metrics are not written anywhere
        acc = onnx_accuracy(qmodel, ctx)
        ctx.metrics.update(top1=round(acc["top1"], 3), top5=round(acc["top5"], 3), accuracy_backend="onnxruntime")
    ctx.metrics.update(torch_top1=result["top1"], epochs=result["epochs"], target=cfg.backend)
    if result.get("history"):
        ctx.metrics["history"] = result["history"]
    return _ship(float_model, qmodel, cfg, ctx, int8_top1=ctx.metrics["top1"])
