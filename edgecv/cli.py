"""The `edgecv` command line. Thin: parse, load the recipe, call the library, print."""

from __future__ import annotations

import functools
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
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
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
                target: Annotated[str | None, typer.Option(help="onnxruntime | tensorrt (default: the recipe's)")] = None,
                top: Annotated[int, typer.Option(help="rows to print")] = 20,
                json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows to this file")] = None,
                debug: DebugOpt = False) -> None:
    """Per-layer INT8 sensitivity of the float model that the recipe's first ptq/qat stage would quantize."""
    import torch
    from rich.table import Table

    from edgecv.io import write_json
    from edgecv.pipeline import Pipeline
    from edgecv.stages import sensitivity_rows
    from edgecv.train.checkpoint import load_model

    if metric not in ("sqnr", "accuracy"):
        raise EdgecvError(f"--metric {metric!r}: choose sqnr or accuracy")
    r = _load(recipe, set_)
    quant = [s for s in r.stages if s.stage in ("ptq", "qat")]
    tgt = target or (quant[0].target if quant else "onnxruntime")
    if tgt not in ("onnxruntime", "tensorrt"):
        raise EdgecvError(f"--target {tgt!r}: choose onnxruntime or tensorrt")
    pipe = Pipeline(r, out, device, _data_root(data))
    result = pipe.run(report=False, stop_before=("ptq", "qat", "export"))
    last = next(reversed(result["outputs"].values()))
    model = load_model(last)[0]
    spec = result["spec"]
    example = torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"])
    rows = sensitivity_rows(model, tgt, result["data"], example, metric=metric)
    write_json(json_out or pipe.run_dir / "sensitivity.json", rows)
    table = Table(title=f"INT8 sensitivity per layer ({tgt}, most sensitive first)")
    for col in ("rank", "layer", "SQNR dB", "top-1 drop"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for i, row in enumerate(rows[:top], 1):
        drop = row.get("top1_drop")
        table.add_row(str(i), row["layer"], f"{row['sqnr_db']:.2f}", "-" if drop is None else f"{drop:.2f}")
    console.print(table)
    console.print(f"keep the N most sensitive layers in float with: skip_layers: auto:N   ({len(rows)} layers)")


@functools.lru_cache(maxsize=4)
def _checkpoint_at(path: Path, mtime_ns: int) -> dict:
    from edgecv.train.checkpoint import read_checkpoint

    return read_checkpoint(path)


def _checkpoint(path: Path) -> dict:
    """A .pt checkpoint, read once per command however many helpers need its spec, data or weights."""
    return _checkpoint_at(path.resolve(), path.stat().st_mtime_ns)


def _model_input_shape(path: Path) -> tuple[int, int, int]:
    """C, H, W of a model file: from a checkpoint's spec, an ONNX input, or engine metadata."""
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        spec = _checkpoint(path)["model"]
        return (spec["in_channels"], spec["image_size"], spec["image_size"])
    if suffix == ".onnx":
        import onnx

        try:
            m = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise EdgecvError(f"{str(path)!r} is not an ONNX model ({type(exc).__name__})") from None
        dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or not all(dims[1:]):
            raise EdgecvError(f"{str(path)!r}: expected an NCHW input with fixed C, H, W; got {dims}")
        return (dims[1], dims[2], dims[3])
    if suffix in (".engine", ".plan", ".trt"):
        from edgecv.export.tensorrt import read_metadata

        meta = read_metadata(path)
        shape = list(meta.input_shape_opt)
        return (shape[1], shape[2], shape[3])
    raise EdgecvError(f"{str(path)!r}: unknown model file type {suffix!r} (expected .pt, .onnx or .engine)")


def _default_backend(path: Path) -> str:
    s = path.suffix.lower()
    return {".pt": "torch", ".pth": "torch", ".onnx": "onnxruntime"}.get(s, "tensorrt")


def _make_runner(path: Path, backend: str, device: str, threads: int | None):
    from edgecv.bench.runners import create_runner

    if backend == "torch":
        if path.suffix.lower() not in (".pt", ".pth"):
            raise EdgecvError(f"{str(path)!r}: the torch backend runs edgecv checkpoints (.pt), not {path.suffix}")
        from edgecv.train.checkpoint import model_from_checkpoint

        return create_runner("torch", model_from_checkpoint(_checkpoint(path), path)[0], device=device,
                             threads=threads)
    return create_runner(backend, path, device=device, threads=threads)


def _data_for_model(path: Path, recipe: str | None, data: str | None, limit: int | None):
    """Validation data for a model file: the recipe's, else the data section stored with the model."""
    from edgecv.data import build_data
    from edgecv.recipe import DataConfig

    if recipe:
        cfg = _load(recipe, None).data
    else:
        stored = None
        if path.suffix.lower() in (".pt", ".pth"):
            stored = _checkpoint(path).get("meta", {}).get("data")
        else:
            meta = path.parent / "metadata.json"
            if meta.exists():
                stored = json.loads(meta.read_text()).get("data")
        if stored is None:
            raise EdgecvError(f"{str(path)!r}: no dataset recorded with this model; pass --recipe RECIPE")
        cfg = DataConfig.model_validate(stored)
    if limit:
        cfg = cfg.model_copy(update={"limit_val": limit})
    return build_data(cfg, _data_root(data))


def _paths(models: list[Path]) -> list[Path]:
    for p in models:
        if not p.exists():
            raise EdgecvError(f"model file {str(p)!r} does not exist")
        if p.is_dir():
            raise EdgecvError(f"{str(p)!r} is a folder, not a model file")
    return models


@app.command("eval")
def eval_(model: Annotated[Path, typer.Argument(help="model file: .pt (torch), .onnx (ONNX Runtime) or .engine")],
          recipe: Annotated[str | None, typer.Option(help="recipe whose validation data to use")] = None,
          backend: Annotated[str | None, typer.Option(help="torch | onnxruntime | tensorrt (default: by file type)")] = None,
          device: DeviceOpt = "auto", data: DataOpt = None,
          limit: Annotated[int | None, typer.Option(help="evaluate the first N validation images")] = None,
          json_out: Annotated[Path | None, typer.Option("--json", help="write the result to this JSON file")] = None,
          debug: DebugOpt = False) -> None:
    """Top-1 / top-5 accuracy of a model file on a validation set."""
    from edgecv.io import write_json
    from edgecv.pipeline import resolve_device
    from edgecv.reporting import evaluate_runner

    path = _paths([model])[0]
    dev = "cuda" if resolve_device(device).startswith("cuda") else "cpu"
    runner = _make_runner(path, backend or _default_backend(path), dev, None)
    bundle = _data_for_model(path, recipe, data, limit)
    acc = evaluate_runner(runner, bundle, None)
    result = {"model": str(path), "backend": runner.backend, "top1": round(acc["top1"], 3),
              "top5": round(acc["top5"], 3), "n": acc["n"]}
    if json_out:
        write_json(json_out, result)
    console.print(f"{path}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  ({acc['n']} images, {runner.backend})")


@app.command()
def export(model: Annotated[Path, typer.Argument(help="edgecv checkpoint (.pt) from a run dir")],
           out: Annotated[Path | None, typer.Option("--out", help="output .onnx file (default: next to MODEL)")] = None,
           opset: Annotated[int, typer.Option(help="ONNX opset (>= 13)")] = 17,
           tensorrt: Annotated[bool, typer.Option(help="also build a TensorRT engine (needs TensorRT)")] = False,
           debug: DebugOpt = False) -> None:
    """Export a checkpoint to ONNX (Q/DQ INT8 when it was quantized), checked against torch."""
    import torch

    from edgecv.export.onnx import check_parity, export_onnx, model_size_bytes
    from edgecv.train.checkpoint import model_from_checkpoint

    path = _paths([model])[0]
    if opset < 13:
        raise EdgecvError(f"--opset {opset}: Q/DQ export needs opset 13 or newer")
    net, header = model_from_checkpoint(_checkpoint(path), path)
    quantized = header.get("quant") is not None
    dest = out or path.with_suffix(".int8.onnx" if quantized else ".onnx")
    if dest.suffix != ".onnx":
        raise EdgecvError(f"--out {str(dest)!r}: the file name must end in .onnx")
    c, h, w = _model_input_shape(path)
    export_onnx(net, dest, torch.zeros(1, c, h, w), opset=opset)
    g = torch.Generator().manual_seed(0)
    parity = check_parity(net, dest, torch.randn(64, c, h, w, generator=g), int8=quantized)
    console.print(f"wrote {dest} ({model_size_bytes(dest):,} bytes); parity vs torch: "
                  + (f"top-1 agreement {100 * parity['top1_agreement']:.1f}%" if quantized
                     else f"max |diff| {parity['max_abs_diff']:.2e}"))
    if tensorrt:
        from edgecv.export.tensorrt import build_engine

        build_engine(dest, dest.with_suffix(".engine"), precision="int8" if quantized else "fp16")


@app.command()
def bench(models: Annotated[list[Path], typer.Argument(help="model files (.pt, .onnx, .engine)")],
          backend: Annotated[list[str] | None, typer.Option("--backend", help="torch | onnxruntime | tensorrt (repeatable; default: by file type)")] = None,
          batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8",
          warmup: Annotated[int, typer.Option(help="warm-up runs per block")] = 10,
          runs: Annotated[int, typer.Option(help="timed runs per block")] = 50,
          rounds: Annotated[int, typer.Option(help="rounds of blocks")] = 3,
          threads: Annotated[int | None, typer.Option(help="CPU threads (default: all)")] = None,
          recipe: Annotated[str | None, typer.Option(help="recipe whose validation data measures accuracy")] = None,
          accuracy: Annotated[bool, typer.Option(help="measure top-1/top-5 on the validation data")] = True,
          limit: Annotated[int | None, typer.Option(help="accuracy on the first N validation images")] = None,
          power: Annotated[bool, typer.Option(help="sample tegrastats for power and energy (Jetson)")] = False,
          device: DeviceOpt = "auto", data: DataOpt = None,
          json_out: Annotated[Path | None, typer.Option("--json", help="write results as JSON to this file")] = None,
          debug: DebugOpt = False) -> None:
    """Latency percentiles, throughput, memory, accuracy (and power on a Jetson), side by side."""
    from edgecv.bench import peak_memory_mb, result_rows
    from edgecv.bench.device import host_facts
    from edgecv.io import write_json
    from edgecv.pipeline import resolve_device
    from edgecv.report.render import bench_table
    from edgecv.reporting import evaluate_runner

    try:
        sizes = sorted({int(b) for b in batch_sizes.split(",") if b.strip()})
    except ValueError:
        raise EdgecvError(f"--batch-sizes {batch_sizes!r}: expected comma-separated integers, e.g. 1,8") from None
    if not sizes or min(sizes) < 1:
        raise EdgecvError(f"--batch-sizes {batch_sizes!r}: batch sizes must be >= 1")
    for b in backend or []:
        from edgecv.bench.runners import RUNNERS

        RUNNERS.get(b)
    dev = "cuda" if resolve_device(device).startswith("cuda") else "cpu"
    paths = _paths(models)
    shapes = {p: _model_input_shape(p) for p in paths}
    if len(set(shapes.values())) > 1:
        raise EdgecvError("models have different input shapes: " + ", ".join(f"{p.name} {s}" for p, s in shapes.items()))
    runners, memory = {}, {}
    for p in paths:
        for b in backend or [_default_backend(p)]:
            key = f"{p}@{b}"
            runners[key] = _make_runner(p, b, dev, threads)
    input_shape = next(iter(shapes.values()))
    import numpy as np

    for key, r in runners.items():
        batch = np.zeros((max(sizes), *input_shape), dtype=np.float32)
        memory[key] = peak_memory_mb(lambda r=r, batch=batch: r(batch), device=dev)
    acc = {}
    if accuracy:
        bundle = _data_for_model(paths[0], recipe, data, limit)
        for key, r in runners.items():
            acc[key] = evaluate_runner(r, bundle, None)
    energy: dict = {}
    if power:
        from edgecv.bench.power import TegrastatsSampler

        if not TegrastatsSampler.available():
            raise EdgecvError("--power: tegrastats was not found (power is measured on NVIDIA Jetson boards)")
        energy = _measure_energy(runners, input_shape, sizes, warmup, runs)
    from edgecv.console import make_progress
    from edgecv.reporting import timed_blocks

    with make_progress() as progress:
        latency = timed_blocks(runners, input_shape, sizes, warmup, runs, rounds, progress)
    results = []
    for key in runners:
        model_name, _, b = key.rpartition("@")
        results += result_rows(model_name, b, latency[key], memory_mb=round(memory[key], 1),
                               size_bytes=Path(model_name).stat().st_size, accuracy=acc.get(key),
                               energy=energy.get(key))
    console.print(bench_table(results))
    if json_out:
        write_json(json_out, {"results": results, "device": host_facts(),
                              "runners": {k: r.describe() for k, r in runners.items()},
                              "settings": {"batch_sizes": sizes, "warmup": warmup, "runs": runs, "rounds": rounds,
                                           "threads": threads}})
        console.print(f"wrote {json_out}")


def _measure_energy(runners: dict, input_shape, sizes, warmup: int, runs: int) -> dict:
    """Per runner and batch size: energy per image from tegrastats sampled during a timed block."""
    from edgecv.bench.latency import synthetic_batch
    from edgecv.bench.power import measure_energy

    return {
        key: {bs: measure_energy(r, synthetic_batch(input_shape, bs), warmup, max(runs, 200), interval_ms=50)
              for bs in sizes}
        for key, r in runners.items()
    }


@app.command()
def inspect(model: Annotated[Path, typer.Argument(help="an ONNX model (float or Q/DQ INT8)")],
            target: Annotated[str, typer.Option(help="onnxruntime | tensorrt")] = "onnxruntime",
            json_out: Annotated[Path | None, typer.Option("--json", help="write the report to this JSON file")] = None,
            debug: DebugOpt = False) -> None:
    """List every Conv/Gemm/Add/pool that will run in float on the target, and integer vs float op counts."""
    from edgecv.export.inspect import format_inspect, inspect_onnx
    from edgecv.io import write_json

    path = _paths([model])[0]
    if target not in ("onnxruntime", "tensorrt"):
        raise EdgecvError(f"--target {target!r}: choose onnxruntime or tensorrt")
    report = inspect_onnx(path, target)
    console.print(format_inspect(report))
    if json_out:
        write_json(json_out, report)


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
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(
            f"error: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)",
            markup=False, soft_wrap=True,
        )
        return 1
    return 0


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
