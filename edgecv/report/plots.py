"""The accuracy / latency Pareto plot. matplotlib is imported here only, with the Agg canvas and no
pyplot, so plotting never touches global state or needs a display."""

from __future__ import annotations

import io
from collections.abc import Sequence


def plot_points(rows: Sequence[dict]) -> list[tuple[str, float, float]]:
    """(label, batch-1 p50 latency ms, top-1 %) for every row that has both numbers."""
    points = []
    for row in rows:
        latency, top1 = row.get("latency_ms_p50"), row.get("top1")
        if latency is None or top1 is None:
            continue
        label = "/".join(str(row[k]) for k in ("stage", "format") if row.get(k) is not None) or "?"
        points.append((label, float(latency), float(top1)))
    return points


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The points no other point beats on both latency (lower) and top-1 (higher), fastest first."""
    front: list[tuple[str, float, float]] = []
    best_top1 = float("-inf")
    for point in sorted(points, key=lambda p: (p[1], -p[2])):
        if point[2] > best_top1:
            front.append(point)
            best_top1 = point[2]
    return front


def pareto_png(rows: Sequence[dict], title: str = "") -> bytes:
    """PNG bytes: top-1 vs batch-1 p50 latency, one labelled point per stage x format, front drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = plot_points(rows)
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        front = pareto_front(points)
        on_front = {id(p) for p in front}
        others = [p for p in points if id(p) not in on_front]
        if others:
            ax.scatter([p[1] for p in others], [p[2] for p in others], color="0.6", label="dominated")
        ax.scatter([p[1] for p in front], [p[2] for p in front], color="C0", zorder=3, label="Pareto front")
        ax.step([p[1] for p in front], [p[2] for p in front], where="post", color="C0", alpha=0.6)
        for label, x, y in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(
            0.5, 0.5, "no rows with both top-1 and latency", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xlabel("latency, batch 1, median (ms) - lower is better")
    ax.set_ylabel("top-1 accuracy (%) - higher is better")
    ax.set_title(title or "accuracy vs latency")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
