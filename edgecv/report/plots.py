"""pareto.png: which model to ship. Left: top-1 against batch-1 latency (log scale); right: top-1 against
throughput at the largest batch. The accuracy axis is fitted to the deployable models; rows measured only
for comparison (a pruned model before fine-tuning, torch fake-quant) are drawn hollow, and pinned to the
bottom edge with their value when they fall below it. The Pareto front is a line through its points.

matplotlib is imported here only, with the Agg canvas and no pyplot (no global state, no display)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from edgecv.bench.measure import BenchRow
from edgecv.report.cells import row_label


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    top1: float
    deployable: bool


def plot_points(rows: Sequence[BenchRow], metric: str = "latency") -> list[Point]:
    """One point per row with top-1 and the metric: 'latency' (p50 ms at the smallest batch) or
    'throughput' (img/s at the largest batch)."""
    points = []
    for r in rows:
        if r.top1 is None or r.top1 != r.top1 or not r.latency:  # missing or NaN
            continue
        b = r.at(min(r.batch_sizes)) if metric == "latency" else r.at(max(r.batch_sizes))
        x = b.p50_ms if metric == "latency" else b.throughput_ips
        if x is not None and x > 0:
            points.append(Point(f"{row_label(r)} ({r.backend})", float(x), float(r.top1), r.deployable))
    return points


def pareto_front(points: Sequence[Point], lower_is_better: bool = True) -> list[Point]:
    """The deployable points that no other deployable point beats on both the metric and top-1."""
    front: list[Point] = []
    best = float("-inf")
    ordered = sorted((p for p in points if p.deployable), key=lambda p: (p.x if lower_is_better else -p.x, -p.top1))
    for p in ordered:
        if p.top1 > best:
            front.append(p)
            best = p.top1
    return front


def _y_limits(points: Sequence[Point]) -> tuple[float, float]:
    fit = [p.top1 for p in points if p.deployable] or [p.top1 for p in points]
    lo, hi = min(fit), max(fit)
    pad = max(0.5, 0.15 * (hi - lo))
    return lo - pad, min(100.0, hi + pad)


def _spread_labels(ys: list[float], min_gap: float) -> list[float]:
    """Label heights near `ys` (same order) at least `min_gap` apart: a greedy pass upwards."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = list(ys)
    last = float("-inf")
    for i in order:
        placed[i] = max(ys[i], last + min_gap)
        last = placed[i]
    return placed


def _panel(ax, points: Sequence[Point], lower_is_better: bool, xlabel: str) -> None:
    lo, hi = _y_limits(points)
    ax.set_xscale("log")
    ax.set_ylim(lo, hi)
    front = pareto_front(points, lower_is_better)
    on_front = set(front)
    for p in points:
        y = min(max(p.top1, lo), hi)
        style = {"color": "C0" if p in on_front else "0.45", "zorder": 3, "s": 36}
        if not p.deployable:
            style.update(facecolors="none", edgecolors="0.45", color=None)
        ax.scatter([p.x], [y], marker="v" if p.top1 < lo else "o", **style)
    if front:
        ax.plot([p.x for p in front], [p.top1 for p in front], color="C0", alpha=0.7, label="Pareto front")
    labels = [(p, min(max(p.top1, lo), hi)) for p in points]
    heights = _spread_labels([y for _, y in labels], (hi - lo) / 22)
    for (p, y), ly in zip(labels, heights, strict=True):
        text = p.label if p.deployable else f"{p.label} {p.top1:.1f}% (not deployable)"
        ax.annotate(text, (p.x, y), xytext=(p.x * 1.12, ly), textcoords="data", fontsize=7, ha="left",
                    va="center", xycoords="data", annotation_clip=False)
    xs = [p.x for p in points]
    ax.set_xlim(min(xs) / 1.5, max(xs) * 8)  # room on the right for the labels
    ax.set_xlabel(xlabel)
    ax.grid(True, which="both", alpha=0.25)


def pareto_png(rows: Sequence[BenchRow], title: str = "") -> bytes:
    """PNG bytes of the two panels (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(fig)
    latency, throughput = plot_points(rows, "latency"), plot_points(rows, "throughput")
    largest = max((max(r.batch_sizes) for r in rows if r.latency), default=None)
    smallest = min((min(r.batch_sizes) for r in rows if r.latency), default=None)
    left, right = fig.subplots(1, 2, sharey=False)
    if latency:
        _panel(left, latency, True, f"latency at batch {smallest}, median ms (log) - lower is better")
        _panel(right, throughput, False, f"throughput at batch {largest}, images/s (log) - higher is better")
        left.legend(loc="lower right", fontsize=8)
    else:
        for ax in (left, right):
            ax.text(0.5, 0.5, "no rows with both top-1 and latency", ha="center", va="center",
                    transform=ax.transAxes)
    left.set_ylabel("top-1 accuracy (%) - higher is better")
    fig.suptitle(title or "accuracy vs speed")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
