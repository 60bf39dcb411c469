"""The end of `compress`: every model a run produced (each stage's checkpoint, the baseline in ONNX Runtime,
every exported file) measured together by `edgecv.bench.measure`, then report.json / report.md /
pareto.png written by `edgecv.report`."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edgecv.bench.measure import BenchRow, BenchSettings, Subject, measure
from edgecv.bench.runners import create_runner
from edgecv.checkpoint import load_model
from edgecv.compress.quantize import is_quantized
from edgecv.console import console, make_progress
from edgecv.data.datasets import DataBundle
from edgecv.data.loaders import LimitedLoader
from edgecv.device import clock_warning, host_facts, is_cuda
from edgecv.models.complexity import count_macs_params
from edgecv.models.spec import ModelSpec
from edgecv.models.user_weights import WeightsLoad
from edgecv.recipe import Recipe
from edgecv.report.cells import format_value
from edgecv.report.render import ReportSections, bench_table, summary_rows, write_report

EXPORT_BACKENDS = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime", "engine": "tensorrt"}
TRAINING_STAGES = ("finetune", "qat")  # stages after which an earlier float model is no longer the one to ship


@dataclass
class StageModel:
    name: str
    path: Path
    model: nn.Module
    quantized: bool
    metrics: dict
    macs: int | None = None
    params: int | None = None


def _stage_models(run_dir: Path, manifest: dict, spec: ModelSpec) -> list[StageModel]:
    """Each finished stage's model, with the MACs and params of its float structure (a quantized stage
    has its float parent's)."""
    out: list[StageModel] = []
    for entry in manifest["stages"]:
        path = run_dir / entry["dir"] / "model.pt"
        if entry["name"] == "export" or not path.exists():
            continue
        model = load_model(path)[0]
        sm = StageModel(entry["name"], path, model, is_quantized(model), entry.get("metrics", {}))
        if sm.quantized and out:
            sm.macs, sm.params = out[-1].macs, out[-1].params
        elif not sm.quantized:
            sm.macs, sm.params = count_macs_params(model, spec.example_input())
        out.append(sm)
    return out


def _deployable(i: int, stages: list[StageModel]) -> tuple[bool, str | None]:
    s = stages[i]
    if s.quantized:
        return False, "fake-quant in float: not INT8 speed (see the onnx-int8 row)"
    if s.name in ("prune", "surgery") and any(t.name in TRAINING_STAGES for t in stages[i + 1 :]):
        return False, ("pruned" if s.name == "prune" else "changed by surgery") + ", before fine-tuning"
    return True, None


def _torch_loader(path: Path, device: str, threads: int | None):
    return lambda: create_runner("torch", load_model(path)[0], device=device, threads=threads)


def _torch_subjects(stages: list[StageModel], recipe: Recipe, device: str) -> list[Subject]:
    out = []
    for i, s in enumerate(stages):
        ok, note = _deployable(i, stages)
        m = s.metrics
        reuse = "accuracy_backend" not in m and {"top1", "top5"} <= set(m)
        out.append(Subject(
            model=str(s.path), runner=None, load=_torch_loader(s.path, device, recipe.bench.threads),
            format="torch", stage=s.name, params=s.params, macs=s.macs, size_bytes=s.path.stat().st_size,
            accuracy={"top1": m["top1"], "top5": m["top5"]} if reuse else None, deployable=ok, note=note,
        ))  # fmt: skip
    return out


def _baseline_onnx(stages: list[StageModel], spec: ModelSpec, tmp: Path, recipe: Recipe, device: str) -> list[Subject]:
    """The baseline in ONNX Runtime, so each backend has a baseline to compare the compressed models with."""
    from edgecv.export.onnx import export_onnx, model_size_bytes

    base = next((s for s in stages if s.name == "train"), None)
    if base is None:
        return []
    path = export_onnx(base.model, tmp / "baseline.onnx", spec.example_input())
    load = lambda: create_runner("onnxruntime", path, device=device, threads=recipe.bench.threads)  # noqa: E731
    return [Subject(model="train (exported for this report)", runner=None, load=load, format="onnx",
                    stage="train", params=base.params, macs=base.macs, size_bytes=model_size_bytes(path))]


def _baseline_int8(stages: list[StageModel], manifest: dict, spec: ModelSpec, tmp: Path, recipe: Recipe,
                   data: DataBundle) -> list[Subject]:
    """After a surgery, the original (baseline) model in INT8 as well, calibrated here with the calibrator the
    recipe's ptq chose, so that the report shows the original and the changed model side by side, each in
    float and INT8 on ONNX Runtime."""
    from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat
    from edgecv.export.onnx import export_onnx, model_size_bytes

    base = next((s for s in stages if s.name == "train"), None)
    targets = [getattr(c, "backend", None) for c in recipe.stages if c.stage in ("ptq", "qat")]
    if base is None or not any(s.name == "surgery" for s in stages) or "onnxruntime" not in targets:
        return []
    method = next((e["metrics"]["calibrator"] for e in manifest["stages"] if "calibrator" in e.get("metrics", {})),
                  "max")
    qmodel = prepare_qat(base.model, "onnxruntime", spec.example_input())
    apply_calibrator(qmodel, collect_stats(qmodel, data.calibration_batches(8)), method)
    path = export_onnx(qmodel, tmp / "baseline.int8.onnx", spec.example_input())
    load = lambda: create_runner("onnxruntime", path, threads=recipe.bench.threads)  # noqa: E731
    return [Subject(model=f"train (the original model, INT8 calibrated for this report: {method})", runner=None,
                    load=load, format="onnx-int8", stage="train", params=base.params, macs=base.macs,
                    size_bytes=model_size_bytes(path), note="the original model before surgery")]


def _export_subjects(run_dir: Path, stages: list[StageModel], recipe: Recipe, device: str) -> tuple[list[Subject], dict]:
    meta_file = run_dir / "export" / "metadata.json"
    if not meta_file.exists():
        return [], {}
    files = json.loads(meta_file.read_text()).get("files", {})
    float_stage = next((s for s in reversed(stages) if not s.quantized), None)
    int8_stage = next((s for s in reversed(stages) if s.quantized), None)
    out = []
    for name, info in files.items():
        backend = EXPORT_BACKENDS.get(info["format"])
        if backend not in recipe.bench.backends or (info.get("derived_from") and info.get("target") != backend):
            continue  # an INT8 copy for another target (model.int8.tensorrt.onnx) is measured by its own runtime
        quantized = info["format"] == "onnx-int8" or (info["format"] == "engine" and "model.int8.onnx" in files)
        stage = int8_stage if quantized else float_stage
        path = run_dir / "export" / name
        run_on = device if backend != "tensorrt" else (device if is_cuda(device) else "cuda")
        out.append(Subject(
            model=str(path), runner=None, format=info["format"],
            load=lambda b=backend, p=path, d=run_on: create_runner(b, p, device=d, threads=recipe.bench.threads), stage=stage.name if stage else None, params=stage.params if stage else None,
            macs=stage.macs if stage else None, size_bytes=path.stat().st_size,
        ))  # fmt: skip
    return out, files


def _sections(manifest: dict, files: dict, recipe: Recipe) -> ReportSections:
    facts = host_facts()
    if warning := clock_warning(facts.get("jetson")):  # a Jetson with unlocked clocks: say it in the report
        facts["warning"] = warning
    s = ReportSections(device=facts)
    b = recipe.bench
    s.settings = {"batch_sizes": list(b.batch_sizes), "warmup": b.warmup, "runs": b.runs, "rounds": b.rounds,
                  "threads": b.threads, "method": "blocks"}
    for e in manifest["stages"]:
        m = e.get("metrics", {})
        s.notes += _precision_notes(e["dir"], m.get("precision"))
        if e["name"] == "train" and m.get("weights"):
            given = " (evaluated as given, train.epochs: 0)" if m.get("epochs") == 0 else ""
            s.notes.append(f"{e['dir']}: {WeightsLoad(**m['weights']).summary()}{given}")
        if e["name"] == "surgery" and m.get("surgery"):
            s.notes.append(
                f"{e['dir']} changed the model ({m['surgery']['activation']} activations, squeeze-excitation "
                f"{m['surgery']['squeeze_excitation']}): rows of 'train' are the original model, rows of later "
                "stages the changed one"
            )
        if "calibrators" in m:
            s.calibration = [{**c, "chosen": c["calibrator"] == m.get("calibrator")} for c in m["calibrators"]]
        s.skipped_layers = m.get("skipped_layers", s.skipped_layers)
        s.distillation += m.get("distill_comparison", [])
        s.prune_search += m.get("latency_search", [])
        s.stages.append({"stage": e["dir"], "status": e["status"], "wall_s": e.get("wall_s"), "top1": m.get("top1")})
    for name, info in files.items():
        if info.get("parity"):
            s.parity.append({"file": name, **info["parity"]})
        if "inspect" in info:
            s.int8_graph = {"file": name, **info["inspect"]}
    return s


def _precision_notes(stage_dir: str, precision: dict | None) -> list[str]:
    """The one-line verdict when INT8 is slower than float here, and what ship_precision auto shipped."""
    if not precision:
        return []
    notes = [f"{stage_dir}: {precision['verdict']}"] if precision.get("ratio", 0) > 1 else []
    if precision.get("requested") == "auto":
        notes.append(f"{stage_dir}: ship_precision auto shipped the {precision['chosen']} model ({precision['why']})")
    return notes


def report_run(recipe: Recipe, run_dir: Path, manifest: dict, data: DataBundle, spec: ModelSpec,
               device: str) -> dict:
    """Measure every model of the run and write the report; returns {"rows", "paths"}."""
    bench = recipe.bench
    stages = _stage_models(run_dir, manifest, spec)
    with tempfile.TemporaryDirectory(prefix="edgecv-report-") as tmp:
        subjects = _torch_subjects(stages, recipe, device) if "torch" in bench.backends else []
        exported, files = _export_subjects(run_dir, stages, recipe, "cpu")
        if "onnxruntime" in bench.backends:
            # the exported model.onnx is the baseline itself when no float stage follows train: time it once
            if not any(x.stage == "train" and x.format == "onnx" for x in exported):
                subjects += _baseline_onnx(stages, spec, Path(tmp), recipe, "cpu")
            subjects += _baseline_int8(stages, manifest, spec, Path(tmp), recipe, data)
        subjects += exported
        settings = BenchSettings(tuple(bench.batch_sizes), bench.warmup, bench.runs, bench.rounds)
        console.rule("[bold]bench")
        with make_progress() as progress:
            rows = measure(subjects, settings, spec.input_shape, _val_batches(data, None),
                           _rich(progress))
    sections = _sections(manifest, files, recipe)
    paths = write_report(run_dir, rows, sections, title=f"edgecv report: {recipe.name}")
    console.print(bench_table(rows, title=f"{recipe.name}: accuracy and latency per model"))
    _print_summary(rows)
    console.print(f"report: {paths['markdown']}  {paths['json']}  {paths['pareto']}")
    return {"rows": rows, "paths": {k: str(v) for k, v in paths.items()}}


def _val_batches(data: DataBundle, limit: int | None):
    return lambda: LimitedLoader(data.val, limit) if limit else data.val


def _rich(progress):
    def start(label: str, total: int):
        task = progress.add_task(label, total=total or None, status="")
        return lambda n: progress.advance(task, n)

    return start


def _print_summary(rows: list[BenchRow]) -> None:
    for s in summary_rows(rows):
        if s["backend"] == "torch":
            continue
        console.print(
            f"{s['model']} vs {s['baseline']} on {s['backend']}: top-1 {format_value('delta', s['top1_delta'])} "
            f"points, MACs {format_value('ratio', s['macs_ratio'])}, size {format_value('ratio', s['size_ratio'])}, "
            f"batch-1 speed-up {format_value('ratio', s['speedup_b1'])}, batch-{s['throughput_batch']} "
            f"throughput {format_value('ratio', s['throughput_ratio'])}"
        )
