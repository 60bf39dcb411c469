"""Shared fixtures: a tiny synthetic recipe, a CLI runner (a real subprocess), and one finished run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "synthetic", "image_size": 16, "channels": 3, "num_classes": 4,
             "train_size": 512, "val_size": 256, "batch_size": 64, "eval_batch_size": 128},
    "model": {"name": "edgecv:resnet8", "width": 8},
    "train": {"epochs": 2, "lr": 0.1, "schedule": "onecycle", "optimizer": "sgd"},
    "stages": [
        {"prune": {"ratio": 0.5}},
        {"finetune": {"epochs": 1, "lr": 0.02, "distill": {"teacher": "baseline", "alpha": 0.5}}},
        {"ptq": {"compare": ["max", "percentile"], "calib_batches": 2}},
        {"qat": {"epochs": 1, "lr": 0.001}},
        {"export": {"parity_samples": 256}},
    ],
    "bench": {"batch_sizes": [1, 8], "warmup": 2, "runs": 5, "rounds": 1, "threads": 1},
}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# A test of what a machine without TensorRT says (the machines here); skipped where TensorRT is installed.
without_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                      reason="TensorRT is installed here")


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", TINY)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`edgecv ARGS` in a real subprocess, as a user runs it."""
    full_env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "edgecv", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=full_env
    )


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> dict:
    """One `edgecv compress` of the tiny recipe, shared by the tests that read its artifacts."""
    base = tmp_path_factory.mktemp("run")
    recipe = write_recipe(base / "tiny.yaml", TINY)
    proc = run_cli("compress", str(recipe), "--out", str(base / "runs"), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"recipe": recipe, "run_dir": base / "runs" / "tiny", "proc": proc, "base": base}


@pytest.fixture
def one_torch_thread():
    """One torch thread: on two shared cores, two threads per process spin and run several times slower.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_batchnorm(model, gen):
    """Give every BatchNorm2d statistics and affine terms like a trained net's (random weights alone make
    folding trivial), drawn from the generator `gen`; returns the model in eval mode."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()
