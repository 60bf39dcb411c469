"""The one measurement API: models x runners -> `BenchRow`s. `edgecv bench` and the compress report both
call `measure`, so their rows have the same keys and were measured the same way.

A row is one model on one backend: what it is (stage, format, params, MACs, size, what input it takes),
where it ran, its accuracy, memory, and per batch size its latency percentiles, throughput and (on a
Jetson) energy. None means "not measured" and renders as "-".

Latency, memory and energy are measured end to end from a uint8 camera frame (N x H x W x C) by default:
a model that takes frames gets them as they are, a float-input model is charged the numpy preprocessing it
needs (to float, / 255, - mean, / std, HWC -> CHW), so rows compare what a deployment pays per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgecv.bench.accuracy import evaluate
from edgecv.bench.latency import LatencyStats, benchmark_blocks, input_batch
from edgecv.bench.memory import peak_memory_mb
from edgecv.bench.runners import Runner, input_kind
from edgecv.errors import EdgecvError
from edgecv.export.normalization import UINT8_NHWC, Normalization


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
    input: str = "float-nchw"  # what the model takes: "float-nchw" tensors or "uint8-nhwc" camera frames

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
    # How frames are preprocessed for a float-input model (its data's mean/std); None: unknown, timed with
    # neutral values (the numpy work costs the same). A frame-input model ignores it.
    normalization: Normalization | None = None
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
    frames: bool = True  # time from uint8 frames (float-input models pay their preprocessing); else tensors


class Preprocessed:
    """A float-input runner called with uint8 NHWC frames: numpy preprocessing, then the runner. Timing
    this is what a deployment of a float-input model pays per frame."""

    def __init__(self, runner: Runner, normalization: Normalization) -> None:
        self.runner = runner
        self.backend = runner.backend  # block order: torch runners last
        self.normalization = normalization
        own = getattr(runner, "memory_mb", None)
        if own is not None:  # the runner measures its own memory (GPU): on the preprocessed batch
            self.memory_mb = lambda frames: own(normalization.preprocess(frames))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.runner(self.normalization.preprocess(frames))

    def describe(self) -> dict:
        return self.runner.describe()


def timed_call(subject: Subject, input_shape: tuple[int, int, int], frames: bool) -> Runner:
    """What a timed call runs for `subject`: its runner, behind the numpy preprocessing when the calls get
    frames and the model takes float tensors."""
    if not frames or input_kind(subject.runner) == UINT8_NHWC:
        return subject.runner
    return Preprocessed(subject.runner, subject.normalization or Normalization.neutral(input_shape[0]))


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
    calls = _load_runners(subjects, input_shape, sizes[-1], settings)
    memory = {i: m for i, (_, m) in enumerate(calls) if m is not None}
    calls = [c for c, _ in calls]
    accuracy = _accuracies(subjects, settings, val_batches, progress)
    energy = _energies(calls, input_shape, sizes, settings) if settings.power else {}
    runners = {str(i): call for i, call in enumerate(calls)}
    total = len(runners) * len(sizes) * settings.runs * settings.rounds
    advance = progress("latency (blocks)", total) if progress else None
    latency = benchmark_blocks(runners, input_shape, sizes, settings.warmup, settings.runs, settings.rounds,
                               advance, frames=settings.frames)
    rows = []
    for i, s in enumerate(subjects):
        describe = s.runner.describe()
        acc = accuracy.get(i) or {}
        kind = input_kind(s.runner)
        rows.append(BenchRow(
            model=s.model, stage=s.stage, format=s.format, backend=s.runner.backend,
            device=str(describe.get("device") or "cpu"),
            top1=_round(acc.get("top1")), top5=_round(acc.get("top5")),
            params=s.params, macs=s.macs, size_bytes=s.size_bytes,
            memory_mb=_round(memory.get(i), 1),
            latency=[BatchResult.from_stats(latency[str(i)][b], energy.get(i, {}).get(b)) for b in sizes],
            deployable=s.deployable, input=kind,
            note=s.note or ("takes uint8 NHWC frames" if kind == UINT8_NHWC else None),
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


def _load_runners(subjects, input_shape, batch_size: int, settings: BenchSettings) -> list[tuple[Runner, float | None]]:  # noqa: E501
    """Build each subject's runner (one after another), wrap it in what a timed call runs (frames and
    preprocessing, see `timed_call`) and run the largest batch once. Returns (call, memory MiB) per
    subject. The memory is what loading and that first run took: the process's resident-set peak over its
    level before (model, session, buffers), or, on a GPU, the runner's own `memory_mb(batch)`. A GPU
    runner without one is not measured ("-"), never a made-up 0."""
    batch = input_batch(input_shape, batch_size, settings.frames)
    out = []
    for s in subjects:
        if s.runner is None and s.load is None:
            raise EdgecvError(f"{s.model}: nothing to run (give a runner or a way to load one)")
        calls = []

        def first_call(s: Subject = s, calls: list = calls) -> None:
            if s.runner is None:
                s.runner = s.load()
            calls.append(timed_call(s, input_shape, settings.frames))
            calls[0](batch)

        cpu_mb = peak_memory_mb(first_call, device="cpu") if settings.memory else first_call()
        value = None
        if settings.memory:
            own = getattr(calls[0], "memory_mb", None)
            value = own(batch) if own is not None else None
            if value is None and str(calls[0].describe().get("device", "cpu")) == "cpu":
                value = cpu_mb  # only a CPU runner's memory is the process's resident set
        out.append((calls[0], value))
    return out


def _energies(calls, input_shape, sizes, settings) -> dict[int, dict[int, dict]]:
    """Per subject and batch size: energy per image from tegrastats sampled during a timed block."""
    from edgecv.bench.power import TegrastatsSampler, measure_energy

    if not TegrastatsSampler.available():
        raise EdgecvError("--power: tegrastats was not found (power is measured on NVIDIA Jetson boards)")
    return {
        i: {b: measure_energy(call, input_batch(input_shape, b, settings.frames), settings.warmup,
                              max(settings.runs, 200), interval_ms=settings.power_interval_ms) for b in sizes}
        for i, call in enumerate(calls)
    }
