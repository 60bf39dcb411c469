"""End of `compress`: measure every stage's model and every exported file with the same benchmark,
then write report.json / report.md / pareto.png into the run dir."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from edgecv.console import console, make_progress
from edgecv.data import DataBundle
from edgecv.data.loaders import LimitedLoader
from edgecv.recipe import Recipe


def _numpy_batches(loader):
    for x, y in loader:
        yield x.numpy(), y.numpy()


def evaluate_runner(runner, data: DataBundle, limit: int | None, progress=None, label: str = "") -> dict:
    from edgecv.bench.accuracy import evaluate

    loader = LimitedLoader(data.val, limit) if limit else data.val
    task = progress.add_task(f"accuracy {label}", total=len(loader), status="") if progress else None
    acc = evaluate(runner, _numpy_batches(loader), progress=(lambda n: progress.advance(task)) if progress else None)
    if progress:
        progress.remove_task(task)
    return acc


def timed_blocks(runners: dict, input_shape, batch_sizes, warmup: int, runs: int, rounds: int, progress) -> dict:
    """benchmark_blocks with one progress bar over all timed runs."""
    from edgecv.bench.latency import benchmark_blocks

    total = len(runners) * len(batch_sizes) * runs * rounds
    task = progress.add_task("latency (blocks)", total=total, status="")
    out = benchmark_blocks(runners, input_shape, batch_sizes, warmup, runs, rounds,
                           lambda n: progress.advance(task, n))
    progress.remove_task(task)
    return out


def _float_structure(stage_models: list[tuple[str, Path, nn.Module, bool]], spec: dict) -> dict[str, tuple[int, int]]:
    """MACs and params of each stage; a quantized stage has its float parent's structure."""
    import torch

    from edgecv.compress.prune import count_macs_params

    out, last = {}, (None, None)
    example = torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"])
    for name, _, model, quantized in stage_models:
        if not quantized:
            last = count_macs_params(model, example)
        out[name] = last
    return out


def summarize(rows: list[dict], largest_batch: int) -> dict:
    """Headline comparisons a user asks first: baseline vs pruned vs INT8, speed-ups measured in this run."""
    by = {(r["stage"], r["format"]): r for r in rows}
    summary: dict = {}
    base = by.get(("train", "torch"))
    onnx = next((r for r in rows if r["format"] == "onnx"), None)
    int8 = next((r for r in rows if r["format"] == "onnx-int8"), None)
    if base:
        summary["baseline_top1"] = base["top1"]
    pruned = [r for r in rows if r["format"] == "torch" and r["stage"] != "train" and r.get("macs")]
    if base and pruned and base.get("macs"):
        summary["macs_kept"] = round(pruned[-1]["macs"] / base["macs"], 4)
    if onnx:
        summary["float_onnx_top1"] = onnx["top1"]
    if int8:
        summary["int8_onnx_top1"] = int8["top1"]
    if onnx and int8:
        summary["int8_top1_delta"] = round(int8["top1"] - onnx["top1"], 3)
        if onnx.get("latency_ms_p50") and int8.get("latency_ms_p50"):
            summary["int8_speedup_b1"] = round(onnx["latency_ms_p50"] / int8["latency_ms_p50"], 3)
        if onnx.get("throughput_ips") and int8.get("throughput_ips"):
            summary[f"int8_throughput_ratio_b{largest_batch}"] = round(int8["throughput_ips"] / onnx["throughput_ips"], 3)
    if base and onnx:
        summary["float_onnx_vs_baseline_top1"] = round(onnx["top1"] - base["top1"], 3)
    return summary


def bench_and_report(recipe: Recipe, run_dir: Path, manifest: dict, data: DataBundle, spec: dict, device: str) -> dict:
    from edgecv.bench.device import host_facts
    from edgecv.bench.runners import create_runner
    from edgecv.report.render import rows_table, write_report
    from edgecv.train.checkpoint import load_model

    bench = recipe.bench
    dev = "cuda" if device.startswith("cuda") else "cpu"
    stage_models = []
    measured = {}  # torch accuracy the stages already measured on the whole validation split
    for entry in manifest["stages"]:
        path = run_dir / entry["dir"] / "model.pt"
        if entry["name"] != "export" and path.exists():
            model, _ = load_model(path)
            stage_models.append((entry["name"], path, model, bool(entry.get("quantized"))))
            m = entry.get("metrics", {})
            if bench.eval_limit is None and "accuracy_backend" not in m and {"top1", "top5"} <= set(m):
                measured[f"{entry['name']}/torch"] = {"top1": m["top1"], "top5": m["top5"]}
    structure = _float_structure(stage_models, spec)
    runners, meta = {}, {}
    if "torch" in bench.backends:
        for name, path, model, _ in stage_models:
            key = f"{name}/torch"
            runners[key] = create_runner("torch", model, device=dev, threads=bench.threads)
            macs, params = structure[name]
            meta[key] = {"stage": name, "format": "torch", "backend": "torch", "params": params, "macs": macs,
                         "size_bytes": path.stat().st_size}
    export_dir = run_dir / "export"
    sections: dict = {}
    metadata_file = export_dir / "metadata.json"
    if metadata_file.exists():
        metadata = json.loads(metadata_file.read_text())
        float_stage = next((n for n, _, _, q in reversed(stage_models) if not q), None)
        int8_stage = next((n for n, _, _, q in reversed(stage_models) if q), None)
        for fname, info in metadata.get("files", {}).items():
            backend = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime", "engine": "tensorrt"}.get(info["format"])
            if backend not in bench.backends:
                continue
            quantized = info["format"] == "onnx-int8" or (
                info["format"] == "engine" and "model.int8.onnx" in metadata.get("files", {})
            )
            stage = int8_stage if quantized else float_stage
            key = f"{stage}/{info['format']}"
            runners[key] = create_runner(backend, export_dir / fname, device="cuda" if backend == "tensorrt" else dev,
                                         threads=bench.threads)
            macs, params = structure.get(stage, (None, None))
            meta[key] = {"stage": stage, "format": info["format"], "backend": backend, "params": params,
                         "macs": macs, "size_bytes": (export_dir / fname).stat().st_size}
            if "inspect" in info:
                insp = info["inspect"]
                sections["int8_graph"] = {
                    "file": fname,
                    "target": insp.get("target"),
                    "integer_ops": insp.get("int_op_counts"),
                    "float_ops": insp.get("float_op_counts"),
                    "float_op_list": insp.get("float_ops"),
                    "violations": insp.get("violations", []),
                }
            sections.setdefault("parity", {})[fname] = info.get("parity")
    console.rule("[bold]bench")
    largest = max(bench.batch_sizes)
    with make_progress() as progress:
        accuracy = {k: measured.get(k) or evaluate_runner(r, data, bench.eval_limit, progress, k)
                    for k, r in runners.items()}
        latency = timed_blocks(runners, data.input_shape, bench.batch_sizes, bench.warmup, bench.runs,
                               bench.rounds, progress)
    rows = []
    for key, m in meta.items():
        lat1 = latency[key].get(min(bench.batch_sizes))
        latn = latency[key].get(largest)
        rows.append({
            **m,
            "top1": round(accuracy[key]["top1"], 3),
            "top5": round(accuracy[key]["top5"], 3),
            "latency_ms_p50": round(lat1.p50_ms, 4) if lat1 else None,
            "latency_ms_p90": round(lat1.p90_ms, 4) if lat1 else None,
            "throughput_ips": round(latn.throughput_ips, 1) if latn else None,
            "latency_batch": min(bench.batch_sizes),
            "throughput_batch": largest,
            "latency_by_batch": {bs: s.as_dict() for bs, s in latency[key].items()},
        })
    stage_metrics = {e["dir"]: e.get("metrics", {}) for e in manifest["stages"]}
    for e in manifest["stages"]:
        m = e.get("metrics", {})
        if "calibrators" in m:
            sections["calibration"] = {"calibrators": m["calibrators"], "chosen": m.get("calibrator"),
                                       "backend": "onnxruntime"}
        if m.get("skipped_layers"):
            sections["skipped_layers"] = m["skipped_layers"]
    sections["summary"] = summarize(rows, largest)
    sections["stages"] = [
        {"stage": e["dir"], "status": e["status"], "wall_s": e.get("wall_s"),
         "top1": stage_metrics[e["dir"]].get("top1")}
        for e in manifest["stages"]
    ]
    sections["bench"] = {"batch_sizes": bench.batch_sizes, "warmup": bench.warmup, "runs": bench.runs,
                         "rounds": bench.rounds, "threads": bench.threads, "method": "blocks (DESIGN.md)"}
    sections["device"] = host_facts()
    paths = write_report(run_dir, rows, sections, title=f"edgecv report: {recipe.name}")
    console.print(rows_table(rows, title=f"{recipe.name}: accuracy, size and latency per stage"))
    s = sections["summary"]
    if "int8_speedup_b1" in s:
        console.print(
            f"INT8 vs float ONNX: top-1 {s['int8_top1_delta']:+.2f} points, batch-1 speed-up x{s['int8_speedup_b1']}, "
            f"batch-{largest} throughput x{s.get(f'int8_throughput_ratio_b{largest}')}"
        )
    console.print(f"report: {paths['markdown']}  {paths['json']}  {paths['pareto']}")
    return {"rows": rows, "sections": sections, "paths": {k: str(v) for k, v in paths.items()}}
