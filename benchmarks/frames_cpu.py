"""Frame to logits on CPU: a uint8 NHWC frame-input INT8 model (normalization folded into its first conv)
against numpy preprocessing + the float-input INT8 model, edgecv INT8 for ONNX Runtime, torchvision models
with random weights and ImageNet normalization (so the frame model pads explicitly with the mean pixel).
Prints JSON; the done-when of the frame-input issue is `frame_int8 / (numpy + float_input_int8) <= 0.85`.

Timing in blocks, as edgecv measures (edgecv.bench.latency.benchmark_blocks): every callable gets the same
uint8 frames; each is timed in a block (warm-up, then N runs), one after another, in rounds. Also timed, for
reading the result: the numpy preprocessing alone and the float-input model alone on a ready tensor.
Compare ratios from one run; run it on a quiet machine.

    python benchmarks/frames_cpu.py --runs 100 --rounds 3 --models resnet18,mobilenet_v2 --batch-sizes 1,8 --out frames.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_common import emit, random_model  # benchmarks/ is on the path of a script run from it

from edgecv.bench.latency import benchmark_blocks, synthetic_frames
from edgecv.bench.measure import Preprocessed
from edgecv.bench.runners import create_runner
from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat
from edgecv.export.frames import Normalization, export_frame_onnx, ort_prologue
from edgecv.export.onnx import export_onnx
from edgecv.export.parity import sqnr_db

THREADS = 2
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DONE_WHEN = 0.85


class Named:
    """A callable that benchmark_blocks times like a runner (it orders blocks by `backend`)."""

    backend = "onnxruntime"

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, frames: np.ndarray):
        return self.fn(frames)


def build_files(name: str, size: int, tmp: Path) -> tuple[Path, Path, dict]:
    """edgecv INT8 (onnxruntime target) with a float input, and its frame-input twin."""
    frames = synthetic_frames((3, size, size), 16, seed=1)
    x = torch.from_numpy(IMAGENET.preprocess(frames))
    qmodel = prepare_qat(random_model(name, seed=0), "onnxruntime", x[:1])
    apply_calibrator(qmodel, collect_stats(qmodel, [x[:8], x[8:]]), "max")
    float_input = export_onnx(qmodel, tmp / f"{name}.int8.onnx", x[:1])
    frame_file = tmp / f"{name}.int8.frames.onnx"
    plan = export_frame_onnx(float_input, frame_file, IMAGENET, qmodel)
    return float_input, frame_file, {**plan.to_dict(), "ort_prologue": ort_prologue(frame_file)}


def bench_model(name: str, size: int, batch_sizes: list[int], runs: int, rounds: int, warmup: int,
                tmp: Path) -> dict:
    float_input, frame_file, plan = build_files(name, size, tmp)
    float_runner = create_runner("onnxruntime", float_input, threads=THREADS)
    frame_runner = create_runner("onnxruntime", frame_file, threads=THREADS)
    check = synthetic_frames((3, size, size), 16, seed=2)
    expected, got = float_runner(IMAGENET.preprocess(check)), frame_runner(check)
    ready = {b: IMAGENET.preprocess(synthetic_frames((3, size, size), b)) for b in batch_sizes}
    callables = {
        "numpy_preprocess+float_input_int8": Preprocessed(float_runner, IMAGENET),
        "frame_int8": frame_runner,
        "float_input_int8_alone": Named(lambda f: float_runner(ready[f.shape[0]])),
        "numpy_preprocess_alone": Named(IMAGENET.preprocess),
    }
    stats = benchmark_blocks(callables, (3, size, size), batch_sizes, warmup, runs, rounds, frames=True)
    rows = []
    for b in batch_sizes:
        medians = {key: per_bs[b].p50_ms for key, per_bs in stats.items()}
        for key, per_bs in stats.items():
            rows.append({"model": name, "batch": b, "runtime": key, "median_ms": round(per_bs[b].p50_ms, 3),
                         "p90_ms": round(per_bs[b].p90_ms, 3), "runs": per_bs[b].runs})
        ratio = medians["frame_int8"] / medians["numpy_preprocess+float_input_int8"]
        rows.append({"model": name, "batch": b, "runtime": "frame_int8 / (numpy_preprocess + float_input_int8)",
                     "ratio": round(ratio, 3), "done_when_met": bool(ratio <= DONE_WHEN)})
    return {
        "rows": rows,
        "frame_input": plan,
        "parity_vs_float_input_int8": {
            "top1_agreement": float(np.mean(expected.argmax(1) == got.argmax(1))),
            "sqnr_db": round(sqnr_db(expected, got), 2), "n": len(check),
            "note": "random weights: top-1 is nearly tied, read the SQNR",
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per block")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of blocks")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="torchvision builders, comma-separated")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--size", type=int, default=224, help="image size (frames come at the model's size)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import onnxruntime

    result = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": THREADS,
                 "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                 "load_average": list(os.getloadavg())},
        "size": args.size, "runs": args.runs, "rounds": args.rounds, "done_when": DONE_WHEN, "models": {},
    }  # fmt: skip
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            try:
                result["models"][name] = bench_model(name, args.size, batch_sizes, args.runs, args.rounds,
                                                     args.warmup, Path(tmp))
            except Exception as exc:  # keep going: one failing model is a row, not a crash
                result["models"][name] = {"status": f"error: {type(exc).__name__}: {exc}"}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
