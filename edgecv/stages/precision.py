"""INT8 or float, measured: both models exported to ONNX and timed on the target (ONNX Runtime) at the
deployment batch with the one measurement path (`edgecv.bench.measure`, in blocks), a one-line verdict when
INT8 is the slower (with the reason the INT8 graph shows), and, for `ship_precision: auto`, the choice of the
faster one within an accuracy budget. The choice is written to the stage folder (`precision.json`), where the
export stage and the report read it."""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from edgecv.bench.measure import BenchSettings, Subject, measure
from edgecv.errors import EdgecvError
from edgecv.io import write_json
from edgecv.stages.base import StageContext

PRECISION_FILE = "precision.json"
TIMING = {"warmup": 5, "rounds": 3}  # a short timing in blocks: enough to tell 10 % apart ...
MIN_RUNS, MAX_RUNS, BLOCK_S = 20, 2000, 0.1  # ... given blocks of >= BLOCK_S each (a tiny model: many runs)
# (runners by format: "onnx" float, "onnx-int8"; input shape; batch) -> median ms by format. The verdict and
# `ship_precision: auto` decide on what it returns; a test passes one that returns the times it chooses.
TimePrecisions = Callable[[dict[str, Callable], tuple[int, int, int], int], dict[str, float]]
_FRIENDLY_OPS = {"HardSigmoid": "hard-sigmoid", "HardSwish": "hard-swish", "Erf": "GELU (Erf)",
                 "ReduceMean": "mean", "Tanh": "tanh", "Softplus": "softplus"}  # fmt: skip


@dataclass
class PrecisionComparison:
    """Float and INT8 on the target at one batch size: median latency, top-1 where measured, and the INT8
    graph's float ops and islands (why INT8 can be the slower)."""

    target: str
    batch: int
    float_ms: float
    int8_ms: float
    float_top1: float | None
    int8_top1: float | None
    no_integer_kernel: list[str]  # ONNX op types of the INT8 graph that run in float for want of a kernel
    float_islands: int
    slow_convs: int  # convs whose output channels ONNX Runtime's int8 kernels run on a slow path
    convs: int

    @property
    def ratio(self) -> float:
        """INT8 time over float time (above 1: INT8 is slower)."""
        return self.int8_ms / self.float_ms

    def verdict(self) -> str:
        """One line: how INT8 compares with float here, and why when it is slower."""
        where = f"({self.target}, batch {self.batch}: {self.int8_ms:.3g} vs {self.float_ms:.3g} ms)"
        if self.ratio <= 1.0:
            return f"INT8 is {1 / self.ratio:.1f}x faster than float here {where}"
        return f"INT8 is {self.ratio:.1f}x slower than float here {where}: {self.why_slower()}"

    def why_slower(self) -> str:
        reasons = []
        if self.no_integer_kernel:
            names = [_FRIENDLY_OPS.get(op, op) for op in self.no_integer_kernel]
            reasons.append(f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} no integer kernel in "
                           "ONNX Runtime")  # fmt: skip
        if self.float_islands:
            reasons.append(f"{self.float_islands} float island{'s' if self.float_islands != 1 else ''}")
        if self.slow_convs:
            reasons.append(f"{self.slow_convs} of {self.convs} convs have fewer than 16 output channels or a "
                           "count not a multiple of 4 (the int8 kernels' slow path)")  # fmt: skip
        return ", ".join(reasons) or "the graph is all integer; its int8 kernels do not pay at this size"

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": round(self.ratio, 3), "verdict": self.verdict()}


def _slow_convs(model: nn.Module) -> tuple[int, int]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(m.out_channels < 16 or m.out_channels % 4 != 0 for m in convs), len(convs)


def compare_precisions(float_model: nn.Module, qmodel: nn.Module, ctx: StageContext, batch: int,
                       int8_top1: float | None, with_accuracy: bool,
                       time_ms: TimePrecisions | None = None) -> PrecisionComparison:
    """Export both models, inspect the INT8 graph, and time both in ONNX Runtime at `batch` with `time_ms`
    (default `time_onnxruntime`), and measure the float model's top-1 on the validation split when
    `with_accuracy`."""
    from edgecv.bench.accuracy import evaluate
    from edgecv.bench.runners import create_runner
    from edgecv.export.lint import inspect_onnx
    from edgecv.export.onnx import export_onnx

    example, threads = ctx.spec.example_input(), ctx.recipe.bench.threads
    with tempfile.TemporaryDirectory(prefix="edgecv-precision-") as tmp:
        paths = {"onnx": export_onnx(float_model, Path(tmp) / "model.onnx", example),
                 "onnx-int8": export_onnx(qmodel, Path(tmp) / "model.int8.onnx", example)}  # fmt: skip
        graph = inspect_onnx(paths["onnx-int8"], "onnxruntime")
        runners = {name: create_runner("onnxruntime", path, threads=threads) for name, path in paths.items()}
        float_top1 = round(evaluate(runners["onnx"], ctx.data.val)["top1"], 3) if with_accuracy else None
        times = (time_ms or time_onnxruntime)(runners, ctx.spec.input_shape, batch)
    no_kernel = sorted({f["op_type"] for f in graph["float_ops"] if "no integer kernel" in f["reason"]})
    slow, convs = _slow_convs(float_model)
    return PrecisionComparison(
        target="ONNX Runtime", batch=batch, float_ms=times["onnx"], int8_ms=times["onnx-int8"],
        float_top1=float_top1, int8_top1=int8_top1, no_integer_kernel=no_kernel,
        float_islands=graph.get("float_islands", 0), slow_convs=slow, convs=convs,
    )  # fmt: skip


def time_onnxruntime(runners: dict[str, Callable], input_shape: tuple[int, int, int],
                     batch: int) -> dict[str, float]:
    """The real measurement: median ms of each runner at `batch`, together in blocks with
    `edgecv.bench.measure` (sessions built once: memory is not measured here), each block about BLOCK_S."""
    subjects = [Subject(model=name, runner=runner, format=name) for name, runner in runners.items()]
    runs = runs_for(runners["onnx-int8"], input_shape, batch)
    settings = BenchSettings((batch,), accuracy=False, memory=False, frames=False, runs=runs, **TIMING)
    rows = measure(subjects, settings, input_shape)
    return {s.format: row.latency[0].p50_ms for s, row in zip(subjects, rows, strict=True)}


def runs_for(runner, input_shape: tuple[int, int, int], batch: int,
             clock: Callable[[], float] = time.perf_counter) -> int:
    """Timed runs per block so that a block lasts about BLOCK_S (within [MIN_RUNS, MAX_RUNS]): 20 runs of a
    50-microsecond model are 1 ms of timing, and one scheduler hiccup decides which precision looks faster.
    `clock` (seconds) is the one the calls are timed with."""
    from edgecv.bench.latency import input_batch

    x = input_batch(input_shape, batch, False)
    runner(x)  # the first call builds ONNX Runtime's kernels
    start = clock()
    for _ in range(5):
        runner(x)
    per_call = (clock() - start) / 5
    return int(min(MAX_RUNS, max(MIN_RUNS, math.ceil(BLOCK_S / max(per_call, 1e-6)))))


def choose_precision(cmp: PrecisionComparison, accuracy_budget: float) -> tuple[str, str]:
    """("int8" | "float", why): the faster of the two among those whose top-1 is within `accuracy_budget`
    points of the better one. A top-1 not measured (INT8 before QAT trains it) does not rule a model out:
    float is the reference INT8 approximates."""
    tops = {"int8": cmp.int8_top1, "float": cmp.float_top1}
    known = [t for t in tops.values() if t is not None]
    best = max(known) if known else None
    ok = [p for p, t in tops.items() if best is None or t is None or t >= best - accuracy_budget]
    chosen = min(ok, key=lambda p: cmp.int8_ms if p == "int8" else cmp.float_ms)
    other = "float" if chosen == "int8" else "int8"
    if other not in ok:
        return chosen, (f"{other} top-1 {tops[other]:.2f}% is more than {accuracy_budget:g} points below "
                        f"{chosen}'s {tops[chosen]:.2f}%")  # fmt: skip
    faster = cmp.ratio if chosen == "float" else 1 / cmp.ratio
    return chosen, f"{chosen} is {faster:.2f}x as fast as {other} at batch {cmp.batch}" + (
        f", top-1 within {accuracy_budget:g} points" if None not in tops.values() else ""
    )


def record_precision(ctx: StageContext, cmp: PrecisionComparison, requested: str, chosen: str, why: str,
                     accuracy_budget: float | None) -> dict:
    """What ships and why, in the stage's metrics and its folder (read by export and the report)."""
    decision = {"requested": requested, "chosen": chosen, "why": why, "accuracy_budget": accuracy_budget,
                **cmp.to_dict()}  # fmt: skip
    ctx.metrics["precision"] = decision
    write_json(ctx.stage_dir / PRECISION_FILE, decision)
    return decision


def shipped_precision(ctx: StageContext) -> dict | None:
    """The precision decision of the last ptq/qat stage that made one (None: no comparison was made)."""
    for name in ("qat", "ptq"):
        model_file = ctx.outputs.get(name)
        path = model_file.parent / PRECISION_FILE if model_file is not None else None
        if path is not None and path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                raise EdgecvError(f"{path}: not valid JSON (delete the stage folder to run it again)") from None
    return None
