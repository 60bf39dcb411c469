"""The `export` stage: ONNX files (float and INT8 Q/DQ), each checked against torch, plus `metadata.json`
describing them; optionally a TensorRT engine (on a machine with TensorRT).

INT8 files say which backend they are for. `model.int8.onnx` is for the quantization stage's backend; when a
run asks for an engine (`build_engine: true`) or lists other backends (`backends`), the same calibrated or
trained model is rebuilt for each other backend with the same ranges and written as
`model.int8.<backend>.onnx` (e.g. `model.int8.tensorrt.onnx`, symmetric INT8 Q/DQ as TensorRT wants it).
Each entry of metadata.json's `files` carries its `target`; the `engine` section records the engine options,
so that an engine built later on the device (`edgecv bench model.int8.tensorrt.onnx --backend tensorrt`)
gets the same ones.

With `input: uint8-nhwc`, each ONNX file also gets a frame-input twin (`model.frames.onnx`,
`model.int8.frames.onnx`) that takes uint8 N x H x W x C camera frames with the normalization folded into
the first convolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator
from torch import nn

from edgecv.compress.quantize import PROFILES, float_structure, is_quantized, quant_spec
from edgecv.compress.reparam import reparameterize
from edgecv.config import Strict, registry_choice
from edgecv.console import console
from edgecv.errors import EdgecvError
from edgecv.export.normalization import FLOAT_NCHW, UINT8_NHWC
from edgecv.io import write_json
from edgecv.stages.base import StageConfig, StageContext, stage
from edgecv.stages.precision import shipped_precision

METADATA = "metadata.json"


class EngineConfig(Strict):
    """How a TensorRT engine is built; its optimization profile covers the recipe's bench batch sizes and
    data.eval_batch_size."""

    renamed: ClassVar[dict[str, str]] = {"precision": "build_precision"}
    build_precision: str = Field(
        "auto", description="the TensorRT builder's precision: auto (int8 for an INT8 model, else fp16) | fp32 | "
        "fp16 | int8")
    workspace_mb: int = Field(1024, ge=1, description="TensorRT builder workspace")
    timing_cache: str | None = Field(None, description="timing cache file, reused and updated across builds")
    dla_core: int | None = Field(None, ge=0, description="build for this DLA core, GPU fallback (AGX Orin, Xavier)")

    @field_validator("build_precision")
    @classmethod
    def _known(cls, v: str) -> str:
        from edgecv.export.trt.options import REQUESTS

        if v not in REQUESTS:
            raise ValueError(f"build_precision {v!r}: choose from {', '.join(REQUESTS)}")
        return v

    def build_settings(self) -> dict:
        """The options as metadata.json records them for a later build (BuildOptions' names)."""
        return {"precision": self.build_precision, "workspace_mb": self.workspace_mb,
                "timing_cache": self.timing_cache, "dla_core": self.dla_core}


def _input_kinds():
    from edgecv.export.normalization import INPUT_KINDS

    return INPUT_KINDS


class ExportConfig(StageConfig):
    stage: ClassVar[str] = "export"
    opset: int = Field(17, ge=13, le=21)
    dynamic_batch: bool = True
    parity_samples: int = Field(512, ge=1)
    renamed: ClassVar[dict[str, str]] = {"tensorrt": "build_engine", "int8_targets": "backends"}
    build_engine: bool = Field(False, description="also build a TensorRT engine (needs TensorRT on this machine)")
    backends: list[registry_choice(lambda: PROFILES)] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="INT8 files for these backends too (model.int8.<backend>.onnx), from the same ranges",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    input: registry_choice(_input_kinds) = Field(  # type: ignore[valid-type]
        FLOAT_NCHW, description="float-nchw: normalized float tensors; uint8-nhwc: also write frame-input "
        "files that take uint8 camera frames, normalization folded into the first convolution")


def _export_checked(model: nn.Module, path: Path, cfg: ExportConfig, ctx: StageContext, samples, int8: bool) -> dict:
    """Export `model` to `path`, compare it with torch on `samples`, and refuse a file that disagrees."""
    from edgecv.export.class_names import stamp_class_names
    from edgecv.export.onnx import check_parity, export_onnx, model_size_bytes

    export_onnx(model, path, ctx.spec.example_input(), opset=cfg.opset, dynamic_batch=cfg.dynamic_batch)
    stamp_class_names(path, ctx.data.class_names)
    parity = check_parity(model, path, samples, int8=int8)
    _require_parity(path, parity, int8=int8)
    return {"format": "onnx-int8" if int8 else "onnx", "input": FLOAT_NCHW, "size_bytes": model_size_bytes(path),
            "parity": parity}


def _int8_file(model: nn.Module, out: Path, cfg: ExportConfig, ctx: StageContext, samples,
               name: str = "model.int8.onnx") -> dict:
    from edgecv.export.lint import inspect_onnx

    target = quant_spec(model).target
    path = out / name
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


def other_backends(model: nn.Module, cfg: ExportConfig) -> list[str]:
    """The backends other than the model's own that get an INT8 file: `backends`, and tensorrt when an
    engine is asked for."""
    own = quant_spec(model).target
    wanted = [*cfg.backends, *(["tensorrt"] if cfg.build_engine else [])]
    return [t for t in dict.fromkeys(wanted) if t != own]


def int8_file_name(target: str, own_target: str) -> str:
    """`model.int8.onnx` for the quantization stage's target, `model.int8.<target>.onnx` for the others."""
    return "model.int8.onnx" if target == own_target else f"model.int8.{target}.onnx"


def retargeted(model: nn.Module, target: str, spec) -> nn.Module:
    """`model` (fake-quant, any target) rebuilt for `target` with the same weights and ranges."""
    from edgecv.checkpoint import Checkpoint, build_from_header
    from edgecv.compress.quantize.retarget import retarget

    twin = build_from_header(Checkpoint(spec=spec, shapes=float_structure(model)))
    return retarget(model, target, twin, spec.example_input())


def _retargeted_file(model: nn.Module, target: str, out: Path, cfg: ExportConfig, ctx: StageContext,
                     samples) -> dict:
    """model.int8.<target>.onnx: the model rebuilt for `target`, exported, checked against its torch form,
    and compared (top-1 agreement) with the recipe target's model on the parity samples."""
    import torch

    qmodel = retargeted(model, target, ctx.spec)
    info = _int8_file(qmodel, out, cfg, ctx, samples, int8_file_name(target, quant_spec(model).target))
    with torch.no_grad():
        same = (model.eval()(samples).argmax(1) == qmodel.eval()(samples).argmax(1)).float().mean().item()
    console.print(f"INT8 for {target} from the {quant_spec(model).target} ranges: top-1 agreement with it "
                  f"{100 * same:.2f}% on {len(samples)} validation images")
    return {**info, "derived_from": "model.int8.onnx", "agreement_with_source": round(same, 4)}


@stage(ExportConfig, "ONNX (float and INT8 Q/DQ) with parity checks; optional TensorRT engine")
def export_stage(model: nn.Module, cfg: ExportConfig, ctx: StageContext) -> nn.Module:
    from edgecv.checkpoint import load_model

    if ctx.dist is not None and not ctx.dist.is_main:
        return model  # under torchrun rank 0 writes the files; the others have nothing to do
    out = ctx.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    samples = ctx.data.val_samples(cfg.parity_samples)
    files: dict[str, dict] = {}
    quantized = is_quantized(model)
    float_model = model if not quantized else load_model(ctx.float_parent)[0] if ctx.float_parent else None
    if float_model is not None:
        float_model, reparam = reparameterize(float_model, ctx.spec.example_input())  # fused, as in the INT8 file
        if reparam is not None:
            ctx.metrics["reparameterized"] = reparam.to_dict()
        files["model.onnx"] = _export_checked(float_model, out / "model.onnx", cfg, ctx, samples, int8=False)
    if quantized:
        files["model.int8.onnx"] = _int8_file(model, out, cfg, ctx, samples)
        for target in other_backends(model, cfg):
            name = int8_file_name(target, quant_spec(model).target)
            files[name] = _retargeted_file(model, target, out, cfg, ctx, samples)
    if cfg.input == UINT8_NHWC:
        files.update(_frame_files(out, files, float_model, model if quantized else None, ctx, samples))
    if cfg.build_engine:
        files["model.engine"] = _engine(out, files, cfg, ctx)
    precision = shipped_precision(ctx)  # INT8 against float on the target, and what ships (ship_precision: auto)
    if precision is not None and not quantized and precision["chosen"] == "float":
        console.print(f"exporting the float model only: {precision['why']}")
    write_json(out / METADATA, {
        "input_name": "input",
        "output_name": "logits",
        "input_shape": [None if cfg.dynamic_batch else 1, *ctx.spec.input_shape],
        "opset": cfg.opset,
        "classes": ctx.data.class_names,
        "data": ctx.recipe.data.model_dump(mode="json"),
        "model": ctx.spec.to_dict(),
        "files": files,
        "engine": {**cfg.engine.build_settings(), "batch_sizes": list(ctx.recipe.bench.batch_sizes)},
        "precision": precision,
    })  # fmt: skip
    ctx.metrics.update(files={k: {kk: vv for kk, vv in v.items() if kk != "inspect"} for k, v in files.items()})
    for name, info in files.items():
        if info["format"] == "engine":
            continue
        p = info.get("parity") or {}
        what = (f"logit SQNR {p.get('sqnr_db', 0):.1f} dB, top-1 agreement {100 * p.get('top1_agreement', 0):.2f}%"
                if "int8" in name else f"max |diff| {p.get('max_abs_diff', 0):.2e}")
        console.print(f"wrote {out / name} ({info.get('size_bytes', 0):,} bytes; parity vs torch: {what})")
    return model


def engine_source(files: dict) -> str:
    """The ONNX file an engine is built from: the TensorRT-target INT8 file, else the float one."""
    for name in ("model.int8.tensorrt.onnx", "model.int8.onnx"):
        if name in files and files[name].get("target") == "tensorrt":
            return name
    if "model.onnx" in files:
        return "model.onnx"
    raise EdgecvError("export.build_engine: no TensorRT-target INT8 file and no float ONNX file to build an engine from")


def build_options(engine_cfg: EngineConfig, batch_sizes, eval_batch_size: int):
    """The engine build options of the recipe: its engine section, a profile covering the bench batch sizes
    and the validation batch (what edgecv itself runs on the engine)."""
    from edgecv.export.trt.build import BuildOptions
    from edgecv.export.trt.options import engine_profile

    return BuildOptions(precision=engine_cfg.build_precision, batches=engine_profile(batch_sizes, eval_batch_size),
                        workspace_mb=engine_cfg.workspace_mb, timing_cache=engine_cfg.timing_cache,
                        dla_core=engine_cfg.dla_core)



def _frame_files(out: Path, files: dict, float_model: nn.Module | None, int8_model: nn.Module | None,
                 ctx: StageContext, samples) -> dict[str, dict]:
    """A frame-input twin of each ONNX file, checked against its torch model on the validation images as
    uint8 frames; a twin that disagrees is refused like any other export."""
    from edgecv.export.frames import Normalization, check_frame_parity, export_frame_onnx, ort_prologue
    from edgecv.export.onnx import model_size_bytes
    from edgecv.export.parity import FRAME_MIN_SQNR_DB

    norm = Normalization.of(ctx.spec)
    frames = norm.to_frames(samples.cpu().numpy())
    out_files = {}
    for source, model in (("model.onnx", float_model), ("model.int8.onnx", int8_model)):
        if source not in files or model is None:
            continue
        int8 = "int8" in source
        path = out / source.replace(".onnx", ".frames.onnx")
        plan = export_frame_onnx(out / source, path, norm, model)
        parity = check_frame_parity(model, path, frames, norm, int8=int8)
        if not parity["ok"]:
            path.unlink(missing_ok=True)
            if int8:
                raise EdgecvError(
                    f"export: {path.name} disagrees with the torch model: top-1 agreement "
                    f"{100 * parity['top1_agreement']:.2f}% < 99% and logit SQNR {parity['sqnr_db']:.1f} dB < "
                    f"{FRAME_MIN_SQNR_DB:.0f} dB on {parity['n']} validation images")
            _require_parity(path, parity, int8=False)
        c, h, w = ctx.spec.input_shape
        out_files[path.name] = {
            "format": files[source]["format"], "input": UINT8_NHWC, "input_shape": [None, h, w, c],
            "size_bytes": model_size_bytes(path), "parity": parity,
            "frame_input": {**plan.to_dict(), **norm.to_dict(), "ort_prologue": ort_prologue(path)},
        }  # fmt: skip
    return out_files


def _engine(out: Path, files: dict, cfg: ExportConfig, ctx: StageContext) -> dict:
    from edgecv.export.trt.build import build_engine

    source = engine_source(files)
    build = build_options(cfg.engine, ctx.recipe.bench.batch_sizes, ctx.recipe.data.eval_batch_size)
    meta = build_engine(out / source, out / "model.engine", build, echo=console.print)
    return {"format": "engine", "source": source, "target": files[source].get("target"),
            "size_bytes": (out / "model.engine").stat().st_size, "metadata": meta.to_dict()}


def engine_for_checkpoint(net: nn.Module, header, onnx_path: Path, samples, opset: int = 17,
                          batch_sizes=(1, 8)) -> Path:
    """`edgecv export --tensorrt`: an engine for a checkpoint exported to `onnx_path`. INT8 comes from a
    TensorRT-target graph (written beside as `<name>.tensorrt.onnx`, same ranges, when the checkpoint was
    quantized for another runtime), FP16 from the float graph; the profile covers `batch_sizes` and the
    validation batch recorded with the checkpoint."""
    from edgecv.export.onnx import check_parity, export_onnx
    from edgecv.export.trt.build import build_engine, engine_path_for

    source = Path(onnx_path)
    if is_quantized(net) and quant_spec(net).target != "tensorrt":
        qmodel = retargeted(net, "tensorrt", header.spec)
        source = source.with_name(f"{source.stem}.tensorrt.onnx")
        export_onnx(qmodel, source, header.spec.example_input(), opset=opset)
        _require_parity(source, check_parity(qmodel, source, samples, int8=True), int8=True)
        console.print(f"wrote {source} (INT8 for TensorRT, from the {quant_spec(net).target} ranges)")
    eval_batch = (header.meta.get("data") or {}).get("eval_batch_size", 256)
    engine = engine_path_for(source)
    build_engine(source, engine, build_options(EngineConfig(), batch_sizes, eval_batch), echo=console.print)
    return engine


def _require_parity(path: Path, parity: dict, int8: bool) -> None:
    if parity.get("ok"):
        return
    if int8:
        from edgecv.export.parity import INT8_MIN_AGREEMENT, INT8_MIN_SQNR_DB

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
