"""Measure models where they will run: latency, throughput, accuracy, memory and energy per backend.

Importing this package needs neither onnxruntime nor TensorRT: each runner imports its library itself.
"""

from __future__ import annotations

from edgecv.bench.accuracy import evaluate
from edgecv.bench.latency import LatencyStats, benchmark_blocks, measure_latency
from edgecv.bench.memory import peak_memory_mb
from edgecv.bench.runners import RUNNERS, Runner, backend_available, create_runner

# Keys of one `edgecv bench` result row (what bench_table prints and `--json` emits), one per
# model x backend x batch size.
BENCH_FIELDS = (
    "model",
    "backend",
    "batch_size",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "throughput_ips",
    "memory_mb",
    "size_bytes",
    "top1",
    "top5",
    "energy_mj_per_image",
)


def result_rows(
    model: str,
    backend: str,
    latency: dict[int, LatencyStats],
    *,
    memory_mb: float | None = None,
    size_bytes: int | None = None,
    accuracy: dict | None = None,
    energy: dict[int, dict] | None = None,
) -> list[dict]:
    """One BENCH_FIELDS dict per batch size (plus "runs"); accuracy and memory repeat on every row,
    energy is per batch size (energy_per_inference's dict). Missing measurements are None."""
    rows = []
    for bs, stats in sorted(latency.items()):
        rows.append(
            {
                "model": model,
                "backend": backend,
                "batch_size": bs,
                "p50_ms": stats.p50_ms,
                "p90_ms": stats.p90_ms,
                "p99_ms": stats.p99_ms,
                "throughput_ips": stats.throughput_ips,
                "memory_mb": memory_mb,
                "size_bytes": size_bytes,
                "top1": accuracy.get("top1") if accuracy else None,
                "top5": accuracy.get("top5") if accuracy else None,
                "energy_mj_per_image": (energy or {}).get(bs, {}).get("energy_mj_per_image"),
                "runs": stats.runs,
            }
        )
    return rows


__all__ = [
    "BENCH_FIELDS",
    "RUNNERS",
    "LatencyStats",
    "Runner",
    "backend_available",
    "benchmark_blocks",
    "create_runner",
    "evaluate",
    "measure_latency",
    "peak_memory_mb",
    "result_rows",
]
