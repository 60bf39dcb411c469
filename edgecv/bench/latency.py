"""Latency and throughput of runners, timed in blocks, so that runtimes sharing a few cores do not disturb each other.

Each block is a warm-up then N timed runs of one runner at one batch size. Runners are never interleaved
run by run: an ONNX Runtime session's idle threads spin after each run and steal the cores from whatever
runs next. Torch runners (OpenMP threads spin too) go after the others in every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from edgecv.errors import EdgecvError

# Called with the number of timed runs just finished (1); `functools.partial(rich_progress.advance, task)`
# fits. Totals: measure_latency -> len(batch_sizes) * runs; benchmark_blocks -> that * rounds * len(runners).
Progress = Callable[[int], None]


@dataclass(frozen=True)
class LatencyStats:
    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_ips: float  # images per second = batch_size / median latency
    runs: int

    def as_dict(self) -> dict:
        return asdict(self)


def latency_stats(batch_size: int, times_ms: Sequence[float]) -> LatencyStats:
    """Summarise timed runs (milliseconds) of one batch size."""
    if len(times_ms) == 0:
        raise EdgecvError("no timed runs to summarise (runs must be >= 1)")
    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
    return LatencyStats(
        batch_size=batch_size,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(t.mean()),
        min_ms=float(t.min()),
        throughput_ips=batch_size / (p50 / 1000.0) if p50 > 0 else float("inf"),
        runs=len(t),
    )


def _check_args(input_shape: Sequence[int], batch_sizes: Sequence[int], warmup: int, runs: int) -> None:
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise EdgecvError(f"input shape must be (channels, height, width), got {tuple(input_shape)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise EdgecvError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if warmup < 0 or runs < 1:
        raise EdgecvError(f"need warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}")


def synthetic_batch(input_shape: Sequence[int], batch_size: int, seed: int = 0) -> np.ndarray:
    """A deterministic float32 NCHW batch (values like normalised images)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch_size, *input_shape), dtype=np.float32)


def synthetic_frames(input_shape: Sequence[int], batch_size: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 N x H x W x C batch: camera frames at the model's size, for `input_shape`
    (channels, height, width)."""
    c, h, w = (int(d) for d in input_shape)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch_size, h, w, c), dtype=np.uint8)


def input_batch(input_shape: Sequence[int], batch_size: int, frames: bool) -> np.ndarray:
    """What a timed call gets: uint8 frames (`frames`) or a float32 normalized NCHW tensor."""
    return synthetic_frames(input_shape, batch_size) if frames else synthetic_batch(input_shape, batch_size)


def time_block(runner: Callable, batch: np.ndarray, warmup: int, runs: int, progress=None) -> list[float]:
    """One block: `warmup` untimed calls, then `runs` timed calls; returns milliseconds per call."""
    for _ in range(warmup):
        runner(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        runner(batch)
        times.append((time.perf_counter_ns() - start) / 1e6)
        if progress is not None:
            progress(1)
    return times


def measure_latency(
    runner,
    input_shape: tuple[int, int, int],
    batch_sizes: Sequence[int],
    warmup: int = 10,
    runs: int = 50,
    progress: Progress | None = None,
) -> dict[int, LatencyStats]:
    """Time one runner at each batch size (one block each); batch size -> stats."""
    _check_args(input_shape, batch_sizes, warmup, runs)
    results = {}
    for bs in batch_sizes:
        times = time_block(runner, synthetic_batch(input_shape, int(bs)), warmup, runs, progress)
        results[int(bs)] = latency_stats(int(bs), times)
    return results


def block_order(runners: dict[str, object]) -> list[str]:
    """Runner names in timing order: torch runners after all the others (their OpenMP threads spin)."""
    return sorted(runners, key=lambda name: getattr(runners[name], "backend", "") == "torch")


def benchmark_blocks(
    runners: dict[str, object],
    input_shape: tuple[int, int, int],
    batch_sizes: Sequence[int],
    warmup: int,
    runs: int,
    rounds: int = 3,
    progress: Progress | None = None,
    settle_s: float = 0.05,
    frames: bool = False,
) -> dict[str, dict[int, LatencyStats]]:
    """Time several runners fairly on a shared CPU: `rounds` rounds; in each, every runner in turn runs a
    block (warm-up + `runs` timed runs) per batch size. Stats pool all timed runs of all rounds, so each
    LatencyStats has runs * rounds runs. `settle_s` of sleep between blocks lets spinning threads park.
    Each call gets uint8 NHWC frames when `frames`, else a float32 NCHW batch."""
    _check_args(input_shape, batch_sizes, warmup, runs)
    if rounds < 1:
        raise EdgecvError(f"rounds must be >= 1, got {rounds}")
    batches = {int(bs): input_batch(input_shape, int(bs), frames) for bs in batch_sizes}
    order = block_order(runners)
    times: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in batches} for name in order}
    for _ in range(rounds):
        for name in order:
            for bs, batch in batches.items():
                times[name][bs] += time_block(runners[name], batch, warmup, runs, progress)
                if settle_s:
                    time.sleep(settle_s)
    return {name: {bs: latency_stats(bs, t) for bs, t in per_bs.items()} for name, per_bs in times.items()}
