"""What `pip install edgecv` asks for: no torch in the library's dependencies (a Jetson keeps NVIDIA's build),
exact versions only in the quick start's constraints, and cuda-python picked for the device's CUDA major."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip()


def test_the_library_needs_no_torch_and_pins_nothing_exactly():
    core = {_name(r) for r in PROJECT["dependencies"]}
    assert core.isdisjoint({"torch", "torchvision", "torch-pruning", "matplotlib", "tensorrt", "cuda-python"})
    assert {"numpy", "onnx", "onnxruntime", "pillow", "typer", "pydantic", "pyyaml", "rich"} <= core
    extras = PROJECT["optional-dependencies"]
    assert {_name(r) for r in extras["train"]} == {"torch", "torchvision", "torch-pruning", "matplotlib"}
    every = [r for group in [PROJECT["dependencies"], *extras.values()] for r in group]
    assert not [r for r in every if "==" in r], "exact pins belong in constraints.txt"
    tensorrt = {_name(r): r for r in extras["tensorrt"]}
    assert tensorrt["tensorrt"] == "tensorrt>=8.5"  # JetPack 5.1 / 6.0 ship TensorRT 8.5 / 8.6


def test_quick_start_pins_its_torch_through_constraints():
    constraints = (ROOT / "constraints.txt").read_text().split()
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(constraints)
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[train,dev]'" in makefile


def _fake_cuda(folder: Path, version_json: str | None = None, nvcc_release: str | None = None) -> dict:
    env = {**os.environ, "CUDA_HOME": str(folder / "cuda"), "PATH": f"{folder / 'bin'}{os.pathsep}/usr/bin:/bin"}
    (folder / "cuda").mkdir(parents=True, exist_ok=True)
    (folder / "bin").mkdir(exist_ok=True)
    if version_json:
        (folder / "cuda" / "version.json").write_text(version_json)
    if nvcc_release:
        nvcc = folder / "bin" / "nvcc"
        nvcc.write_text("#!/bin/bash\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                        f"echo 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.68'\n")
        nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return env


VERSION_JSON = '{\n   "cuda" : {\n      "name" : "CUDA SDK",\n      "version" : "%s"\n   },\n' \
               '   "cuda_cccl" : {\n      "name" : "CUDA C++ Core Compute Libraries",\n      "version" : "9.9.9"\n   }\n}\n'


@pytest.mark.parametrize(
    ("version_json", "nvcc", "spec"),
    [(VERSION_JSON % "12.6.68", None, "cuda-python>=12,<13"),   # JetPack 6.1 / 6.2
     (VERSION_JSON % "13.0.48", None, "cuda-python>=13,<14"),   # JetPack 7
     (None, "11.4", "cuda-python>=11.8,<12"),                   # JetPack 5.1: nvcc only
     (VERSION_JSON % "12.2.140", "13.0", "cuda-python>=12,<13")],  # version.json wins
)
def test_jetson_setup_picks_cuda_python_for_the_cuda_major(tmp_path, version_json, nvcc, spec):
    env = _fake_cuda(tmp_path, version_json, nvcc)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "jetson_setup.sh"), "--cuda-python-spec"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == spec


def test_jetson_setup_without_cuda_says_so(tmp_path):
    env = _fake_cuda(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "jetson_setup.sh"), "--cuda-python-spec"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "cannot find the CUDA version" in proc.stderr


def test_jetson_setup_installs_no_tensorrt_or_torch_from_pypi():
    script = (ROOT / "tools" / "jetson_setup.sh").read_text()
    installs = [line for line in script.splitlines() if "pip\" install" in line and not line.strip().startswith("#")]
    assert installs and not any("[tensorrt]" in line or "torch" in line for line in installs)


def test_the_edgecv_command_points_at_a_public_function(tmp_path):
    """`edgecv` (the console script pip writes from [project.scripts]) runs the function it names, and that
    function is public: `--help` through it prints the commands and exits 0."""
    module, _, function = PROJECT["scripts"]["edgecv"].partition(":")
    assert not function.startswith("_")
    code = f"import sys; sys.argv = ['edgecv', '--help']; from {module} import {function}; {function}()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compress" in proc.stdout and "bench" in proc.stdout
