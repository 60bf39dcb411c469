"""Record where NVIDIA's own quantizer puts Q/DQ for TensorRT, as reference files for edgecv's tests.

For each model: edgecv exports the float ONNX (random weights, no download), TensorRT Model Optimizer's ONNX PTQ
(`python -m modelopt.onnx.quantization --quantize_mode int8`) quantizes it in its own virtual environment, and
the placement is written to tests/data/trt_reference/<model>.json: every node of the float graph with which of
its inputs are quantized, the Add / Mul / Concat / pool pattern, counts, and edgecv's TensorRT lint of both of
ModelOpt's weight forms (int8 + DQ with --dq_only, float + Q -> DQ without). No weights are stored.

ModelOpt is not an edgecv dependency: it installs `onnxruntime-gpu` and torch, so it gets its own venv (made on
the first run, under /tmp by default) and never touches the project's. Run with the project's Python:

    nice -n 10 python tools/trt_reference_placement.py                  # every model below, 64 px
    python tools/trt_reference_placement.py --models torchvision:resnet18 --size 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecv.export.lint import inspect_onnx  # noqa: E402
from edgecv.export.lint.pattern import qdq_pattern  # noqa: E402
from edgecv.export.onnx import export_onnx  # noqa: E402
from edgecv.models import build_model  # noqa: E402

MODELOPT = "nvidia-modelopt[onnx]==0.47.0"
DEFAULT_VENV = Path("/tmp/edgecv-modelopt-venv")
OUT = ROOT / "tests" / "data" / "trt_reference"
# one model per torchvision family with residual Adds, squeeze-excitation, Concat or a standing BatchNorm /
# LayerNorm (the three the issue names first)
MODELS = [
    "torchvision:resnet18",
    "torchvision:mobilenet_v2",
    "torchvision:efficientnet_b0",
    "torchvision:resnet50",
    "torchvision:resnext50_32x4d",
    "torchvision:mobilenet_v3_large",
    "torchvision:regnet_x_400mf",
    "torchvision:regnet_y_400mf",
    "torchvision:efficientnet_v2_s",
    "torchvision:mnasnet0_5",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:convnext_tiny",
    "torchvision:densenet121",
    "torchvision:googlenet",
    "torchvision:squeezenet1_1",
    "edgecv:resnet8",
]


def ensure_venv(venv: Path) -> Path:
    """The venv's python with ModelOpt installed (made and installed on the first call)."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('nvidia-modelopt'))"]
    found = subprocess.run(probe, capture_output=True, text=True)
    if found.returncode != 0 or found.stdout.strip() != MODELOPT.split("==")[1]:
        subprocess.run([str(python), "-m", "pip", "install", "-q", MODELOPT], check=True)
    return python


def modelopt_version(python: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('nvidia-modelopt'))"
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def run_modelopt(python: Path, float_path: Path, calib: Path, out: Path, dq_only: bool) -> list[str]:
    """ModelOpt's INT8 PTQ of `float_path`; returns the command line (for the record)."""
    args = [
        "-m", "modelopt.onnx.quantization", f"--onnx_path={float_path}", "--quantize_mode=int8",
        f"--calibration_data_path={calib}", "--calibration_method=max", "--calibration_eps", "cpu",
        "--high_precision_dtype", "fp32", f"--output_path={out}",
    ]  # fmt: skip
    if dq_only:
        args.append("--dq_only")
    proc = subprocess.run([str(python), *args], capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"modelopt failed on {float_path.name}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return ["python", *[a.replace(str(float_path.parent) + "/", "") for a in args]]


def structure(pattern: dict) -> list:
    return [(r["node"], sorted(i["from"] for i in r["inputs"]), r["consumers"]) for r in pattern["nodes"]]


def lint_summary(path: Path) -> dict:
    report = inspect_onnx(path, "tensorrt")
    return {k: report[k] for k in ("violations", "int_op_counts", "float_op_counts", "qdq_counts")}


def reference(name: str, size: int, python: Path, version: str, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=size).eval()
    stem = name.replace(":", "_")
    float_path = export_onnx(model, tmp / f"{stem}.onnx", torch.randn(2, 3, size, size))
    calib = tmp / f"{stem}.calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32))
    dq_path, qdq_path = tmp / f"{stem}.dq_only.onnx", tmp / f"{stem}.qdq.onnx"
    command = run_modelopt(python, float_path, calib, dq_path, dq_only=True)
    run_modelopt(python, float_path, calib, qdq_path, dq_only=False)
    proto = onnx.load(str(dq_path))
    pattern = qdq_pattern(proto)
    if structure(pattern) != structure(qdq_pattern(onnx.load(str(float_path)))):
        raise RuntimeError(f"{name}: node names of ModelOpt's graph do not match the float graph's")
    return {
        "model": name,
        "image_size": size,
        "modelopt_version": version,
        "command": command,
        "counts": pattern["counts"],
        "lint": {"dq_only": lint_summary(dq_path), "float_weights": lint_summary(qdq_path)},
        "nodes": pattern["nodes"],
        "graph": pattern["graph"],
    }


def to_json(ref: dict) -> str:
    """Compact JSON that diffs well: one key per line, one node per line."""
    lines = []
    for key, value in ref.items():
        if isinstance(value, list) and value and isinstance(value[0], (dict, list)):
            rows = ",\n".join("  " + json.dumps(v, separators=(",", ":")) for v in value)
            lines.append(f"{json.dumps(key)}: [\n{rows}\n]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=64, help="input size in pixels (default 64)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="ModelOpt's own virtual environment")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    version = modelopt_version(python)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            start = time.time()
            try:
                ref = reference(name, args.size, python, version, Path(tmp))
            except Exception as exc:  # keep going: one row per model, as benchmarks do
                failed.append(name)
                print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:500]}", flush=True)
                continue
            path = args.out / f"{name.split(':')[-1]}.json"
            path.write_text(to_json(ref))
            violations = ref["lint"]["dq_only"]["violations"] + ref["lint"]["float_weights"]["violations"]
            print(f"{name}: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
                  f"({path.stat().st_size // 1024} KB, {time.time() - start:.0f} s, "
                  f"{len(violations)} lint violations)", flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
