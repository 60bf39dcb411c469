#!/usr/bin/env bash
# Set up edgecv on an NVIDIA Jetson (JetPack 6.x / 7) to build and benchmark TensorRT engines.
#
# TensorRT comes with JetPack, not from PyPI: its Python bindings are the Debian package
# python3-libnvinfer, built for the system Python. So edgecv goes into a virtual environment that can
# see the system site-packages. Engines are specific to the GPU and TensorRT version: build them here.
#
# Usage:  bash tools/jetson_setup.sh [venv-dir]        (default: ~/edgecv-venv)
set -euo pipefail

VENV="${1:-$HOME/edgecv-venv}"

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

# 2. A venv that sees the system TensorRT, then edgecv with its TensorRT extra (cuda-python). Install
#    NVIDIA's Jetson build of torch first if you also want the torch backend on the GPU.
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install "edgecv[tensorrt]"  # from a checkout: pip install -e ".[tensorrt]"

# 3. Check: the runner must find TensorRT and the GPU. On the device, build and time an engine with e.g.
#      edgecv bench model.int8.onnx --backend tensorrt --batch-sizes 1,8
#    (tegrastats is on PATH, so energy per image is measured too; some rails need sudo on older boards).
"$VENV/bin/python" - <<'EOF'
from edgecv.export.tensorrt import current_device_facts
facts = current_device_facts()
print(facts)
assert facts["tensorrt_version"], "TensorRT Python bindings not importable from the venv"
assert facts["compute_capability"], "no CUDA device found (is cuda-python installed?)"
EOF
echo "ok: now run  $VENV/bin/edgecv bench MODEL.onnx --backend tensorrt"
