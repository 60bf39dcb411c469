"""The `edgecv` command line. Thin: parse, load the recipe, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgecv.console import console, err_console
from edgecv.errors import EdgecvError

app = typer.Typer(
    name="edgecv",
    help="Train, prune, distill and INT8-quantize image classifiers; export ONNX/TensorRT; measure on the device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipes_app = typer.Typer(help="List, show, validate recipes and print their JSON schema.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

RecipeArg = Annotated[str, typer.Argument(help="recipe YAML file, or the name of a bundled recipe (e.g. quickstart)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe key, e.g. --set train.epochs=3 (repeatable)")]
OutOpt = Annotated[Path, typer.Option("--out", help="runs folder; the run dir is OUT/<recipe name>")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
DataOpt = Annotated[str | None, typer.Option("--data", help="dataset folder (overrides data.root)")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks")]


def _load(recipe: str, overrides: list[str] | None):
    from edgecv.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def _data_root(data: str | None) -> str | None:
    if data is not None and not Path(data).expanduser().exists():
        raise EdgecvError(f"--data {data!r}: folder does not exist")
    return data


@app.command()
def train(recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = Path("runs"), device: DeviceOpt = "auto",
          data: DataOpt = None, debug: DebugOpt = False) -> None:
    """Train the recipe's baseline (stage 00-train). Resumes an interrupted run; works under torchrun (DDP)."""
    from edgecv.pipeline import Pipeline

    r = _load(recipe, set_)
    result = Pipeline(r, out, device, _data_root(data)).run(only_train=True)
    m = result["manifest"]["stages"][0].get("metrics", {})
    console.print(f"baseline top-1 {m.get('top1', float('nan')):.2f}%  ->  {result['outputs']['train']}")


@app.command()
def compress(recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = Path("runs"), device: DeviceOpt = "auto",
             data: DataOpt = None, debug: DebugOpt = False) -> None:
    """Run the whole recipe: baseline, its stages (prune, finetune, ptq, qat, export), then bench + report.

    Finished stages are skipped on a rerun; an interrupted stage resumes from its last finished epoch."""
    from edgecv.pipeline import Pipeline

    r = _load(recipe, set_)
    result = Pipeline(r, out, device, _data_root(data)).run()
    console.print(f"done in {result['wall_s']:.0f} s: {result['run_dir']}")


@app.command()
def sensitivity(recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = Path("runs"), device: DeviceOpt = "auto",
                data: DataOpt = None,
                metric: Annotated[str, typer.Option(help="sqnr (output SQNR, fast) | accuracy (top-1 drop)")] = "sqnr",
                target: Annotated[str | None, typer.Option(help="a quantization target (default: the recipe's)")] = None,
                top: Annotated[int, typer.Option(help="rows to print")] = 20,
                json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows to this file")] = None,
                debug: DebugOpt = False) -> None:
    """Per-layer INT8 sensitivity of the float model that the recipe's first ptq/qat stage would quantize."""
    from rich.table import Table

    from edgecv.checkpoint import load_model
    from edgecv.compress.quantize import PROFILES
    from edgecv.compress.quantize.sensitivity import METRICS
    from edgecv.io import write_json
    from edgecv.pipeline import Pipeline
    from edgecv.stages.quantize import sensitivity_rows

    if metric not in METRICS:
        raise EdgecvError(f"--metric {metric!r}: choose from: {', '.join(METRICS)}")
    r = _load(recipe, set_)
    quant = [s for s in r.stages if s.stage in ("ptq", "qat")]
    tgt = target or (quant[0].backend if quant else "onnxruntime")
    PROFILES.get(tgt)
    pipe = Pipeline(r, out, device, _data_root(data))
    with pipe.locked():  # through writing sensitivity.json
        result = pipe.run(report=False, stop_before=("ptq", "qat", "export"))
        model = load_model(next(reversed(result["outputs"].values())))[0]
        rows = sensitivity_rows(model, tgt, result["data"], result["spec"].example_input(), metric=metric)
        write_json(json_out or pipe.run_dir / "sensitivity.json", rows)
    table = Table(title=f"INT8 sensitivity per layer ({tgt}, most sensitive first)")
    for col in ("rank", "layer", "SQNR dB", "top-1 drop"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for i, row in enumerate(rows[:top], 1):
        drop = row.get("top1_drop")
        table.add_row(str(i), row["layer"], f"{row['sqnr_db']:.2f}", "-" if drop is None else f"{drop:.2f}")
    console.print(table)
    console.print(f"keep the N most sensitive layers in float with: skip_layers: auto:N   ({len(rows)} layers)")


def _data_for_model(path: Path, recipe: str | None, data: str | None, limit: int | None):
    """Validation batches for a model file: the recipe's data section, else the one stored with the model."""
    from edgecv.model_files import validation_batches

    return validation_batches(path, recipe, _data_root(data), limit)


def _run_device(device: str) -> str:
    from edgecv.device import resolve_device

    return resolve_device(device)


@app.command("eval")
def eval_(model: Annotated[Path, typer.Argument(help="model file: .pt (torch), .onnx (ONNX Runtime) or .engine")],
          recipe: Annotated[str | None, typer.Option(help="recipe whose validation data to use")] = None,
          backend: Annotated[str | None, typer.Option(help="a bench backend (default: by file type)")] = None,
          device: DeviceOpt = "auto", data: DataOpt = None,
          limit: Annotated[int | None, typer.Option(help="evaluate the first N validation images")] = None,
          json_out: Annotated[Path | None, typer.Option("--json", help="write the result to this JSON file")] = None,
          debug: DebugOpt = False) -> None:
    """Top-1 / top-5 accuracy of a model file on a validation set."""
    from edgecv.bench.accuracy import evaluate
    from edgecv.io import write_json
    from edgecv.model_files import check_paths, default_backend, subject_for

    path = check_paths([model])[0]
    runner = subject_for(path, backend or default_backend(path), _run_device(device), None).load()
    acc = evaluate(runner, _data_for_model(path, recipe, data, limit))
    result = {"model": str(path), "backend": runner.backend, "top1": round(acc["top1"], 3),
              "top5": round(acc["top5"], 3), "n": acc["n"]}
    if json_out:
        write_json(json_out, result)
    console.print(f"{path}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  ({acc['n']} images, "
                  f"{runner.backend})")


@app.command()
def export(model: Annotated[Path, typer.Argument(help="edgecv checkpoint (.pt) from a run dir")],
           out: Annotated[Path | None, typer.Option("--out", help="output .onnx file (default: next to MODEL)")] = None,
           opset: Annotated[int, typer.Option(help="ONNX opset (>= 13)")] = 17,
           tensorrt: Annotated[bool, typer.Option(help="also build a TensorRT engine (needs TensorRT)")] = False,
           input_: Annotated[str, typer.Option("--input", help="float-nchw: normalized float tensors | "
                             "uint8-nhwc: uint8 camera frames, normalization folded into the first conv")] = "float-nchw",
           debug: DebugOpt = False) -> None:
    """Export a checkpoint to ONNX (Q/DQ INT8 when it was quantized), checked against torch."""
    import torch

    from edgecv.checkpoint import model_from_checkpoint
    from edgecv.export.class_names import stamp_class_names
    from edgecv.export.normalization import INPUT_KINDS, UINT8_NHWC
    from edgecv.export.onnx import check_parity, export_onnx, model_size_bytes
    from edgecv.model_files import check_paths, read_checkpoint_once

    path = check_paths([model])[0]
    if opset < 13:
        raise EdgecvError(f"--opset {opset}: Q/DQ export needs opset 13 or newer")
    try:
        INPUT_KINDS.get(input_)
    except EdgecvError as exc:
        raise EdgecvError(f"--input: {exc}") from None
    net, header = model_from_checkpoint(read_checkpoint_once(path), path)
    quantized = header.quant is not None
    frames = input_ == UINT8_NHWC
    dest = out or path.with_suffix((".int8" if quantized else "") + (".frames" if frames else "") + ".onnx")
    if dest.suffix != ".onnx":
        raise EdgecvError(f"--out {str(dest)!r}: the file name must end in .onnx")
    if frames:
        parity = _export_frames(net, header.spec, dest, opset, quantized)
    else:
        export_onnx(net, dest, header.spec.example_input(), opset=opset)
        samples = torch.randn(64, *header.spec.input_shape, generator=torch.Generator().manual_seed(0))
        parity = check_parity(net, dest, samples, int8=quantized)
    stamp_class_names(dest, header.spec.class_names)
    console.print(f"wrote {dest} ({model_size_bytes(dest):,} bytes); parity vs torch: "
                  + (f"top-1 agreement {100 * parity['top1_agreement']:.1f}%" if quantized
                     else f"max |diff| {parity['max_abs_diff']:.2e}")
                  + (f", logit SQNR {parity['sqnr_db']:.1f} dB" if quantized and "sqnr_db" in parity else ""))
    if tensorrt:
        from edgecv.stages.export import engine_for_checkpoint

        engine_for_checkpoint(net, header, dest, samples, opset)


def _export_frames(net, spec, dest: Path, opset: int, quantized: bool) -> dict:
    """Export `net` with a uint8 NHWC frame input to `dest` (through a float-input file that is not kept)
    and compare it with torch on 64 random frames."""
    import tempfile

    import numpy as np

    from edgecv.export.frames import Normalization, check_frame_parity, export_frame_onnx
    from edgecv.export.onnx import export_onnx

    norm = Normalization.of(spec)  # before exporting: a model without a normalization gets one clear line
    with tempfile.TemporaryDirectory(prefix="edgecv-export-") as tmp:
        source = export_onnx(net, Path(tmp) / "float-input.onnx", spec.example_input(), opset=opset)
        export_frame_onnx(source, dest, norm, net)
    c, h, w = spec.input_shape
    frames = np.random.default_rng(0).integers(0, 256, (64, h, w, c), dtype=np.uint8)
    return check_frame_parity(net, dest, frames, norm, int8=quantized)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise EdgecvError(f"--batch-sizes {text!r}: expected comma-separated integers, e.g. 1,8") from None
    if not sizes or min(sizes) < 1:
        raise EdgecvError(f"--batch-sizes {text!r}: batch sizes must be >= 1")
    return tuple(sizes)


@app.command()
def bench(models: Annotated[list[Path] | None, typer.Argument(help="model files (.pt, .onnx, .engine)")] = None,
          backend: Annotated[list[str] | None, typer.Option("--backend", help="a bench backend (repeatable; default: by file type)")] = None,
          batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8",
          warmup: Annotated[int, typer.Option(help="warm-up runs per block")] = 10,
          runs: Annotated[int, typer.Option(help="timed runs per block")] = 50,
          rounds: Annotated[int, typer.Option(help="rounds of blocks")] = 3,
          threads: Annotated[int | None, typer.Option(help="CPU threads (default: all)")] = None,
          recipe: Annotated[str | None, typer.Option(help="recipe whose validation data measures accuracy")] = None,
          accuracy: Annotated[bool, typer.Option(help="measure top-1/top-5 on the validation data")] = True,
          limit: Annotated[int | None, typer.Option(help="accuracy on the first N validation images")] = None,
          power: Annotated[bool, typer.Option(help="sample tegrastats for power and energy (Jetson)")] = False,
          frames: Annotated[bool, typer.Option("--frames/--tensors", help="time from uint8 camera frames, "
                            "float-input models paying their numpy preprocessing (default), or from ready "
                            "float tensors")] = True,
          device: DeviceOpt = "auto", data: DataOpt = None,
          json_out: Annotated[Path | None, typer.Option("--json", help="write results as JSON to this file")] = None,
          trtexec_log: Annotated[list[Path] | None, typer.Option("--trtexec-log", help="a saved trtexec output, shown as a row beside edgecv's (repeatable)")] = None,
          debug: DebugOpt = False) -> None:
    """Latency percentiles, throughput, memory, accuracy (and power on a Jetson), side by side."""
    from edgecv.bench.measure import BenchSettings
    from edgecv.bench.runners import RUNNERS
    from edgecv.bench.trtexec import trtexec_log_row
    from edgecv.device import host_facts
    from edgecv.io import write_json
    from edgecv.model_files import check_paths
    from edgecv.report.render import bench_table

    settings = BenchSettings(_batch_sizes(batch_sizes), warmup, runs, rounds, accuracy=accuracy, power=power,
                             frames=frames)
    for b in backend or []:
        RUNNERS.get(b)
    if not models and not trtexec_log:
        raise EdgecvError("nothing to bench: give model files and/or --trtexec-log LOG")
    trtexec_rows = [trtexec_log_row(p) for p in trtexec_log or []]
    paths = check_paths(models or [])
    rows, subjects = _measure_files(paths, backend, settings, device, threads, recipe, data, limit) if paths else ([], [])
    rows += trtexec_rows
    facts = host_facts()
    console.print(bench_table(rows))
    for r in trtexec_rows:
        console.print(f"{r.model}: {r.note}", markup=False)
    _print_jetson(facts.get("jetson"))
    if json_out:
        write_json(json_out, {"rows": [r.to_dict() for r in rows], "device": facts,
                              "runners": {s.model + "@" + s.runner.backend: s.runner.describe() for s in subjects},
                              "settings": {**settings.__dict__, "batch_sizes": list(settings.batch_sizes),
                                           "threads": threads}})
        console.print(f"wrote {json_out}")


def _measure_files(paths, backends, settings, device, threads, recipe, data, limit):
    """(rows, subjects) of model files measured together: same input shape, accuracy on the first's data."""
    from edgecv.bench.measure import measure
    from edgecv.console import make_progress
    from edgecv.model_files import default_backend, model_input_shape, subject_for

    shapes = {p: model_input_shape(p) for p in paths}
    if len(set(shapes.values())) > 1:
        raise EdgecvError("models have different input shapes: " + ", ".join(f"{p.name} {s}" for p, s in shapes.items()))
    dev = _run_device(device)
    subjects = [subject_for(p, b, dev, threads, settings.batch_sizes) for p in paths
                for b in backends or [default_backend(p)]]
    val = None
    if settings.accuracy:
        batches = _data_for_model(paths[0], recipe, data, limit)
        val = lambda: batches  # noqa: E731
    with make_progress() as progress:
        return measure(subjects, settings, next(iter(shapes.values())), val, _progress(progress)), subjects


def _print_jetson(jetson: dict | None) -> None:
    """Model, JetPack, power mode and clocks under every Jetson measurement; a warning if not locked."""
    from edgecv.device import clock_warning, jetson_summary

    if jetson:
        console.print(jetson_summary(jetson))
        if warning := clock_warning(jetson):
            console.print(f"[yellow]warning: {warning}[/]")


def _progress(progress):
    def start(label: str, total: int):
        task = progress.add_task(label, total=total or None, status="")
        return lambda n: progress.advance(task, n)

    return start


@app.command()
def inspect(model: Annotated[Path, typer.Argument(help="an ONNX model (float or Q/DQ INT8)")],
            target: Annotated[str, typer.Option(help="onnxruntime | tensorrt")] = "onnxruntime",
            json_out: Annotated[Path | None, typer.Option("--json", help="write the report to this JSON file")] = None,
            debug: DebugOpt = False) -> None:
    """List every Conv/Gemm/Add/pool that will run in float on the target, and integer vs float op counts."""
    from edgecv.export.lint import format_inspect, inspect_onnx
    from edgecv.io import write_json
    from edgecv.model_files import check_paths

    report = inspect_onnx(check_paths([model])[0], target)
    console.print(format_inspect(report))
    if json_out:
        write_json(json_out, report)


@app.command()
def power(log: Annotated[Path, typer.Argument(help="a saved tegrastats log (tegrastats --interval MS --logfile LOG)")],
          frames: Annotated[int | None, typer.Option(help="images processed while the log was written: energy per image")] = None,
          duration: Annotated[float | None, typer.Option(help="seconds the log covers (default: from --interval-ms or its time stamps)")] = None,
          interval_ms: Annotated[float | None, typer.Option("--interval-ms", help="tegrastats --interval the log was written with")] = None,
          rail: Annotated[list[str] | None, typer.Option("--rail", help="sum these rails instead of the module's (repeatable)")] = None,
          json_out: Annotated[Path | None, typer.Option("--json", help="write the summary to this JSON file")] = None,
          debug: DebugOpt = False) -> None:
    """Average power per rail, module power and energy per image from a saved tegrastats log."""
    from edgecv.bench.power import format_power_summary, power_summary
    from edgecv.device import jetson_facts
    from edgecv.io import write_json

    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        raise EdgecvError(f"{str(log)!r}: cannot read the log ({exc.strerror or exc})") from None
    summary = power_summary(text, frames=frames, duration_s=duration, interval_ms=interval_ms, rails=rail)
    for line in format_power_summary(summary):
        console.print(line, markup=False)
    jetson = jetson_facts()
    _print_jetson(jetson)
    if json_out:
        write_json(json_out, {**summary, "log": str(log), "jetson": jetson})
        console.print(f"wrote {json_out}")


# --------------------------------------------------------------------------- recipes


@recipes_app.command("list")
def recipes_list() -> None:
    """The bundled recipes."""
    from edgecv.recipe import RECIPES_DIR, list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(RECIPES_DIR / f"{name}.yaml")
        stages = " -> ".join(["train", *(s.stage for s in r.stages)])
        console.print(f"[bold]{name}[/]  {r.model.name} on {r.data.dataset}: {stages}")


@recipes_app.command("show")
def recipes_show(recipe: RecipeArg, set_: SetOpt = None,
                 resolved: Annotated[bool, typer.Option(help="print with every default filled in")] = False) -> None:
    """Print a recipe (the file as written, or resolved with defaults and overrides)."""
    from edgecv.recipe import dump_recipe, resolve_recipe_path

    r = _load(recipe, set_)
    if resolved or set_:
        sys.stdout.write(dump_recipe(r))
    else:
        sys.stdout.write(resolve_recipe_path(recipe).read_text())


@recipes_app.command("validate")
def recipes_validate(recipes: Annotated[list[str], typer.Argument(help="recipe files or names")],
                     set_: SetOpt = None) -> None:
    """Check recipes against the schema; the first mistake is reported as one line (exit code 2)."""
    for spec in recipes:
        r = _load(spec, set_)
        console.print(f"ok: {spec} ({r.name}: {1 + len(r.stages)} stages)")


@recipes_app.command("schema")
def recipes_schema() -> None:
    """The recipe JSON schema (for editors and CI)."""
    from edgecv.recipe import recipe_schema

    sys.stdout.write(json.dumps(recipe_schema(), indent=2) + "\n")


TRAIN_MODULES = ("torch", "torchvision", "torch_pruning", "matplotlib")  # the `train` extra


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one `error:` line and exit 2; --debug shows tracebacks.
    Usage errors (unknown option, missing argument) are Typer's own, also exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="edgecv")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except EdgecvError as exc:
        if debug:
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume", markup=False)
        return 130
    except Exception as exc:
        if debug:
            raise
        missing = (exc.name or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
        if missing in TRAIN_MODULES:  # a training command on a device-side install
            err_console.print(f"error: this command needs {missing}, which is not installed here: install the "
                              "training extra (pip install 'edgecv[train]')", markup=False, soft_wrap=True)
            return 2
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(
            f"error: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)",
            markup=False, soft_wrap=True,
        )
        return 1
    return 0


def entry() -> None:
    """The `edgecv` console script and `python -m edgecv`: main() with its exit status."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
