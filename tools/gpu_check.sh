#!/usr/bin/env bash
# GPU check: runs edgecv's CUDA paths on a lent GPU machine and prints figures.
# Usage (from the repo root):  bash tools/gpu_check.sh            (about 3-5 minutes on one H100)
# Needs: a CUDA GPU and PyTorch; no internet, no TensorRT. Uses synthetic data (no dataset download).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/edgecv-gpu-check}
mkdir -p "$OUT"

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'PY'
import torch, json
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PY
$PY -c "import onnx, onnxruntime, typer, pydantic, torch_pruning" 2>/dev/null || \
  { echo "installing edgecv's dependencies"; $PY -m pip install -q -e . 2>&1 | tail -2; }

cat > "$OUT/gpu.yaml" <<'YAML'
name: gpu-check
data: {dataset: synthetic, image_size: 64, channels: 3, num_classes: 10, train_size: 8192, val_size: 2048,
       batch_size: 256, eval_batch_size: 512}
model: {name: "torchvision:resnet18"}
train: {epochs: 3, lr: 0.1, schedule: onecycle, amp: true, label_smoothing: 0.05}
stages:
  - prune: {target_macs: 0.5, importance: taylor, round_to: 8}
  - finetune: {epochs: 2, lr: 0.02, distill: {teacher: baseline}}
  - ptq: {target: tensorrt, compare: [max, percentile, mse, entropy], calib_batches: 4}
  - qat: {epochs: 1, lr: 0.001, target: tensorrt}
  - export: {parity_samples: 512}
bench: {backends: [torch, onnxruntime], batch_sizes: [1, 32], warmup: 10, runs: 50, rounds: 2}
YAML

echo "== compress on cuda (AMP training, taylor pruning, TensorRT-style Q/DQ)"
start=$(date +%s)
$PY -m edgecv compress "$OUT/gpu.yaml" --out "$OUT/runs" --device cuda
echo "compress wall: $(( $(date +%s) - start )) s"

echo "== bench: torch on cuda vs onnxruntime on cpu"
R="$OUT/runs/gpu-check"
$PY -m edgecv bench "$R/02-finetune/model.pt" --backend torch --device cuda --batch-sizes 1,32,256 \
  --runs 100 --rounds 2 --no-accuracy --json "$OUT/bench-cuda.json"
$PY -m edgecv inspect "$R/export/model.int8.onnx" --target tensorrt

echo "== torchrun DDP on the GPU(s)"
NGPU=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
$PY -m torch.distributed.run --nproc_per_node="$NGPU" -m edgecv train "$OUT/gpu.yaml" --out "$OUT/ddp" \
  --device cuda --set train.epochs=1
echo "== summary"
$PY - "$R/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps(r["summary"], indent=1))
for row in r["rows"]:
    print(f"{row['stage']:>9} {row['format']:>10} {row['backend']:>12} top1 {row['top1']:6.2f}  p50 {row['latency_ms_p50']} ms  {row['throughput_ips']} img/s")
PY
