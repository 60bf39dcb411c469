"""benchmarks/prune_cpu.py on a tiny setting: the JSON it prints has every figure the issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # a dozen prunings and latency searches of resnet18: minutes on two cores
def test_prune_benchmark_prints_every_figure_on_a_tiny_setting():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "prune_cpu.py"), "--models", "resnet18", "--image-size", "32",
         "--runs", "2", "--rounds", "1", "--ratios", "0.3,0.7", "--target-fractions", "1000000"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)["models"]["resnet18"]
    assert result["eager_fp32_ms"] > 0
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["unpruned", "ratio 0.3", "ratio 0.7", "macs 0.5 uniform", "macs 0.5 latency"]
    for row in rows.values():
        assert row["ort_fp32_ms"] > 0 and row["ort_int8_ms"] > 0 and row["ort_int8_speedup_vs_eager"] > 0
    assert rows["unpruned"]["macs"] > rows["ratio 0.3"]["macs"] > rows["ratio 0.7"]["macs"]
    for allocation in ("uniform", "latency"):  # equal MACs: both within 5 % of half
        assert abs(rows[f"macs 0.5 {allocation}"]["macs_kept"] / 0.5 - 1) <= 0.05
    (search,) = result["latency_targets"]  # eager / 10^6: faster than any pruning reaches
    assert search["error"].startswith("prune.target_latency_ms") and "best reached" in search["error"]
    assert set(result["checks"]) >= {"latency_over_uniform_int8", "latency_at_least_as_fast_int8"}
