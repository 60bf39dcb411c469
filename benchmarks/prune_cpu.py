"""Pruning on CPU: torchvision models (random weights) pruned at fixed ratios, to half their MACs with the
uniform and the latency-aware allocation, and to measured latency targets; each with MACs, params, ONNX
Runtime FP32 and INT8 (edgecv's Q/DQ export) latency at batch 1, and the speed-up over the unpruned model in
torch eager FP32 measured in the same run. Prints JSON.

Every latency goes through edgecv.bench.measure (blocks: warm-up, then N runs of one model, models one after
another, in rounds); the models of one table are measured together. Compare ratios from one run, on a
quiet machine.

    python benchmarks/prune_cpu.py --models resnet18,mobilenet_v2 --runs 100 --out prune.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
from bench_common import emit, random_model  # benchmarks/ is on the path of a script run from it

from edgecv.compress.prune import (
    GroupPruner,
    PruneConfig,
    latency_table,
    latency_weights,
    prune_model,
    prune_to_latency,
)
from edgecv.errors import EdgecvError
from edgecv.models.complexity import count_macs_params
from edgecv.stages.prune import latency_measurer

THREADS = 2


class Timer:
    """The three measurers of a run (torch eager FP32, ORT FP32, ORT INT8), batch 1, same settings."""

    def __init__(self, example: torch.Tensor, runs: int, rounds: int) -> None:
        def make(backend: str, precision: str):
            cfg = PruneConfig(ratio=0.5, backend=backend, precision=precision)
            return latency_measurer(cfg, example, runs=runs, rounds=rounds, threads=THREADS)

        self.eager, self.fp32, self.int8 = make("torch", "fp32"), make("onnxruntime", "fp32"), \
            make("onnxruntime", "int8")


def describe(variant: str, model: torch.nn.Module, example: torch.Tensor, base: tuple[int, int]) -> dict:
    macs, params = count_macs_params(model, example)
    return {"variant": variant, "macs": macs, "params": params, "macs_kept": round(macs / base[0], 4),
            "params_kept": round(params / base[1], 4)}


def bench_model(name: str, args: argparse.Namespace) -> dict:
    example = torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    model = random_model(name, seed=0)
    timer = Timer(example, args.runs, args.rounds)
    base = count_macs_params(model, example)
    eager_ms = timer.eager([model])[0]
    variants = {"unpruned": model}
    for ratio in args.ratios:
        variants[f"ratio {ratio}"] = prune_model(model, PruneConfig(ratio=ratio, importance="l1"), example)[0]
    half = PruneConfig(target_macs=args.macs, importance="l1")
    variants[f"macs {args.macs} uniform"] = prune_model(model, half, example)[0]
    int8_cfg = PruneConfig(ratio=0.5, importance="l1", measure_precision="int8", latency_widths=args.widths)
    groups = GroupPruner(copy.deepcopy(model), int8_cfg, example, []).groups
    table = latency_table(model, int8_cfg, example, timer.int8)
    weights = latency_weights(groups, table)
    variants[f"macs {args.macs} latency"] = prune_model(model, half, example, latency_weights=weights)[0]
    rows = [describe(k, m, example, base) for k, m in variants.items()]
    for key, measure_ms in (("ort_fp32_ms", timer.fp32), ("ort_int8_ms", timer.int8)):
        for row, ms in zip(rows, measure_ms(list(variants.values())), strict=True):
            row[key] = round(ms, 4)
            row[key.replace("_ms", "_speedup_vs_eager")] = round(eager_ms / ms, 2)
    searches = []
    for fraction in args.target_fractions:  # targets: the unpruned eager FP32 time divided by `fraction`
        target = eager_ms / fraction
        cfg = PruneConfig(target_latency_ms=target, importance="l1", measure_precision="int8")
        try:
            _, info, search = prune_to_latency(model, cfg, example, timer.int8)
            searches.append({"target_ms": round(target, 4), "eager_over": fraction, **info,
                             "within_10pct": abs(info["latency_ms"] / target - 1) <= 0.10, "note": search.reason,
                             "candidates": search.rows(cfg)})
        except EdgecvError as exc:
            searches.append({"target_ms": round(target, 4), "eager_over": fraction, "error": str(exc)})
    by = {r["variant"]: r for r in rows}
    uniform, aware = by[f"macs {args.macs} uniform"], by[f"macs {args.macs} latency"]
    return {
        "eager_fp32_ms": round(eager_ms, 4), "macs": base[0], "params": base[1], "rows": rows,
        "latency_targets": searches,
        "latency_weights": {k: round(v, 3) for k, v in weights.items()},
        "checks": {
            f"macs_{args.macs}_uniform_int8_speedup_vs_eager": uniform["ort_int8_speedup_vs_eager"],
            "latency_over_uniform_int8": round(aware["ort_int8_ms"] / uniform["ort_int8_ms"], 3),
            "latency_over_uniform_fp32": round(aware["ort_fp32_ms"] / uniform["ort_fp32_ms"], 3),
            "latency_at_least_as_fast_int8": aware["ort_int8_ms"] <= uniform["ort_int8_ms"],
        },
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    floats = lambda text: [float(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="torchvision builders, comma-separated")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per block")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of blocks")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--ratios", type=floats, default=[0.3, 0.5, 0.7], help="channel ratios removed")
    parser.add_argument("--macs", type=float, default=0.5, help="MACs kept by the uniform vs latency comparison")
    parser.add_argument("--widths", type=floats, default=[0.5], help="widths of the per-layer latency table")
    parser.add_argument("--target-fractions", type=floats, default=[10.0, 16.0],
                        help="latency targets (INT8): the unpruned torch eager FP32 time divided by these")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    warnings.simplefilter("ignore")
    import onnxruntime

    torch.set_num_threads(THREADS)
    result = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": THREADS,
                 "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "batch": 1, "image_size": args.image_size, "runs": args.runs, "rounds": args.rounds, "models": {},
    }  # fmt: skip
    for name in args.models.split(","):
        try:
            result["models"][name] = bench_model(name, args)
        except Exception as exc:  # one failing model is an entry, not a crash
            result["models"][name] = {"status": f"error: {type(exc).__name__}: {exc}"}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
