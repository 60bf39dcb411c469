#!/usr/bin/env bash
# Set up edgecv on an NVIDIA Jetson (JetPack 5.1, 6.x, 7.x) to build, run and measure TensorRT engines.
#
# - TensorRT comes with JetPack, not from PyPI: its Python bindings are the Debian package
#   python3-libnvinfer, built for the system Python. edgecv goes into a virtual environment that sees the
#   system site-packages, and the `tensorrt` extra (PyPI's TensorRT) is NOT installed.
# - torch is not needed on the device (bench, eval, inspect, power and engine builds run without it) and
#   is never replaced: if NVIDIA's Jetson build of torch is installed system-wide, the venv sees it.
# - cuda-python must match the device's CUDA major version: JetPack 6 has CUDA 12, JetPack 7 CUDA 13,
#   JetPack 5 CUDA 11.4. This script reads it and installs the matching release.
#
# Usage:  bash tools/jetson_setup.sh [venv-dir]         (default: ~/edgecv-venv)
#         bash tools/jetson_setup.sh --cuda-python-spec  (print the cuda-python requirement for this CUDA)
# Engines are specific to the GPU and TensorRT version: build them on the device.
set -euo pipefail

# CUDA major version: ${CUDA_HOME:-/usr/local/cuda}/version.json (CUDA >= 11.1), else nvcc --version.
cuda_major() {
  local root="${CUDA_HOME:-/usr/local/cuda}" version=""
  if [[ -f "$root/version.json" ]]; then
    version=$(grep -A2 '"cuda"' "$root/version.json" | sed -n 's/.*"version" *: *"\([0-9][0-9.]*\)".*/\1/p' | head -n1)
  fi
  if [[ -z "$version" ]] && command -v nvcc >/dev/null 2>&1; then
    version=$(nvcc --version | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p' | head -n1)
  fi
  if [[ -z "$version" && -x "$root/bin/nvcc" ]]; then
    version=$("$root/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p' | head -n1)
  fi
  [[ -n "$version" ]] || return 1
  echo "${version%%.*}"
}

# The cuda-python release series for a CUDA major version (11 -> the last 11.8 bindings).
cuda_python_spec() {
  local major="$1"
  case "$major" in
    11) echo "cuda-python>=11.8,<12" ;;
    *) echo "cuda-python>=${major},<$((major + 1))" ;;
  esac
}

if [[ "${1:-}" == "--cuda-python-spec" ]]; then
  major=$(cuda_major) || { echo "error: cannot find the CUDA version (set CUDA_HOME or put nvcc on PATH)" >&2; exit 2; }
  cuda_python_spec "$major"
  exit 0
fi

VENV="${1:-$HOME/edgecv-venv}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ ! -f /etc/nv_tegra_release ]]; then
  echo "error: /etc/nv_tegra_release not found: this is not a Jetson running L4T" >&2
  exit 2
fi
echo "L4T: $(head -n1 /etc/nv_tegra_release)"

# 1. TensorRT's Python bindings, trtexec and tegrastats come with JetPack (nvidia-jetpack pulls them in).
if ! python3 -c "import tensorrt" 2>/dev/null; then
  sudo apt-get update
  sudo apt-get install -y python3-libnvinfer python3-libnvinfer-dev libnvinfer-bin python3-venv
fi
python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)"

major=$(cuda_major) || { echo "error: CUDA not found (is JetPack's CUDA installed? set CUDA_HOME)" >&2; exit 2; }
spec=$(cuda_python_spec "$major")
echo "CUDA $major -> $spec"

# 2. A venv that sees the system TensorRT (and NVIDIA's torch, if installed); edgecv without its torch
#    extra; cuda-python for this CUDA.
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install --upgrade pip
if [[ -f "$HERE/pyproject.toml" ]]; then
  "$VENV/bin/pip" install -e "$HERE" "$spec"
else
  "$VENV/bin/pip" install edgecv "$spec"
fi

# 3. Check: TensorRT, the CUDA runtime and the GPU are visible from the venv, torch or not.
"$VENV/bin/python" - <<'EOF'
from edgecv.device import jetson_facts, jetson_summary, clock_warning
from edgecv.export.trt.metadata import current_device_facts
facts = current_device_facts()
print(facts)
assert facts["tensorrt_version"], "TensorRT Python bindings not importable from the venv"
assert facts["compute_capability"], "no CUDA device found through cuda-python"
jetson = jetson_facts()
if jetson:
    print(jetson_summary(jetson))
    print(clock_warning(jetson) or "clocks locked")
EOF
echo "ok: build and time an engine with  $VENV/bin/edgecv bench MODEL.onnx --backend tensorrt --batch-sizes 1,8"
