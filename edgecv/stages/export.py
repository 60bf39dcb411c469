"""The `export` stage: ONNX files (float and INT8 Q/DQ), each checked against torch, plus `metadata.json`
describing them; optionally a TensorRT engine (on a machine with TensorRT)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from torch import nn

from edgecv.compress.quantize import is_quantized, quant_spec
from edgecv.console import console
from edgecv.errors import EdgecvError
from edgecv.io import write_json
from edgecv.stages.base import StageConfig, StageContext, stage

METADATA = "metadata.json"


class ExportConfig(StageConfig):
    stage: ClassVar[str] = "export"
    opset: int = Field(17, ge=13, le=21)
    dynamic_batch: bool = True
    parity_samples: int = Field(512, ge=1)
    tensorrt: bool = Field(False, description="also build a TensorRT engine (needs TensorRT on this machine)")


def _export_checked(model: nn.Module, path: Path, cfg: ExportConfig, ctx: StageContext, samples, int8: bool) -> dict:
    """Export `model` to `path`, compare it with torch on `samples`, and refuse a file that disagrees."""
    from edgecv.export.onnx import check_parity, export_onnx, model_size_bytes

    export_onnx(model, path, ctx.spec.example_input(), opset=cfg.opset, dynamic_batch=cfg.dynamic_batch)
    parity = check_parity(model, path, samples, int8=int8)
    _require_parity(path, parity, int8=int8)
    return {"format": "onnx-int8" if int8 else "onnx", "size_bytes": model_size_bytes(path), "parity": parity}


def _int8_file(model: nn.Module, out: Path, cfg: ExportConfig, ctx: StageContext, samples) -> dict:
    from edgecv.export.inspect import inspect_onnx

    target = quant_spec(model).target
    path = out / "model.int8.onnx"
    info = _export_checked(model, path, cfg, ctx, samples, int8=True)
    report = inspect_onnx(path, target)
    console.print(
        f"INT8 graph for {target}: {sum(report['int_op_counts'].values())} integer ops, "
        f"{len(report['float_ops'])} float Conv/Gemm/Add/pool ops"
        + (f", {len(report['violations'])} rule violations" if report.get("violations") else "")
    )
    weighted = [f for f in report["float_ops"] if f["op_type"] in ("Conv", "Gemm", "MatMul", "FusedConv")]
    for f in weighted[:5]:
        console.print(f"  float {f['op_type']} {f['name']}: {f['reason']}")
    if len(weighted) > 5:
        console.print(f"  ... and {len(weighted) - 5} more float Conv/Gemm ops (edgecv inspect {path} lists them)")
    return {**info, "target": target, "inspect": report}


@stage(ExportConfig, "ONNX (float and INT8 Q/DQ) with parity checks; optional TensorRT engine")
def export_stage(model: nn.Module, cfg: ExportConfig, ctx: StageContext) -> nn.Module:
    from edgecv.checkpoint import load_model

    out = ctx.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    samples = ctx.data.val_samples(cfg.parity_samples)
    files: dict[str, dict] = {}
    quantized = is_quantized(model)
    float_model = model if not quantized else load_model(ctx.float_parent)[0] if ctx.float_parent else None
    if float_model is not None:
        files["model.onnx"] = _export_checked(float_model, out / "model.onnx", cfg, ctx, samples, int8=False)
    if quantized:
        files["model.int8.onnx"] = _int8_file(model, out, cfg, ctx, samples)
    if cfg.tensorrt:
        files["model.engine"] = _engine(out, files, ctx)
    write_json(out / METADATA, {
        "input_name": "input",
        "output_name": "logits",
        "input_shape": [None if cfg.dynamic_batch else 1, *ctx.spec.input_shape],
        "opset": cfg.opset,
        "classes": ctx.data.class_names,
        "data": ctx.recipe.data.model_dump(mode="json"),
        "model": ctx.spec.to_dict(),
        "files": files,
    })  # fmt: skip
    ctx.metrics.update(files={k: {kk: vv for kk, vv in v.items() if kk != "inspect"} for k, v in files.items()})
    for name, info in files.items():
        p = info.get("parity") or {}
        what = (f"logit SQNR {p.get('sqnr_db', 0):.1f} dB, top-1 agreement {100 * p.get('top1_agreement', 0):.2f}%"
                if "int8" in name else f"max |diff| {p.get('max_abs_diff', 0):.2e}")
        console.print(f"wrote {out / name} ({info.get('size_bytes', 0):,} bytes; parity vs torch: {what})")
    return model


def _engine(out: Path, files: dict, ctx: StageContext) -> dict:
    from edgecv.export.tensorrt import build_engine

    source = out / ("model.int8.onnx" if "model.int8.onnx" in files else "model.onnx")
    largest = max(ctx.recipe.bench.batch_sizes)
    meta = build_engine(source, out / "model.engine", precision="int8" if "int8" in source.name else "fp16",
                        min_batch=1, opt_batch=largest, max_batch=largest)
    return {"format": "engine", "metadata": meta}


def _require_parity(path: Path, parity: dict, int8: bool) -> None:
    if parity.get("ok"):
        return
    if int8:
        from edgecv.export.onnx import INT8_MIN_AGREEMENT, INT8_MIN_SQNR_DB

        decided = parity["decided_agreement"]
        raise EdgecvError(
            f"export: {path.name} disagrees with the fake-quant torch model on {parity['n']} validation images: "
            f"logit SQNR {parity['sqnr_db']:.1f} dB, worst class {parity['worst_class_sqnr_db']:.1f} dB "
            f"(needs >= {INT8_MIN_SQNR_DB:g}); top-1 agreement "
            + (f"{100 * decided:.1f}% on the {parity['decided']} images decided beyond the quantization noise "
               f"(needs >= {100 * INT8_MIN_AGREEMENT:g}%), " if decided is not None else "")
            + f"{100 * parity['top1_agreement']:.1f}% on all"
        )
    raise EdgecvError(
        f"export: {path.name} differs from the torch model: max |diff| {parity['max_abs_diff']:.3g} > "
        f"1e-4 x logit range {parity['logit_range']:.3g}"
    )
