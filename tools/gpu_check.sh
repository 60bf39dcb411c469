#!/usr/bin/env bash
# GPU check: edgecv's CUDA paths on a GPU machine, in at most 8 minutes, as one JSON object on stdout
# (also written to $OUT/gpu_check.json; each section's output stays in $OUT).
#
#   bash tools/gpu_check.sh                 OUT=/tmp/edgecv-gpu-check, BUDGET_S=470 by default
#
# Sections, each cut off by a timeout and by what is left of the budget:
#   1. the gpu-marked tests (tests/test_gpu.py): AMP bfloat16/float16, channels_last, NCCL collectives
#      (one process; two processes on two GPUs, or on one GPU where NCCL allows it: it usually refuses
#      two ranks on one device, "Duplicate GPU detected", and the test says so), DDP training on every
#      GPU, GPU JPEG decoding, benchmarking on CUDA
#   2. training images/s of ResNet-50 and ResNet-18 (AMP bfloat16, channels_last, batch 256, synthetic
#      data on the GPU; benchmarks/train_throughput.py), eager, then with torch.compile
#   3. the quick start (edgecv compress quickstart) on CUDA, run beside section 1: needs Fashion-MNIST
#      on this machine (/usr/share/datasets/fashion-mnist, $EDGECV_DATA or ./data)
# Needs: a CUDA GPU, and edgecv's dependencies installed (no network is used). Without a GPU it prints
# one line and exits 3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}   # $PYTHON wins; else the project's .venv when there is one
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/edgecv-gpu-check}
BUDGET_S=${BUDGET_S:-470}
START=$(date +%s)

# ---- a GPU, or one line -----------------------------------------------------------------------------
reason=$("$PY" - <<'PY' 2>&1
import importlib.util, sys
if importlib.util.find_spec("torch") is None:
    print(f"torch is not installed for {sys.executable}"); sys.exit(1)
import torch
if not torch.cuda.is_available():
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    print(f"torch {torch.__version__} ({build}) sees no CUDA GPU"); sys.exit(1)
missing = [m for m in ("edgecv", "onnx", "onnxruntime", "torch_pruning", "typer", "pydantic") if importlib.util.find_spec(m) is None]
if missing:
    print(f"missing packages: {', '.join(missing)} (pip install -e . first)"); sys.exit(1)
PY
)
if [ $? -ne 0 ]; then
  echo "gpu_check: nothing to check: ${reason##*$'\n'}" >&2
  exit 3
fi

mkdir -p "$OUT"
rm -f "$OUT"/*.status.json "$OUT"/*.json "$OUT"/gpu_tests.xml
rm -rf "$OUT/runs"
"$PY" - > "$OUT/device.json" <<'PY'
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                  "name": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported(),
                  "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}))
PY

# run_section NAME MAX_SECONDS COMMAND...: stdout/stderr to $OUT/NAME.out|err, the outcome to NAME.status.json
run_section() {
  local name=$1 max=$2; shift 2
  local left=$(( START + BUDGET_S - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "{\"status\": \"skipped\", \"reason\": \"time budget of ${BUDGET_S} s spent\"}" > "$OUT/$name.status.json"
    return
  fi
  local limit=$(( max < left ? max : left ))
  echo "== $name (at most ${limit} s)" >&2
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$? status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status=failed; fi
  echo "{\"status\": \"$status\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit_s\": $limit}" \
    > "$OUT/$name.status.json"
}

# The quick start (mostly ONNX Runtime on the CPU cores) runs beside the tests (which time nothing);
# the throughput runs come after both, alone on the machine.
run_section quickstart 300 "$PY" -m edgecv compress quickstart --device cuda --out "$OUT/runs" &
QUICKSTART=$!
run_section gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
  --junitxml="$OUT/gpu_tests.xml"
wait "$QUICKSTART"

for model in resnet50 resnet18; do
  run_section "train_${model}_eager" 60 "$PY" benchmarks/train_throughput.py --model "$model" --batch 256 \
    --amp bfloat16 --channels-last --steps 30 --warmup 10 --device cuda --json "$OUT/train_${model}_eager.json"
done
for model in resnet50 resnet18; do
  run_section "train_${model}_compile" 150 "$PY" benchmarks/train_throughput.py --model "$model" --batch 256 \
    --amp bfloat16 --channels-last --compile --steps 30 --warmup 10 --device cuda \
    --json "$OUT/train_${model}_compile.json"
done


echo "{\"seconds\": $(( $(date +%s) - START ))}" > "$OUT/wall.json"
"$PY" tools/gpu_check_summary.py "$OUT"
