"""INT8 on CPU: torch eager FP32, ONNX Runtime FP32, ORT quantize_static (QDQ, per-channel, U8 activations)
and edgecv INT8 (onnxruntime target), on torchvision models with random weights. Prints JSON.

Timing in blocks, as edgecv measures: each session is timed in a block (warm-up, then N runs),
sessions one after another, in rounds; torch eager is timed after all ORT blocks. Compare ratios from one run.

    python benchmarks/int8_cpu.py --runs 100 --models resnet18,mobilenet_v2 --batch-sizes 1,8 --out int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat
from edgecv.export.inspect import inspect_onnx
from edgecv.export.onnx import export_onnx, model_size_bytes, ort_session

THREADS = 2


def random_model(name: str, seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():  # BatchNorm statistics like a trained net's, so folding is not trivial
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def quantize_static_u8(float_path: Path, out: Path, batches: list[np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"input": b} for b in batches)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return out


def time_block(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def bench_model(name: str, batch_sizes: list[int], runs: int, rounds: int, warmup: int, tmp: Path) -> dict:
    model = random_model(name, seed=0)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
    example = calib[0][:1]
    paths = {"ort_fp32": export_onnx(model, tmp / f"{name}.onnx", example)}
    paths["ort_quantize_static_u8"] = quantize_static_u8(
        paths["ort_fp32"], tmp / f"{name}.static.onnx", [b.numpy() for b in calib]
    )
    qmodel = prepare_qat(model, "onnxruntime", example)
    apply_calibrator(qmodel, collect_stats(qmodel, calib), "max")
    paths["edgecv_int8"] = export_onnx(qmodel, tmp / f"{name}.edgecv.onnx", example)
    graphs = {}
    for key in ("ort_quantize_static_u8", "edgecv_int8"):
        report = inspect_onnx(paths[key], "onnxruntime")
        graphs[key] = {
            "int_op_counts": report["int_op_counts"],
            "float_op_counts": report["float_op_counts"],
            "size_bytes": model_size_bytes(paths[key]),
        }
    graphs["ort_fp32"] = {"size_bytes": model_size_bytes(paths["ort_fp32"])}
    sessions = {key: ort_session(p, threads=THREADS) for key, p in paths.items()}
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, 224, 224, generator=gen)
        feed = {"input": x.numpy()}
        times: dict[str, list[float]] = {k: [] for k in [*sessions, "torch_eager_fp32"]}
        status: dict[str, str] = {k: "ok" for k in times}
        for _ in range(rounds):
            for key, sess in sessions.items():
                try:
                    times[key] += time_block(lambda s=sess, f=feed: s.run(None, f), runs, warmup)
                except Exception as exc:  # keep going: one failing runtime is a row, not a crash
                    status[key] = f"error: {exc}"
        torch.set_num_threads(THREADS)
        with torch.inference_mode():
            for _ in range(rounds):
                times["torch_eager_fp32"] += time_block(lambda x=x: model(x), runs, warmup)
        medians = {k: float(np.median(v)) if v else None for k, v in times.items()}
        for key, values in times.items():
            base = medians["ort_fp32"]
            rows.append({
                "model": name, "batch": batch, "runtime": key, "status": status[key],
                "median_ms": round(medians[key], 3) if values else None,
                "p90_ms": round(float(np.percentile(values, 90)), 3) if values else None,
                "ratio_to_ort_fp32": round(medians[key] / base, 3) if values and base else None,
            })  # fmt: skip
        if medians["edgecv_int8"] and medians["ort_quantize_static_u8"]:
            rows.append({
                "model": name, "batch": batch, "runtime": "edgecv_int8 / ort_quantize_static_u8",
                "ratio": round(medians["edgecv_int8"] / medians["ort_quantize_static_u8"], 3),
            })  # fmt: skip
    return {"rows": rows, "graphs": graphs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100, help="timed runs per block")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of blocks")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--models", default="resnet18,mobilenet_v2", help="torchvision builders, comma-separated"
    )
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import onnxruntime

    result = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": THREADS,
                 "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "runs": args.runs, "rounds": args.rounds, "models": {},
    }  # fmt: skip
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            try:
                result["models"][name] = bench_model(
                    name, batch_sizes, args.runs, args.rounds, args.warmup, Path(tmp)
                )
            except Exception as exc:
                result["models"][name] = {"status": f"error: {type(exc).__name__}: {exc}"}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        tmp_out = args.out.with_name(f".{args.out.name}.tmp")
        tmp_out.write_text(text + "\n")
        os.replace(tmp_out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
