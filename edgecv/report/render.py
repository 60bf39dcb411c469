"""The run report: report.json (machine-readable), report.md (for people), pareto.png, and rich tables.

Rows are `edgecv.bench.measure.BenchRow`s (the same rows `edgecv bench --json` writes). Every number in
report.md sits in a table of its own kind, formatted; nothing is dumped as JSON. None renders as "-".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecv.bench.measure import BenchRow
from edgecv.io import atomic_write_bytes
from edgecv.report.cells import format_value, row_label
from edgecv.report.plots import pareto_png

if TYPE_CHECKING:
    from rich.table import Table



@dataclass
class ReportSections:
    """What a compress run adds to its rows: each becomes a table of report.md and a key of report.json."""

    calibration: list[dict] = field(default_factory=list)  # {"calibrator", "top1", "top5", "chosen"}
    int8_graph: dict | None = None  # inspect_onnx's report of the INT8 file, plus "file"
    parity: list[dict] = field(default_factory=list)  # {"file", "kind", "n", "max_abs_diff", ...}
    stages: list[dict] = field(default_factory=list)  # {"stage", "status", "wall_s", "top1"}
    skipped_layers: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # bench settings actually used
    device: dict = field(default_factory=dict)  # host facts
    notes: list[str] = field(default_factory=list)  # one-line verdicts (e.g. INT8 slower than float here)
    distillation: list[dict] = field(default_factory=list)  # {"finetune", "teacher", "top1", "top5"}
    prune_search: list[dict] = field(default_factory=list)  # {"ratio", "latency_ms", "macs", "params", ...}


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- tables
def summary_rows(rows: Sequence[BenchRow]) -> list[dict]:
    """What compression bought, per backend: the baseline on that backend against every later deployable
    model on it, each figure as a ratio to the baseline (accuracy as a difference in points)."""
    out = []
    for backend in dict.fromkeys(r.backend for r in rows):
        on = [r for r in rows if r.backend == backend]
        base = next((r for r in on if r.stage == "train"), None)
        if base is None:
            continue
        largest = max(base.batch_sizes, default=None)
        for r in on:
            if r is base or not r.deployable:
                continue
            b1, b1_base = r.at(min(r.batch_sizes, default=1)), base.at(min(base.batch_sizes, default=1))
            bn, bn_base = (r.at(largest), base.at(largest)) if largest else (None, None)
            out.append({
                "model": row_label(r), "backend": backend, "baseline": row_label(base),
                "top1_delta": _diff(r.top1, base.top1),
                "macs_ratio": _ratio(r.macs, base.macs), "size_ratio": _ratio(r.size_bytes, base.size_bytes),
                "speedup_b1": _ratio(b1_base.p50_ms if b1_base else None, b1.p50_ms if b1 else None),
                "throughput_ratio": _ratio(bn.throughput_ips if bn else None, bn_base.throughput_ips if bn_base else None),
                "throughput_batch": largest,
            })  # fmt: skip
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b not in (None, 0) else None


def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def _summary_table(rows: Sequence[BenchRow]) -> str:
    summary = summary_rows(rows)
    if not summary:
        return ""
    largest = summary[0]["throughput_batch"]
    header = ["model", "backend", "vs", "top-1 change (points)", "MACs", "size", "batch-1 speed-up",
              f"batch-{largest} throughput"]
    body = [[s["model"], s["backend"], s["baseline"], format_value("delta", s["top1_delta"]),
             format_value("ratio", s["macs_ratio"]), format_value("ratio", s["size_ratio"]),
             format_value("ratio", s["speedup_b1"]), format_value("ratio", s["throughput_ratio"])] for s in summary]
    return ("## What compression bought\n\nEach model against the baseline on the same backend, measured in "
            "this run (MACs and size as a fraction of the baseline's; speed-up and throughput as multiples "
            "of it).\n\n" + markdown_table(header, body))


def _models_table(rows: Sequence[BenchRow]) -> str:
    smallest = min((min(r.batch_sizes) for r in rows if r.latency), default=1)
    largest = max((max(r.batch_sizes) for r in rows if r.latency), default=1)
    header = ["stage", "format", "backend", "top-1 %", "top-5 %", "params", "MACs", "size", "memory MiB",
              f"p50 ms (batch {smallest})", f"p90 ms (batch {smallest})", f"img/s (batch {largest})", "note"]
    body = []
    for r in rows:
        lat, thr = r.at(smallest), r.at(largest)
        body.append([r.stage or Path(r.model).name, r.format, r.backend, format_value("top1", r.top1),
                     format_value("top5", r.top5), format_value("params", r.params), format_value("macs", r.macs),
                     format_value("size_bytes", r.size_bytes), format_value("memory_mb", r.memory_mb),
                     format_value("ms", lat.p50_ms if lat else None), format_value("ms", lat.p90_ms if lat else None),
                     format_value("throughput_ips", thr.throughput_ips if thr else None), _note(r)])
    return "## Every model\n\n" + markdown_table(header, body)


def _note(r: BenchRow) -> str:
    if r.deployable:
        return r.note or ""
    return "not deployable" + (f": {r.note}" if r.note else "")


def _latency_table(rows: Sequence[BenchRow]) -> str:
    header = ["model", "backend", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "img/s", "mJ/image"]
    body = [[row_label(r), r.backend, str(b.batch_size), format_value("ms", b.p50_ms), format_value("ms", b.p90_ms),
             format_value("ms", b.p99_ms), format_value("ms", b.mean_ms), format_value("throughput_ips", b.throughput_ips),
             format_value("ms", b.energy_mj_per_image)] for r in rows for b in r.latency]
    return "## Latency per batch size\n\n" + markdown_table(header, body)


def _calibration_table(calibration: list[dict]) -> str:
    body = [[c["calibrator"], format_value("top1", c.get("top1")), format_value("top5", c.get("top5")),
             "yes" if c.get("chosen") else ""] for c in calibration]
    return ("## Calibration\n\nEach calibrator's INT8 model, measured in ONNX Runtime on the validation split.\n\n"
            + markdown_table(["calibrator", "top-1 %", "top-5 %", "chosen"], body))


def _int8_graph_tables(graph: dict) -> str:
    ops = sorted(set(graph.get("int_op_counts", {})) | set(graph.get("float_op_counts", {})))
    counts = [[op, str(graph.get("int_op_counts", {}).get(op, 0)), str(graph.get("float_op_counts", {}).get(op, 0))]
              for op in ops]
    text = (f"## INT8 graph\n\n`{graph.get('file', 'model.int8.onnx')}` as {graph.get('target')} runs it.\n\n"
            + markdown_table(["op", "integer", "float"], counts))
    floats = graph.get("float_ops", [])
    if floats:
        text += "\n\nOps left in float, and why:\n\n" + markdown_table(
            ["op", "name", "reason"], [[f["op_type"], f["name"], f["reason"]] for f in floats])
    else:
        text += "\n\nNo compute op is left in float."
    for v in graph.get("violations", []):
        text += f"\n- rule violation: {v}"
    return text


def _parity_table(parity: list[dict]) -> str:
    body = [[p["file"], str(p.get("n", "")), format_value("sci", p.get("max_abs_diff")),
             format_value("percent", 100 * p["top1_agreement"] if p.get("top1_agreement") is not None else None),
             "pass" if p.get("ok") else "FAIL"] for p in parity]
    return ("## Parity with torch\n\nEach exported file against the torch model it came from, on validation "
            "images.\n\n" + markdown_table(["file", "images", "max abs diff", "top-1 agreement %", "check"], body))


def _distillation_table(rows: list[dict]) -> str:
    body = [[r["finetune"], r.get("teacher") or "-", format_value("top1", r.get("top1")),
             format_value("top5", r.get("top5"))] for r in rows]
    return ("## Distillation\n\nThe same fine-tune (same start, seed and schedule) with and without the "
            "teacher.\n\n" + markdown_table(["fine-tune", "teacher", "top-1 %", "top-5 %"], body))


def _prune_search_table(rows: list[dict]) -> str:
    first = rows[0] if rows else {}
    where = f"{first.get('backend', '')} {first.get('precision', '')}, batch {first.get('batch', '')}".strip()
    body = [[f"{r['ratio']:.3f}", format_value("ms", r.get("latency_ms")), format_value("macs", r.get("macs")),
             format_value("params", r.get("params")), "yes" if r.get("chosen") else ""] for r in rows]
    return (f"## Latency search\n\nEach pruning candidate measured on {where} (median of blocks), in the "
            "order tried.\n\n" + markdown_table(["ratio", "latency ms", "MACs", "params", "chosen"], body))


def _stages_table(stages: list[dict]) -> str:
    body = [[s["stage"], s.get("status", ""), format_value("seconds", s.get("wall_s")), format_value("top1", s.get("top1"))]
            for s in stages]
    return "## Stages\n\n" + markdown_table(["stage", "status", "wall s", "top-1 %"], body)


def _device_table(device: dict) -> str:
    flat = _flatten(device)
    return "## Device\n\n" + markdown_table(["fact", "value"], [[k, format_value("", v)] for k, v in flat.items()])


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ", ".join(str(x) for x in v)
        else:
            out[key] = v
    return out


def _how_to_read(rows: Sequence[BenchRow], settings: dict) -> str:
    sizes = sorted({b for r in rows for b in r.batch_sizes})
    measured = ", ".join(str(b) for b in sizes) or "none"
    rounds = settings.get("rounds", 1)
    method = (f" Each latency is the median of {settings['runs'] * rounds} timed runs ({rounds} "
              f"round{'s' if rounds != 1 else ''} of blocks of {settings['runs']})." if settings.get("runs") else "")
    return (
        f"How to read this: each row is one model (a stage of the recipe in one format) on one backend. "
        f"Batch sizes measured: {measured}. top-1/top-5 are accuracy on the validation split through that "
        f"backend; p50/p90 are latency per batch; img/s is images per second at the median latency.{method} "
        "Latency was timed in blocks (warm-up, then many runs of one model) on a possibly shared machine: "
        "compare ratios within this report rather than absolute numbers across runs. Rows marked "
        "'not deployable' (a pruned model before fine-tuning, a torch fake-quant model) are there for "
        "comparison only. A '-' means not measured."
    )


def render_markdown(rows: Sequence[BenchRow], sections: ReportSections | None = None, title: str = "") -> str:
    s = sections or ReportSections()
    parts = [f"# {title or 'edgecv report'}"]
    parts += [p for p in (_summary_table(rows),) if p]
    parts += [_models_table(rows), _how_to_read(rows, s.settings), _latency_table(rows)]
    parts += [f"- {n}" for n in s.notes]
    if s.calibration:
        parts.append(_calibration_table(s.calibration))
    if s.int8_graph:
        parts.append(_int8_graph_tables(s.int8_graph))
    if s.skipped_layers:
        parts.append("Layers kept in float: " + ", ".join(f"`{n}`" for n in s.skipped_layers))
    if s.parity:
        parts.append(_parity_table(s.parity))
    if s.prune_search:
        parts.append(_prune_search_table(s.prune_search))
    if s.distillation:
        parts.append(_distillation_table(s.distillation))
    if s.stages:
        parts.append(_stages_table(s.stages))
    if s.device:
        parts.append(_device_table(s.device))
    parts.append("![accuracy vs latency and throughput](pareto.png)")
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------ writing
def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null, like other missing values."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def report_document(rows: Sequence[BenchRow], sections: ReportSections | None = None) -> dict:
    """report.json: {"rows": [BenchRow dicts], "summary": [...], and each section}."""
    from dataclasses import asdict

    s = asdict(sections or ReportSections())
    return _json_safe({"rows": [r.to_dict() for r in rows], "summary": summary_rows(rows), **s})


def write_report(run_dir: Path, rows: Sequence[BenchRow], sections: ReportSections | None = None,
                 title: str = "") -> dict[str, Path]:
    """Write report.json, report.md and pareto.png into `run_dir`, each atomically; returns their paths."""
    run_dir = Path(run_dir)
    paths = {"json": run_dir / "report.json", "markdown": run_dir / "report.md", "pareto": run_dir / "pareto.png"}
    document = json.dumps(report_document(rows, sections), indent=2, default=str) + "\n"
    atomic_write_bytes(paths["json"], document.encode())
    atomic_write_bytes(paths["markdown"], render_markdown(rows, sections, title).encode())
    atomic_write_bytes(paths["pareto"], pareto_png(rows, title))
    return paths


# --------------------------------------------------------------------------------------- rich tables
def bench_table(rows: Sequence[BenchRow], title: str = "") -> Table:
    """Rows as a rich table for the terminal: one line per model x backend x batch size; columns that no
    row measured (e.g. energy off a Jetson) are left out."""
    from rich.table import Table

    columns = [("model", "left"), ("backend", "left"), ("batch", "right"), ("p50 ms", "right"),
               ("p90 ms", "right"), ("p99 ms", "right"), ("img/s", "right")]
    optional = {"top-1 %": any(r.top1 is not None for r in rows), "top-5 %": any(r.top5 is not None for r in rows),
                "memory MiB": any(r.memory_mb is not None for r in rows),
                "mJ/image": any(b.energy_mj_per_image is not None for r in rows for b in r.latency)}
    columns += [(name, "right") for name, present in optional.items() if present]
    table = Table(title=title or None)
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        for b in r.latency:
            cells = {"model": row_label(r), "backend": r.backend, "batch": str(b.batch_size),
                     "p50 ms": format_value("ms", b.p50_ms), "p90 ms": format_value("ms", b.p90_ms),
                     "p99 ms": format_value("ms", b.p99_ms), "img/s": format_value("throughput_ips", b.throughput_ips),
                     "top-1 %": format_value("top1", r.top1), "top-5 %": format_value("top5", r.top5),
                     "memory MiB": format_value("memory_mb", r.memory_mb),
                     "mJ/image": format_value("ms", b.energy_mj_per_image)}
            table.add_row(*(cells[name] for name, _ in columns))
    return table
