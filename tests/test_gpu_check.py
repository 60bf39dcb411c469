"""tools/gpu_check.sh where there is no GPU: one line, no traceback; and the parts it runs that work on a
CPU: the training-throughput benchmark and the JSON summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: tools/gpu_check.sh would run")
def test_gpu_check_without_a_gpu_ends_with_one_line(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)})
    assert proc.returncode == 3 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: nothing to check:") and "sees no CUDA GPU" in lines[0]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_gpu_check_without_torch_ends_with_one_line(tmp_path):
    """A python without torch (e.g. the system one): also one line."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")  # -I -S: no site-packages, no torch
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "check")})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1 and "torch is not installed" in lines[0], proc.stderr


@pytest.fixture(scope="module")
def throughput_file(tmp_path_factory):
    """One CPU run of the benchmark, shared by the tests below."""
    path = tmp_path_factory.mktemp("bench") / "train_resnet18_eager.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--model", "resnet18",
                           "--batch", "2", "--image-size", "32", "--steps", "2", "--warmup", "1", "--device", "cpu",
                           "--json", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == json.loads(path.read_text())
    return path


def test_training_throughput_benchmark_runs_edgecvs_step_on_the_cpu(throughput_file):
    row = json.loads(throughput_file.read_text())
    assert row["model"] == "resnet18" and row["images_per_s"] > 0 and row["steps"] == 2
    assert row["amp"] == "none (CPU)" and row["channels_last"] and "gpu_mem_mb" not in row


def test_summary_collects_every_section(tmp_path, throughput_file):
    """The summary of a run where tests passed and failed, one throughput run finished, one timed out,
    two were cut by the time budget, and the quick start finished."""
    out = tmp_path
    shutil.copy(throughput_file, out / throughput_file.name)
    tests = out / "t"
    tests.mkdir()
    (tests / "test_x.py").write_text("import pytest\ndef test_ok(): pass\ndef test_bad(): assert 0\n"
                                     "def test_skip(): pytest.skip('needs 2 GPUs')\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_x.py"),
                    f"--junitxml={out / 'gpu_tests.xml'}"], capture_output=True, timeout=120, cwd=tests)
    statuses = {"gpu_tests": {"status": "failed", "rc": 1, "seconds": 40},
                "train_resnet18_eager": {"status": "ok", "rc": 0, "seconds": 20},
                "train_resnet50_eager": {"status": "timeout", "rc": 124, "seconds": 60},
                "train_resnet50_compile": {"status": "skipped", "reason": "time budget of 470 s spent"},
                "quickstart": {"status": "ok", "rc": 0, "seconds": 150}}
    for name, status in statuses.items():
        (out / f"{name}.status.json").write_text(json.dumps(status))
    (out / "train_resnet50_eager.err").write_text("warming up\nstill compiling\n")
    (out / "runs" / "quickstart").mkdir(parents=True)
    (out / "runs" / "quickstart" / "report.json").write_text(json.dumps({"summary": [{"model": "qat/onnx-int8"}],
                                                                        "stages": {"train": 30}}))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check_summary.py"), str(out)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "gpu_check.json").read_text())
    t = summary["gpu_tests"]
    assert t["passed"] == 1 and t["failed"] == ["test_bad"] and t["skipped"][0].startswith("test_skip: ")
    r = summary["train_images_per_s"]
    assert r["resnet18"]["eager"]["images_per_s"] > 0 and r["resnet50"]["eager"]["status"] == "timeout"
    assert r["resnet50"]["eager"]["stderr_tail"] == ["warming up", "still compiling"]
    assert r["resnet50"]["compile"]["status"] == "skipped" and r["resnet18"]["compile"]["status"] == "not run"
    assert r["resnet50_meets_target"] is False
    assert summary["quickstart_cuda"]["summary"] == [{"model": "qat/onnx-int8"}]
