"""Pipeline stages. Each is a plain function `run(model, cfg, ctx) -> model`, registered by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgecv.console import console
from edgecv.data import DataBundle
from edgecv.errors import EdgecvError
from edgecv.io import write_json
from edgecv.pipeline import StageContext, is_quantized
from edgecv.recipe import (
    ExportConfig,
    FinetuneConfig,
    PruneConfig,
    PTQConfig,
    QATConfig,
    StageConfig,
    TrainConfig,
)
from edgecv.registry import Registry
from edgecv.train.checkpoint import model_shapes
from edgecv.train.loop import evaluate_model, fit


@dataclass(frozen=True)
class Stage:
    name: str
    config: type
    run: Callable[[nn.Module | None, StageConfig, StageContext], nn.Module]
    summary: str


STAGES: Registry[Stage] = Registry("stage")


def stage(name: str, config: type, summary: str):
    def wrap(fn):
        STAGES.register(name, Stage(name, config, fn, summary))
        return fn

    return wrap


def _train_metrics(ctx: StageContext, result: dict) -> None:
    ctx.metrics.update(top1=result["top1"], top5=result["top5"], epochs=result["epochs"])
    if result.get("history"):
        ctx.metrics["history"] = result["history"]


@stage("train", TrainConfig, "train the baseline from the recipe's model and train sections")
def train_stage(model: nn.Module | None, cfg: TrainConfig, ctx: StageContext) -> nn.Module:
    from edgecv.models import build_model

    torch.manual_seed(ctx.recipe.seed)
    spec = ctx.model_spec
    model = build_model(
        spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"],
        weights=ctx.recipe.model.weights, width=spec["width"], small_input_stem=spec["small_input_stem"],
        stem_stride=spec.get("stem_stride"),
    )
    result = fit(model, ctx.data.train, ctx.data.val, cfg, state_path=ctx.state_path, log_path=ctx.log_path,
                 device=ctx.device, label="train", dist_info=ctx.dist)
    _train_metrics(ctx, result)
    return model.cpu()


@stage("prune", PruneConfig, "remove channels with torch-pruning (ratio or MACs target)")
def prune_stage(model: nn.Module, cfg: PruneConfig, ctx: StageContext) -> nn.Module:
    from edgecv.compress.prune import prune_model

    batches = []
    if cfg.importance == "taylor":
        for x, y in ctx.data.calib:
            batches.append((x, y))
            if len(batches) >= cfg.taylor_batches:
                break
    pruned, info = prune_model(model.cpu(), cfg, ctx.example_input(), batches)
    acc = evaluate_model(pruned, ctx.data.val, ctx.device)
    ctx.metrics.update(info, top1=acc["top1"], top5=acc["top5"])
    console.print(
        f"pruned at ratio {info['ratio']}: MACs {info['macs_before']:,} -> {info['macs_after']:,} "
        f"({100 * info['macs_kept']:.1f}% kept), params {info['params_before']:,} -> {info['params_after']:,}; "
        f"top-1 before fine-tuning {acc['top1']:.2f}%"
    )
    return pruned


def _teacher(cfg, ctx: StageContext) -> nn.Module | None:
    if cfg.distill is None:
        return None
    teacher = ctx.load(cfg.distill.teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@stage("finetune", FinetuneConfig, "fine-tune, optionally distilling from the baseline")
def finetune_stage(model: nn.Module, cfg: FinetuneConfig, ctx: StageContext) -> nn.Module:
    torch.manual_seed(ctx.recipe.seed + ctx.index)
    train_cfg = cfg.merged(ctx.recipe.train)
    result = fit(model, ctx.data.train, ctx.data.val, train_cfg, state_path=ctx.state_path, log_path=ctx.log_path,
                 device=ctx.device, label="finetune", teacher=_teacher(cfg, ctx), distill=cfg.distill,
                 dist_info=ctx.dist)
    _train_metrics(ctx, result)
    return model.cpu()


# --------------------------------------------------------------------------- quantization


def _skip_layers(model: nn.Module, cfg, ctx: StageContext) -> tuple[list[str], list[dict] | None]:
    from edgecv.compress import quantize as Q

    if isinstance(cfg.skip_layers, list):
        unknown = [n for n in cfg.skip_layers if n not in Q.quantizable_layers(model)]
        if unknown:
            raise EdgecvError(
                f"skip_layers: {unknown[0]!r} is not a quantizable layer; choose from: "
                f"{', '.join(Q.quantizable_layers(model)[:12])}, ..."
            )
        return list(cfg.skip_layers), None
    rows = sensitivity_rows(model, cfg.target, ctx.data, ctx.example_input())
    return Q.resolve_skip_layers(cfg.skip_layers, rows), rows


def sensitivity_rows(model: nn.Module, target: str, data: DataBundle, example_input: torch.Tensor,
                     metric: str = "sqnr", calib_batches: int = 4, eval_batches: int = 4) -> list[dict]:
    from edgecv.compress import quantize as Q

    calib = data.calibration_batches(calib_batches)
    evals = []
    for x, y in data.val:
        evals.append((x, y))
        if len(evals) >= eval_batches:
            break
    return Q.layer_sensitivity(model.cpu().eval(), target, example_input, calib, evals, metric=metric)


def _prepare(model: nn.Module, cfg, ctx: StageContext, freeze_bn: bool = True):
    from edgecv.compress import quantize as Q

    skip, sens = _skip_layers(model, cfg, ctx)
    qmodel = Q.prepare_qat(model.cpu().eval(), cfg.target, ctx.example_input(), skip_layers=skip, freeze_bn=freeze_bn)
    qmodel._edgecv_float_shapes = model_shapes(model)  # what the checkpoint rebuilds before re-quantizing
    with torch.no_grad():
        stats = Q.collect_stats(qmodel, ctx.data.calibration_batches(cfg.calib_batches))
    if skip:
        ctx.metrics["skipped_layers"] = skip
    if sens is not None:
        ctx.metrics["sensitivity"] = sens
        write_json(ctx.stage_dir / "sensitivity.json", sens)
    return qmodel, stats


def _onnx_top1(qmodel: nn.Module, ctx: StageContext) -> dict:
    """Export `qmodel` to a scratch file and measure it in ONNX Runtime on the validation set: INT8
    accuracy as deployed, not as simulated."""
    import tempfile

    from edgecv.bench.accuracy import evaluate
    from edgecv.bench.runners import create_runner
    from edgecv.export.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="edgecv-") as tmp:
        path = export_onnx(qmodel, Path(tmp) / "model.int8.onnx", ctx.example_input())
        runner = create_runner("onnxruntime", path)
        return evaluate(runner, ((x.numpy(), y.numpy()) for x, y in ctx.data.val), total=len(ctx.data.val))


@stage("ptq", PTQConfig, "INT8 post-training quantization: calibrate, compare calibrators, keep the best")
def ptq_stage(model: nn.Module, cfg: PTQConfig, ctx: StageContext) -> nn.Module:
    from edgecv.compress import quantize as Q

    if is_quantized(model):
        raise EdgecvError("stages: 'ptq' needs a float model, but the previous stage already quantized it")
    qmodel, stats = _prepare(model, cfg, ctx)
    compare = list(dict.fromkeys(cfg.compare + ([cfg.calibrator] if cfg.calibrator != "best" else [])))
    results = []
    for method in compare:
        Q.apply_calibrator(qmodel, stats, method, percentile=cfg.percentile)
        acc = _onnx_top1(qmodel, ctx)
        results.append({"calibrator": method, "top1": round(acc["top1"], 3), "top5": round(acc["top5"], 3)})
        console.print(f"PTQ {method:>10}: INT8 top-1 in ONNX Runtime {acc['top1']:.2f}%")
    best = max(results, key=lambda r: r["top1"])["calibrator"] if cfg.calibrator == "best" else cfg.calibrator
    Q.apply_calibrator(qmodel, stats, best, percentile=cfg.percentile)
    chosen = next(r for r in results if r["calibrator"] == best)
    ctx.metrics.update(calibrators=results, calibrator=best, top1=chosen["top1"], top5=chosen["top5"],
                       target=cfg.target, accuracy_backend="onnxruntime")
    return qmodel


@stage("qat", QATConfig, "INT8 quantization-aware training from calibrated ranges")
def qat_stage(model: nn.Module, cfg: QATConfig, ctx: StageContext) -> nn.Module:
    from edgecv.compress import quantize as Q

    torch.manual_seed(ctx.recipe.seed + ctx.index)
    freeze_epoch = cfg.freeze_bn_epoch
    if is_quantized(model):
        qmodel = model  # continue from the PTQ stage's calibrated ranges
        ptq_target = Q.quant_spec(qmodel)["target"]
        if ptq_target != cfg.target:
            raise EdgecvError(f"qat.target {cfg.target!r} differs from the ptq stage's target {ptq_target!r}")
        freeze_epoch = None
    else:
        qmodel, stats = _prepare(model, cfg, ctx, freeze_bn=freeze_epoch in (None, 0))
        Q.apply_calibrator(qmodel, stats, cfg.calibrator, percentile=cfg.percentile)
    Q.set_learnable_ranges(qmodel, cfg.learnable_ranges)

    def hook(epoch: int, m: nn.Module) -> None:
        if freeze_epoch is not None and freeze_epoch > 0 and epoch == freeze_epoch:
            Q.freeze_bn_stats(m)
            console.print(f"qat: BatchNorm statistics frozen from epoch {epoch + 1}")

    train_cfg = cfg.merged(ctx.recipe.train)
    result = fit(qmodel, ctx.data.train, ctx.data.val, train_cfg, state_path=ctx.state_path, log_path=ctx.log_path,
                 device=ctx.device, label="qat", teacher=_teacher(cfg, ctx), distill=cfg.distill, epoch_hook=hook,
                 dist_info=ctx.dist)
    qmodel = qmodel.cpu().eval()
    if freeze_epoch is not None and freeze_epoch >= cfg.epochs:
        Q.freeze_bn_stats(qmodel)
    acc = _onnx_top1(qmodel, ctx)
    ctx.metrics.update(top1=round(acc["top1"], 3), top5=round(acc["top5"], 3), torch_top1=result["top1"],
                       epochs=result["epochs"], target=cfg.target, accuracy_backend="onnxruntime")
    if result.get("history"):
        ctx.metrics["history"] = result["history"]
    return qmodel


# --------------------------------------------------------------------------- export


@stage("export", ExportConfig, "ONNX (float and INT8 Q/DQ) with parity checks; optional TensorRT engine")
def export_stage(model: nn.Module, cfg: ExportConfig, ctx: StageContext) -> nn.Module:
    from edgecv.export.inspect import inspect_onnx
    from edgecv.export.onnx import check_parity, export_onnx, model_size_bytes
    from edgecv.train.checkpoint import load_model

    out = ctx.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    samples = ctx.data.val_samples(cfg.parity_samples)
    example = ctx.example_input()
    files: dict[str, dict] = {}
    float_model = model if not is_quantized(model) else (load_model(ctx.float_parent)[0] if ctx.float_parent else None)
    if float_model is not None:
        path = export_onnx(float_model, out / "model.onnx", example, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch)
        parity = check_parity(float_model, path, samples, int8=False)
        files["model.onnx"] = {"format": "onnx", "size_bytes": model_size_bytes(path), "parity": parity}
        _require_parity(path, parity, int8=False)
    if is_quantized(model):
        from edgecv.compress.quantize import quant_spec

        target = quant_spec(model)["target"]
        path = export_onnx(model, out / "model.int8.onnx", example, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch)
        parity = check_parity(model, path, samples, int8=True)
        report = inspect_onnx(path, target)
        files["model.int8.onnx"] = {"format": "onnx-int8", "target": target, "size_bytes": model_size_bytes(path),
                                    "parity": parity, "inspect": report}
        _require_parity(path, parity, int8=True)
        console.print(
            f"INT8 graph for {target}: {sum(report['int_op_counts'].values())} integer ops, "
            f"{len(report['float_ops'])} float Conv/Gemm/Add/pool ops"
            + (f", {len(report['violations'])} rule violations" if report.get("violations") else "")
        )
    if cfg.tensorrt:
        from edgecv.export.tensorrt import build_engine

        source = out / ("model.int8.onnx" if "model.int8.onnx" in files else "model.onnx")
        largest = max(ctx.recipe.bench.batch_sizes)
        meta = build_engine(source, out / "model.engine", precision="int8" if "int8" in source.name else "fp16",
                            min_batch=1, opt_batch=largest, max_batch=largest)
        files["model.engine"] = {"format": "engine", "metadata": meta}
    metadata = {
        "input_name": "input",
        "output_name": "logits",
        "input_shape": [None if cfg.dynamic_batch else 1, *example.shape[1:]],
        "opset": cfg.opset,
        "classes": ctx.data.class_names,
        "data": ctx.recipe.data.model_dump(mode="json"),
        "model": ctx.model_spec,
        "files": files,
    }
    write_json(out / "metadata.json", metadata)
    ctx.metrics.update(files={k: {kk: vv for kk, vv in v.items() if kk != "inspect"} for k, v in files.items()})
    for name, info in files.items():
        p = info.get("parity") or {}
        what = (f"top-1 agreement {100 * p.get('top1_agreement', 0):.2f}%" if "int8" in name
                else f"max |diff| {p.get('max_abs_diff', 0):.2e}")
        console.print(f"wrote {out / name} ({info.get('size_bytes', 0):,} bytes; parity vs torch: {what})")
    return model


def _require_parity(path: Path, parity: dict, int8: bool) -> None:
    if parity.get("ok"):
        return
    if int8:
        raise EdgecvError(
            f"export: {path.name} disagrees with the torch model: top-1 agreement "
            f"{100 * parity['top1_agreement']:.2f}% < 99% on {parity['n']} validation images"
        )
    raise EdgecvError(
        f"export: {path.name} differs from the torch model: max |diff| {parity['max_abs_diff']:.3g} > "
        f"1e-4 x logit range {parity['logit_range']:.3g}"
    )
