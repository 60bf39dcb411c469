"""The one measurement API: models x runners -> `BenchRow`s. `edgecv bench` and the compress report both
call `measure`, so their rows have the same keys and were measured the same way.

A row is one model on one backend: what it is (stage, format, params, MACs, size), where it ran, its
accuracy, memory, and per batch size its latency percentiles, throughput and (on a Jetson) energy.
None means "not measured" and renders as "-".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgecv.bench.accuracy import evaluate
from edgecv.bench.latency import LatencyStats, benchmark_blocks, synthetic_batch
from edgecv.bench.memory import peak_memory_mb
from edgecv.bench.runners import Runner
from edgecv.errors import EdgecvError


@dataclass
class BatchResult:
    """Latency of one batch size (milliseconds per batch) and, when measured, energy."""

    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_ips: float
    runs: int
    energy_mj_per_image: float | None = None
    avg_power_mw: float | None = None

    @classmethod
    def from_stats(cls, stats: LatencyStats, energy: dict | None = None) -> BatchResult:
        energy = energy or {}
        return cls(**stats.as_dict(), energy_mj_per_image=energy.get("energy_mj_per_image"),
                   avg_power_mw=energy.get("avg_power_mw"))


@dataclass
class BenchRow:
    """One model on one backend. `model` names it (a file, or a run's stage); `deployable` is False for
    rows measured only for comparison (a pruned model before fine-tuning, a torch fake-quant model)."""

    model: str
    stage: str | None
    format: str
    backend: str
    device: str
    top1: float | None = None
    top5: float | None = None
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    memory_mb: float | None = None
    latency: list[BatchResult] = field(default_factory=list)
    deployable: bool = True
    note: str | None = None

    def at(self, batch_size: int) -> BatchResult | None:
        return next((b for b in self.latency if b.batch_size == batch_size), None)

    @property
    def batch_sizes(self) -> list[int]:
        return [b.batch_size for b in self.latency]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Subject:
    """A model to measure: how to run it, and what is already known about it. Give `load` (a function that
    builds the runner) rather than a built `runner` where you can: `measure` then counts the memory that
    loading the model and running it take, not only what one more call adds."""

    model: str
    runner: Runner | None
    format: str
    stage: str | None = None
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    accuracy: dict | None = None  # {"top1", "top5"} measured elsewhere on the same data (kept as is)
    deployable: bool = True
    note: str | None = None
    load: Callable[[], Runner] | None = None


@dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 10
    runs: int = 50
    rounds: int = 3
    accuracy: bool = True
    memory: bool = True
    power: bool = False
    power_interval_ms: int = 50


Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


def measure(
    subjects: Sequence[Subject],
    settings: BenchSettings,
    input_shape: tuple[int, int, int],
    val_batches: Callable[[], Iterable[tuple[Any, Any]]] | None = None,
    progress: Progress | None = None,
) -> list[BenchRow]:
    """Measure every subject: accuracy on `val_batches()` (when settings.accuracy and the subject has no
    accuracy yet), peak memory at the largest batch, energy (settings.power, Jetson), then latency of all
    subjects together in blocks. Returns one BenchRow per subject, in order."""
    if not subjects:
        raise EdgecvError("nothing to measure")
    sizes = sorted({int(b) for b in settings.batch_sizes})
    memory = _load_runners(subjects, input_shape, sizes[-1], settings.memory)
    accuracy = _accuracies(subjects, settings, val_batches, progress)
    energy = _energies(subjects, input_shape, sizes, settings) if settings.power else {}
    runners = {str(i): s.runner for i, s in enumerate(subjects)}
    total = len(runners) * len(sizes) * settings.runs * settings.rounds
    advance = progress("latency (blocks)", total) if progress else None
    latency = benchmark_blocks(runners, input_shape, sizes, settings.warmup, settings.runs, settings.rounds,
                               advance)
    rows = []
    for i, s in enumerate(subjects):
        describe = s.runner.describe()
        acc = accuracy.get(i) or {}
        rows.append(BenchRow(
            model=s.model, stage=s.stage, format=s.format, backend=s.runner.backend,
            device=str(describe.get("device") or "cpu"),
            top1=_round(acc.get("top1")), top5=_round(acc.get("top5")),
            params=s.params, macs=s.macs, size_bytes=s.size_bytes,
            memory_mb=_round(memory.get(i), 1),
            latency=[BatchResult.from_stats(latency[str(i)][b], energy.get(i, {}).get(b)) for b in sizes],
            deployable=s.deployable, note=s.note,
        ))  # fmt: skip
    return rows


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def _accuracies(subjects, settings, val_batches, progress) -> dict[int, dict]:
    out = {}
    for i, s in enumerate(subjects):
        if s.accuracy is not None:
            out[i] = s.accuracy
        elif settings.accuracy and val_batches is not None:
            advance = progress(f"accuracy {s.model}", 0) if progress else None
            out[i] = evaluate(s.runner, val_batches(), progress=advance)
    return out


def _load_runners(subjects, input_shape, batch_size: int, with_memory: bool) -> dict[int, float]:
    """Build each subject's runner (one after another) and run the largest batch once. The memory of a
    subject is what that took: the process's resident-set peak over its level before (model, session,
    buffers), or, on a GPU, the runner's own `memory_mb(batch)`. A GPU runner without one is not measured
    ("-"), never a made-up 0."""
    batch = np.zeros((batch_size, *input_shape), dtype=np.float32)
    out = {}
    for i, s in enumerate(subjects):
        if s.runner is None and s.load is None:
            raise EdgecvError(f"{s.model}: nothing to run (give a runner or a way to load one)")

        def first_call(s: Subject = s) -> None:
            if s.runner is None:
                s.runner = s.load()
            s.runner(batch)

        cpu_mb = peak_memory_mb(first_call, device="cpu") if with_memory else first_call()
        if not with_memory:
            continue
        own = getattr(s.runner, "memory_mb", None)
        value = own(batch) if own is not None else None
        if value is None and str(s.runner.describe().get("device", "cpu")) == "cpu":
            value = cpu_mb  # only a CPU runner's memory is the process's resident set
        if value is not None:
            out[i] = value
    return out


def _energies(subjects, input_shape, sizes, settings) -> dict[int, dict[int, dict]]:
    """Per subject and batch size: energy per image from tegrastats sampled during a timed block."""
    from edgecv.bench.power import TegrastatsSampler, measure_energy

    if not TegrastatsSampler.available():
        raise EdgecvError("--power: tegrastats was not found (power is measured on NVIDIA Jetson boards)")
    return {
        i: {b: measure_energy(s.runner, synthetic_batch(input_shape, b), settings.warmup, max(settings.runs, 200),
                              interval_ms=settings.power_interval_ms) for b in sizes}
        for i, s in enumerate(subjects)
    }
