"""Which device to run on (`resolve_device`), and facts about the machine a measurement ran on: CPU, OS,
library versions, GPU (from the CUDA runtime through cuda-python, else torch), and Jetson facts (model,
L4T/JetPack, power mode, whether the clocks are locked). Imports neither torch nor TensorRT at module level."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecv.errors import EdgecvError


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' and 'cuda:N' are checked and kept as
    given (the index matters on a machine with several GPUs); anything else is a one-line error."""
    device = device.strip().lower()
    if device == "cpu":
        return device
    if device not in ("auto", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise EdgecvError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    count = cuda_device_count()
    if count is None:
        if device == "auto":
            return "cpu"
        raise EdgecvError(
            f"--device {device}: edgecv cannot check the GPU: install cuda-python (the TensorRT extra) or torch"
        )
    if device == "auto":
        return "cuda" if count > 0 else "cpu"
    if count == 0:
        raise EdgecvError(f"--device {device}: no CUDA device is available on this machine")
    if device_index(device) >= count:
        raise EdgecvError(f"--device {device}: this machine has {count} CUDA device(s)")
    return device


def cuda_device_count() -> int | None:
    """CUDA devices this machine offers: the larger of torch's count and the CUDA runtime's (cuda-python),
    so that either library alone is enough; None when neither is installed (nothing can be known)."""
    counts = []
    try:
        import torch
    except ImportError:
        pass
    else:
        counts.append(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    runtime = cuda_runtime()
    if runtime is not None:
        counts.append(int(_cuda_call(runtime.cudaGetDeviceCount) or 0))
    return max(counts) if counts else None


# ------------------------------------------------------------------------------------------ CUDA runtime
def cuda_runtime() -> Any | None:
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6), else `cuda.cudart`
    (older releases); None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            return None
    return runtime


def _cuda_call(fn: Callable[..., Any], *args: Any) -> Any | None:
    """The value of a cuda-python call that returns (err, value), or None when it fails (no GPU, no driver:
    cuda-python 12.2 raises RuntimeError when it cannot load libcuda, later releases return an error)."""
    try:
        err, *values = fn(*args)
    except (RuntimeError, OSError):
        return None
    if int(err) != 0:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _text(value: Any) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.split("\x00", 1)[0].strip()


def cuda_device_facts(index: int = 0) -> dict | None:
    """{"name", "compute_capability", "memory_mb"} of CUDA device `index` from the CUDA runtime
    (cuda-python), None when cuda-python or the device is missing."""
    runtime = cuda_runtime()
    if runtime is None:
        return None
    props = _cuda_call(runtime.cudaGetDeviceProperties, index)
    if props is None:
        return None
    return {"name": _text(props.name), "compute_capability": f"{props.major}.{props.minor}",
            "memory_mb": round(int(props.totalGlobalMem) / 2**20)}


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
    "38.4": "7.1",
    "39.2": "7.2",
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
    "7.1": "10.13",
    "7.2": "11.4",
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
    return {"32": "4", "35": "5", "36": "6", "38": "7", "39": "7"}.get(parts[0])


def jetson_facts(root: Path = Path("/"), run: Callable[[list[str]], str | None] | None = None) -> dict | None:
    """{"model", "l4t", "jetpack", "tensorrt_expected", "power_mode", "clocks"} read from
    <root>/etc/nv_tegra_release, <root>/proc/device-tree/model, `nvpmodel -q` and `jetson_clocks --show`
    (through `run`, default: the real tools); None when neither file says this is a Jetson."""
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
    run = run or run_tool
    return {
        "model": model,
        "l4t": l4t,
        "jetpack": jetpack,
        "tensorrt_expected": JETPACK_TENSORRT.get(major_minor) if major_minor else None,
        "power_mode": parse_nvpmodel_query(run(["nvpmodel", "-q"]) or ""),
        "clocks": parse_jetson_clocks_show(run(["jetson_clocks", "--show"]) or ""),
    }


def run_tool(cmd: list[str], timeout_s: float = 10.0) -> str | None:
    """stdout of a Jetson tool, or None when it is missing, fails (jetson_clocks needs root on some
    boards) or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def parse_nvpmodel_query(text: str) -> dict | None:
    """`nvpmodel -q` -> {"name": "MAXN_SUPER", "id": 2} (id None when not printed); None without a mode."""
    match = re.search(r"NV Power Mode:\s*(\S+)", text)
    if not match:
        return None
    after = text[match.end():].split()
    return {"name": match.group(1), "id": int(after[0]) if after and after[0].isdigit() else None}


_FREQS = re.compile(r"MinFreq=(\d+)\s+MaxFreq=(\d+)\s+CurrentFreq=(\d+)")


def parse_jetson_clocks_show(text: str) -> dict | None:
    """`jetson_clocks --show` -> {"locked": bool, "unlocked": [what is not pinned]}: locked means every
    online CPU and the GPU run at MinFreq == MaxFreq and the memory clock is overridden (FreqOverride=1),
    which is what `sudo jetson_clocks` sets. None when the text has no clock lines (not run, no root)."""
    unlocked, seen = [], 0
    for line in text.splitlines():
        line = line.strip()
        freqs = _FREQS.search(line)
        name = line.split(":", 1)[0] if line.startswith("cpu") else line.split(" ", 1)[0]
        if line.startswith("cpu") and freqs:
            seen += 1
            if "Online=0" not in line and freqs.group(1) != freqs.group(2):
                unlocked.append(name)
        elif line.startswith("GPU") and freqs:
            seen += 1
            if freqs.group(1) != freqs.group(2):
                unlocked.append("GPU")
        elif line.startswith("EMC") and "FreqOverride=" in line:
            seen += 1
            if "FreqOverride=1" not in line:
                unlocked.append("EMC")
    if not seen:
        return None
    cpus = [u for u in unlocked if u.startswith("cpu")]
    summary = ([f"{len(cpus)} CPU cores"] if cpus else []) + [u for u in unlocked if not u.startswith("cpu")]
    return {"locked": not unlocked, "unlocked": summary}


def clock_warning(jetson: dict | None) -> str | None:
    """The line to print next to Jetson measurements when the clocks are not locked (or unknown)."""
    if not jetson:
        return None
    clocks = jetson.get("clocks")
    if clocks is None:
        return ("clocks: unknown (`jetson_clocks --show` printed nothing; run as root): latency may vary "
                "with DVFS; lock them with `sudo jetson_clocks`")
    if not clocks["locked"]:
        return (f"clocks are not locked ({', '.join(clocks['unlocked'])} scale with load): latency and power "
                "vary run to run; lock them with `sudo jetson_clocks` before measuring")
    return None


def jetson_summary(jetson: dict) -> str:
    """One line: model, JetPack/L4T, power mode, clocks."""
    mode = jetson.get("power_mode") or {}
    clocks = jetson.get("clocks")
    parts = [jetson.get("model") or "Jetson",
             f"JetPack {jetson.get('jetpack') or '?'} (L4T {jetson.get('l4t') or '?'})",
             f"power mode {mode.get('name', '?')}" + (f" ({mode['id']})" if mode.get("id") is not None else ""),
             "clocks " + ("unknown" if clocks is None else "locked" if clocks["locked"] else "not locked")]
    return ", ".join(parts)


def cpu_model(cpuinfo: str) -> str | None:
    """The CPU's name from /proc/cpuinfo text (x86 'model name'; ARM 'Hardware' or 'Model')."""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return None


def _cuda_facts() -> dict | None:
    """Name and compute capability of CUDA device 0: from the CUDA runtime (cuda-python), else torch."""
    facts = cuda_device_facts(0)
    if facts is not None:
        return facts
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
        "versions": {name: _version(name) for name in ("edgecv", "torch", "onnxruntime", "onnx", "tensorrt",
                                                       "cuda-python", "cuda-bindings")},
        "cuda": _cuda_facts(),
        "jetson": jetson_facts(),
    }
