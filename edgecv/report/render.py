"""The run report: report.json (machine-readable), report.md (for people), pareto.png, and rich tables.

A row is one model stage in one format (torch | onnx | onnx-int8 | engine) with ROW_FIELDS; None means
"not measured" and renders as "-".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecv.bench import BENCH_FIELDS
from edgecv.io import atomic_write_bytes

if TYPE_CHECKING:
    from rich.table import Table

ROW_FIELDS = (
    "stage",
    "format",
    "backend",
    "top1",
    "top5",
    "params",
    "macs",
    "size_bytes",
    "latency_ms_p50",
    "latency_ms_p90",
    "throughput_ips",
)
FORMATS = ("torch", "onnx", "onnx-int8", "engine")
MISSING = "-"

_HEADERS = {
    "stage": "stage",
    "format": "format",
    "backend": "backend",
    "top1": "top-1 %",
    "top5": "top-5 %",
    "params": "params",
    "macs": "MACs",
    "size_bytes": "size",
    "latency_ms_p50": "p50 ms",
    "latency_ms_p90": "p90 ms",
    "throughput_ips": "img/s",
    "model": "model",
    "batch_size": "batch",
    "p50_ms": "p50 ms",
    "p90_ms": "p90 ms",
    "p99_ms": "p99 ms",
    "memory_mb": "memory MiB",
    "energy_mj_per_image": "mJ/img",
}
BENCH_COLUMNS = BENCH_FIELDS  # `edgecv bench` result keys, in display order

HOW_TO_READ = (
    "How to read this: each row is one stage of the recipe in one format. top-1/top-5 are accuracy on "
    "the validation split; p50/p90 are the median and 90th-percentile latency of one batch of 1 image, "
    "img/s the throughput (images/s at the median latency) at the largest batch size the recipe's bench "
    "section lists. Latency was timed in blocks (warm-up, then many runs), and these "
    "machines are noisy: compare ratios within this report rather than absolute numbers across runs. "
    "pareto.png plots top-1 against latency; the points on the front are the ones worth shipping. "
    "A '-' means not measured."
)


# -------------------------------------------------------------------------------------------- values
def _si(value: float, suffixes: Sequence[tuple[float, str]]) -> str:
    for scale, suffix in suffixes:
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}".rstrip()
    return f"{value:g}"


def format_value(field: str, value: Any) -> str:
    """One cell: None -> "-", counts with k/M/G, bytes with KiB/MiB, times and percentages fixed-point."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, (dict, list)):
            return json.dumps(value, default=str)
        return str(value)
    if field in ("params", "macs"):
        return _si(float(value), [(1e9, "G"), (1e6, "M"), (1e3, "k")])
    if field == "size_bytes":
        return _si(float(value), [(2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B")])
    if field in ("top1", "top5"):
        return f"{value:.2f}"
    if field.endswith("_ms") or field.startswith("latency_ms") or field == "energy_mj_per_image":
        return f"{value:.3f}" if value < 10 else f"{value:.2f}"
    if field in ("throughput_ips", "memory_mb"):
        return f"{value:.1f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _columns(rows: Sequence[dict], preferred: Sequence[str]) -> list[str]:
    """Preferred fields first, then any other keys the rows carry, in first-seen order."""
    extra: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in preferred:
                extra[key] = None
    return [*preferred, *extra]


# ------------------------------------------------------------------------------------------ markdown
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    header = "| " + " | ".join(_md_cell(_HEADERS.get(c, c)) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_md_cell(format_value(c, row.get(c))) for c in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def render_section(name: str, value: Any) -> str:
    """A section of report.md: dict -> key/value table, list of dicts -> table, anything else -> text."""
    title = f"## {name.replace('_', ' ')}\n\n"
    if isinstance(value, dict):
        if not value:
            return title + MISSING
        lines = ["| key | value |", "|---|---|"]
        lines += [f"| {_md_cell(str(k))} | {_md_cell(format_value(str(k), v))} |" for k, v in value.items()]
        return title + "\n".join(lines)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return title + markdown_table(value, _columns(value, []))
    if isinstance(value, list):
        return title + ("\n".join(f"- {format_value('', v)}" for v in value) or MISSING)
    return title + format_value("", value)


def render_markdown(rows: Sequence[dict], sections: dict | None = None, title: str = "") -> str:
    parts = [f"# {title or 'edgecv report'}", markdown_table(rows, _columns(rows, ROW_FIELDS)), HOW_TO_READ]
    parts += [render_section(name, value) for name, value in (sections or {}).items()]
    parts.append("![top-1 vs latency](pareto.png)")
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


def write_report(
    run_dir: Path, rows: list[dict], sections: dict | None = None, title: str = ""
) -> dict[str, Path]:
    """Write report.json ({"rows": rows, **sections}), report.md and pareto.png into `run_dir`, each
    atomically; returns {"json": path, "markdown": path, "pareto": path}."""
    from edgecv.report.plots import pareto_png

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sections = dict(sections or {})
    if "rows" in sections:
        raise ValueError("sections must not contain a 'rows' key: rows are passed separately")
    paths = {
        "json": run_dir / "report.json",
        "markdown": run_dir / "report.md",
        "pareto": run_dir / "pareto.png",
    }
    document = _json_safe({"rows": rows, **sections})
    atomic_write_bytes(paths["json"], (json.dumps(document, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(paths["markdown"], render_markdown(rows, sections, title).encode())
    atomic_write_bytes(paths["pareto"], pareto_png(rows, title))
    return paths


# --------------------------------------------------------------------------------------- rich tables
def _rich_table(rows: Sequence[dict], columns: Sequence[str], title: str) -> Table:
    from rich.table import Table

    table = Table(title=title or None)
    for column in columns:
        numeric = column not in ("stage", "format", "backend", "model")
        table.add_column(_HEADERS.get(column, column), justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(format_value(c, row.get(c)) for c in columns))
    return table


def rows_table(rows: list[dict], title: str = "") -> Table:
    """The report rows as a rich table for the terminal."""
    return _rich_table(rows, ROW_FIELDS, title)


def bench_table(results: list[dict]) -> Table:
    """`edgecv bench` results (edgecv.bench.result_rows dicts) as a rich table; columns that no result
    measured (e.g. energy off a Jetson) are left out."""
    always = ("model", "backend", "batch_size", "p50_ms", "p90_ms", "p99_ms", "throughput_ips")
    columns = [c for c in BENCH_COLUMNS if c in always or any(r.get(c) is not None for r in results)]
    return _rich_table(results, columns, "")
