"""One table cell: how a value is written (None as "-", counts with k/M/G, bytes with KiB/MiB, times and
percentages fixed-point) and how a benchmark row is named. Shared by report.md, the terminal tables and
pareto.png."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgecv.bench.measure import BenchRow

MISSING = "-"


def _si(value: float, suffixes: Sequence[tuple[float, str]]) -> str:
    for scale, suffix in suffixes:
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}".rstrip()
    return f"{value:g}"


def format_value(kind: str, value: Any) -> str:
    """One cell: None -> "-", counts with k/M/G, bytes with KiB/MiB, times and percentages fixed-point."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if kind in ("params", "macs", "count"):
        return _si(float(value), [(1e9, "G"), (1e6, "M"), (1e3, "k")])
    if kind == "size_bytes":
        return _si(float(value), [(2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B")])
    if kind in ("top1", "top5", "percent"):
        return f"{value:.2f}"
    if kind == "delta":
        return f"{value:+.2f}"
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "ms":
        return f"{value:.3f}" if value < 10 else f"{value:.2f}"
    if kind in ("throughput_ips", "memory_mb", "seconds"):
        return f"{value:,.1f}"
    if kind == "sci":
        return f"{value:.2e}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def row_label(row: BenchRow) -> str:
    """A row's name in tables and plots: `stage/format` (plus "(frames)" for a uint8 frame input), or the
    model file's name for a row that no stage made."""
    if not row.stage:
        return Path(row.model).name
    return f"{row.stage}/{row.format}" + (" (frames)" if row.input == "uint8-nhwc" else "")
