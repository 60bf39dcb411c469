"""Which device to run on (`resolve_device`), and facts about the machine a measurement ran on: CPU, OS,
library versions, GPU, and Jetson/JetPack release. Imports neither torch nor TensorRT at module level."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path

from edgecv.errors import EdgecvError


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' and 'cuda:N' are checked and kept as
    given (the index matters on a machine with several GPUs); anything else is a one-line error."""
    device = device.strip().lower()
    if device == "cpu":
        return device
    if device not in ("auto", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise EdgecvError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    try:
        import torch
    except ImportError:
        if device == "auto":
            return "cpu"
        raise EdgecvError(f"--device {device}: torch is not installed, so edgecv cannot check the GPU") from None
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise EdgecvError(f"--device {device}: no CUDA device is available on this machine")
    index = device_index(device)
    if index >= torch.cuda.device_count():
        raise EdgecvError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_index(device: str) -> int:
    """'cuda:1' -> 1; 'cuda' and 'cpu' -> 0."""
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")

# L4T release -> JetPack release (NVIDIA's JetPack archive). Looked up by the longest matching prefix.
L4T_TO_JETPACK = {
    "32.4.3": "4.4",
    "32.4.4": "4.4.1",
    "32.5": "4.5",
    "32.5.1": "4.5.1",
    "32.5.2": "4.5.1",
    "32.6.1": "4.6",
    "32.7.1": "4.6.1",
    "32.7.2": "4.6.2",
    "32.7.3": "4.6.3",
    "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "32.7.6": "4.6.6",
    "34.1": "5.0 DP",
    "34.1.1": "5.0 DP",
    "35.1": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5": "5.1.3",
    "35.6": "5.1.4",
    "35.6.1": "5.1.5",
    "36.2": "6.0 DP",
    "36.3": "6.0",
    "36.4": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "38.2": "7.0",
}

# JetPack major.minor -> TensorRT it ships (NVIDIA's JetPack release notes); used in messages that say what to expect.
JETPACK_TENSORRT = {
    "4.6": "8.2",
    "5.0": "8.4",
    "5.1": "8.5",
    "6.0": "8.6",
    "6.1": "10.3",
    "6.2": "10.3",
    "7.0": "10.13",
}

_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_nv_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, GCID: ...' -> '36.4.3'."""
    match = _RELEASE.search(text)
    if not match:
        return None
    return f"{match.group(1)}.{match.group(2).strip('.')}"


def jetpack_for_l4t(l4t: str | None) -> str | None:
    """JetPack release for an L4T version ('36.4.3' -> '6.2'); the longest known prefix wins."""
    if not l4t:
        return None
    parts = l4t.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in L4T_TO_JETPACK:
            return L4T_TO_JETPACK[key]
    # An unlisted 36.x.y is JetPack 6, 35.x JetPack 5: better a major version than nothing.
    return {"32": "4", "35": "5", "36": "6", "38": "7"}.get(parts[0])


def jetson_facts(root: Path = Path("/")) -> dict | None:
    """{"model", "l4t", "jetpack", "tensorrt_expected"} read from <root>/etc/nv_tegra_release and
    <root>/proc/device-tree/model; None when neither says this is a Jetson."""
    release_file = root / "etc" / "nv_tegra_release"
    model_file = root / "proc" / "device-tree" / "model"
    l4t = None
    if release_file.is_file():
        l4t = parse_nv_tegra_release(release_file.read_text(errors="replace"))
    model = None
    if model_file.is_file():
        model = model_file.read_bytes().rstrip(b"\x00\n").decode(errors="replace").strip() or None
    is_jetson = l4t is not None or (model is not None and "jetson" in model.lower())
    if not is_jetson:
        return None
    jetpack = jetpack_for_l4t(l4t)
    major_minor = ".".join(jetpack.split()[0].split(".")[:2]) if jetpack else None
    return {
        "model": model,
        "l4t": l4t,
        "jetpack": jetpack,
        "tensorrt_expected": JETPACK_TENSORRT.get(major_minor) if major_minor else None,
    }


def cpu_model(cpuinfo: str) -> str | None:
    """The CPU's name from /proc/cpuinfo text (x86 'model name'; ARM 'Hardware' or 'Model')."""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return None


def _cuda_facts() -> dict | None:
    """Name and compute capability of CUDA device 0 via torch, when torch sees a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def host_facts() -> dict:
    """What a benchmark row needs to say where it ran: CPU, cores, OS, Python, library versions, GPU."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu_model(cpuinfo) or platform.processor() or None,
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("edgecv", "torch", "onnxruntime", "onnx", "tensorrt")},
        "cuda": _cuda_facts(),
        "jetson": jetson_facts(),
    }
