"""INT8 on CPU: ONNX Runtime FP32, ORT quantize_static (QDQ, per-channel, U8 activations), edgecv INT8
(onnxruntime target) and torch eager FP32, on torchvision models with random weights (kernel times do not
depend on the weights). Prints JSON, with the ratios and the checks issue 13 asks for.

`NAME+surgery` is NAME after edgecv's INT8-friendly surgery (ReLU for hard-swish / SiLU / hard-sigmoid,
squeeze-excitation removed); its rows also time the original NAME in float ONNX Runtime, so that
`edgecv_int8 / original_ort_fp32` says what the changed model buys against the model it came from.

Timing goes through edgecv's one measurement path (`edgecv.bench.measure`): each session in blocks (warm-up,
then N runs), sessions one after another, in rounds, torch eager after the ONNX Runtime blocks. Compare
ratios from one run (absolute times drift 15-30 % between runs on shared machines).

    python benchmarks/int8_cpu.py --runs 100 --batch-sizes 1,8 --out int8.json \\
        --models resnet18,mobilenet_v2,efficientnet_b0,mobilenet_v3_large,mobilenet_v3_large+surgery
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

from edgecv.bench.measure import BenchSettings, Subject, measure
from edgecv.bench.runners import create_runner
from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat
from edgecv.compress.surgery import SurgerySpec, apply_surgery
from edgecv.export.lint import inspect_onnx
from edgecv.export.onnx import export_onnx, model_size_bytes

THREADS = 2
SURGERY = SurgerySpec("relu", "remove")  # what `NAME+surgery` means
DEFAULT_MODELS = "resnet18,mobilenet_v2,efficientnet_b0,mobilenet_v3_large,mobilenet_v3_large+surgery"


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


def model_files(spec: str, tmp: Path, calib: list[torch.Tensor]) -> tuple[dict[str, Path], torch.nn.Module]:
    """ONNX files of `spec` (NAME or NAME+surgery): float, quantize_static U8, edgecv INT8 (and the original
    float for a surgery variant); and the float torch model."""
    name, _, variant = spec.partition("+")
    if variant not in ("", "surgery"):
        raise ValueError(f"{spec!r}: only NAME or NAME+surgery")
    model, example, stem = random_model(name, seed=0), calib[0][:1], spec.replace("+", "_")
    paths = {}
    if variant:
        paths["original_ort_fp32"] = export_onnx(model, tmp / f"{name}.original.onnx", example)
        apply_surgery(model, SURGERY)
    paths["ort_fp32"] = export_onnx(model, tmp / f"{stem}.onnx", example)
    paths["ort_quantize_static_u8"] = quantize_static_u8(
        paths["ort_fp32"], tmp / f"{stem}.static.onnx", [b.numpy() for b in calib]
    )
    qmodel = prepare_qat(model, "onnxruntime", example)
    apply_calibrator(qmodel, collect_stats(qmodel, calib), "max")
    paths["edgecv_int8"] = export_onnx(qmodel, tmp / f"{stem}.edgecv.onnx", example)
    return paths, model


def graph_facts(paths: dict[str, Path]) -> dict:
    out = {}
    for key, path in paths.items():
        facts: dict = {"size_bytes": model_size_bytes(path)}
        if key in ("ort_quantize_static_u8", "edgecv_int8"):
            report = inspect_onnx(path, "onnxruntime")
            facts.update({k: report[k] for k in ("int_op_counts", "float_op_counts", "qdq_counts", "float_islands")})
        out[key] = facts
    return out


def bench_model(spec: str, size: int, batch_sizes: list[int], settings: BenchSettings, tmp: Path) -> dict:
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, size, size, generator=gen) for _ in range(4)]
    paths, model = model_files(spec, tmp, calib)
    subjects = [Subject(model=key, runner=None, format="onnx", load=lambda p=p: create_runner("onnxruntime", p, threads=THREADS))
                for key, p in paths.items()]  # fmt: skip
    subjects.append(Subject(model="torch_eager_fp32", runner=None, format="torch",
                            load=lambda: create_runner("torch", model, threads=THREADS)))  # fmt: skip
    rows = measure(subjects, settings, (3, size, size))
    medians = {r.model: {b.batch_size: b.p50_ms for b in r.latency} for r in rows}
    out = []
    for batch in batch_sizes:
        m = {key: medians[key][batch] for key in medians}
        for r in rows:
            lat = r.at(batch)
            out.append({"model": spec, "batch": batch, "runtime": r.model, "median_ms": round(lat.p50_ms, 3),
                        "p90_ms": round(lat.p90_ms, 3), "ratio_to_ort_fp32": round(lat.p50_ms / m["ort_fp32"], 3)})  # fmt: skip
        ratios = {"edgecv_int8 / ort_quantize_static_u8": m["edgecv_int8"] / m["ort_quantize_static_u8"],
                  "edgecv_int8 / ort_fp32": m["edgecv_int8"] / m["ort_fp32"]}  # fmt: skip
        if "original_ort_fp32" in m:
            ratios["edgecv_int8 / original_ort_fp32"] = m["edgecv_int8"] / m["original_ort_fp32"]
            ratios["ort_fp32 / original_ort_fp32"] = m["ort_fp32"] / m["original_ort_fp32"]
        out += [{"model": spec, "batch": batch, "ratio": name, "value": round(v, 3)} for name, v in ratios.items()]
    return {"rows": out, "graphs": graph_facts(paths)}


# The done-when, as (model, batch, ratio, at most); a model or batch size not run is not checked.
CHECKS = [
    ("efficientnet_b0", 1, "edgecv_int8 / ort_quantize_static_u8", 1.05),
    ("efficientnet_b0", 8, "edgecv_int8 / ort_quantize_static_u8", 1.05),
    ("mobilenet_v3_large", 1, "edgecv_int8 / ort_quantize_static_u8", 1.05),
    ("mobilenet_v3_large", 8, "edgecv_int8 / ort_quantize_static_u8", 1.05),
    ("efficientnet_b0", 8, "edgecv_int8 / ort_fp32", 0.85),
    ("mobilenet_v3_large+surgery", 1, "edgecv_int8 / original_ort_fp32", 0.70),
]


def checks(models: dict) -> list[dict]:
    """Each CHECK that this run measured, with the value and pass/fail; and every model's edgecv/static ratio
    against 1.05 (edgecv INT8 must never be more than 5 % slower than quantize_static U8)."""
    wanted = list(CHECKS)
    for spec, result in models.items():
        for row in result.get("rows", []):
            if row.get("ratio") == "edgecv_int8 / ort_quantize_static_u8":
                wanted.append((spec, row["batch"], row["ratio"], 1.05))
    out = []
    for spec, batch, ratio, limit in dict.fromkeys(wanted):
        value = next((r["value"] for r in models.get(spec, {}).get("rows", [])
                      if r.get("ratio") == ratio and r["batch"] == batch), None)  # fmt: skip
        if value is not None:
            out.append({"model": spec, "batch": batch, "ratio": ratio, "value": value, "at_most": limit,
                        "pass": value <= limit})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per block")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of blocks")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="torchvision builders (NAME or NAME+surgery)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import onnxruntime

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    settings = BenchSettings(tuple(batch_sizes), args.warmup, args.runs, args.rounds, accuracy=False, memory=False,
                             frames=False)  # the models alone, from float tensors
    result = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": THREADS,
                 "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "image_size": args.image_size, "runs": args.runs, "rounds": args.rounds, "models": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models.split(","):
            try:
                result["models"][spec] = bench_model(spec, args.image_size, batch_sizes, settings, Path(tmp))
            except Exception as exc:  # keep going: one failing model is a row, not a crash
                result["models"][spec] = {"status": f"error: {type(exc).__name__}: {exc}"}
    result["checks"] = checks(result["models"])
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
