"""The run report: report.md that reads like a report (no JSON in any cell), report.json with the same rows
`edgecv bench --json` writes, a two-panel pareto.png, files that follow the umask, rich tables."""

from __future__ import annotations

import json
import os
import re

import pytest
from rich.console import Console

from edgecv.bench.measure import BatchResult, BenchRow
from edgecv.report.cells import format_value
from edgecv.report.plots import _spread_labels, _y_limits, pareto_front, plot_points
from edgecv.report.render import (
    ReportSections,
    bench_table,
    render_markdown,
    summary_rows,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _batch(bs: int, p50: float, energy: float | None = None) -> BatchResult:
    return BatchResult(bs, p50, p50 * 1.1, p50 * 1.3, p50 * 1.05, p50 * 0.9, bs / (p50 / 1000), 30, energy)


def _row(stage, fmt, backend, top1, macs, size, b1, b64, deployable=True, note=None) -> BenchRow:
    return BenchRow(model=f"runs/x/{stage}", stage=stage, format=fmt, backend=backend, device="cpu", top1=top1,
                    top5=99.0, params=300_000, macs=macs, size_bytes=size, memory_mb=12.5,
                    latency=[_batch(1, b1), _batch(64, b64)], deployable=deployable, note=note)


ROWS = [
    _row("train", "torch", "torch", 92.30, 10_250_000, 1_250_000, 1.80, 60.0),
    _row("prune", "torch", "torch", 12.0, 4_530_000, 600_000, 1.10, 35.0, deployable=False, note="pruned, before fine-tuning"),
    _row("finetune", "torch", "torch", 92.17, 4_530_000, 600_000, 1.10, 35.0),
    _row("qat", "torch", "torch", 92.30, 4_530_000, 610_000, 3.50, 90.0, deployable=False, note="fake-quant"),
    _row("train", "onnx", "onnxruntime", 92.30, 10_250_000, 1_240_000, 0.30, 8.0),
    _row("finetune", "onnx", "onnxruntime", 92.17, 4_530_000, 577_000, 0.121, 3.45),
    _row("qat", "onnx-int8", "onnxruntime", 92.33, 4_530_000, 170_000, 0.066, 1.43),
]
SECTIONS = ReportSections(
    calibration=[{"calibrator": "max", "top1": 92.08, "top5": 99.8, "chosen": False},
                 {"calibrator": "mse", "top1": 92.16, "top5": 99.8, "chosen": True}],
    int8_graph={"file": "model.int8.onnx", "target": "onnxruntime", "int_op_counts": {"QLinearConv": 11, "QGemm": 1},
                "float_op_counts": {"Mul": 1}, "float_ops": [{"name": "n1", "op_type": "Mul", "reason": "no integer kernel"}],
                "violations": []},
    parity=[{"file": "model.onnx", "n": 512, "max_abs_diff": 2e-6, "top1_agreement": 1.0, "ok": True},
            {"file": "model.int8.onnx", "n": 512, "max_abs_diff": 0.3, "top1_agreement": 0.996, "ok": True}],
    stages=[{"stage": "00-train", "status": "done", "wall_s": 260.1, "top1": 92.3}],
    settings={"batch_sizes": [1, 64], "warmup": 20, "runs": 100, "rounds": 3},
    device={"cpu": "Xeon", "cores": 2, "versions": {"onnxruntime": "1.32.0"}, "cuda": None},
)


def _tables(md: str) -> list[list[str]]:
    return [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("|")]


def test_report_md_reads_like_a_report(tmp_path):
    md = render_markdown(ROWS, SECTIONS, title="quickstart")
    assert md.startswith("# quickstart\n\n## What compression bought")
    for cells in _tables(md):
        assert not any("{" in c or "[" in c for c in cells), cells  # no JSON in any cell
    # the headline: the INT8 model against the baseline on ONNX Runtime, as ratios
    assert "| qat/onnx-int8 | onnxruntime | train/onnx | +0.03 | 0.44x | 0.14x | 4.54x | 5.59x |" in md
    assert "Batch sizes measured: 1, 64." in md and "batch of 1 image" not in md
    assert "p50 ms (batch 1)" in md and "img/s (batch 64)" in md
    assert "## Latency per batch size" in md and md.count("| qat/onnx-int8 | onnxruntime |") == 3
    assert "| mse | 92.16 | 99.80 | yes |" in md
    assert "| QLinearConv | 11 | 0 |" in md and "| Mul | n1 | no integer kernel |" in md
    assert "| model.int8.onnx | 512 | 3.00e-01 | 99.60 | pass |" in md
    assert "| versions.onnxruntime | 1.32.0 |" in md and "| cuda | - |" in md
    assert "pruned, before fine-tuning" in md


def test_summary_compares_each_backend_with_its_own_baseline():
    s = {(r["model"], r["backend"]): r for r in summary_rows(ROWS)}
    assert set(s) == {("finetune/torch", "torch"), ("finetune/onnx", "onnxruntime"),
                      ("qat/onnx-int8", "onnxruntime")}  # not-deployable rows are left out
    int8 = s[("qat/onnx-int8", "onnxruntime")]
    assert int8["speedup_b1"] == pytest.approx(0.30 / 0.066, rel=1e-3)
    assert int8["throughput_ratio"] == pytest.approx(8.0 / 1.43, rel=1e-3) and int8["throughput_batch"] == 64
    assert int8["top1_delta"] == pytest.approx(0.03) and int8["macs_ratio"] == pytest.approx(0.442, abs=1e-3)


def test_write_report_files_and_json_rows(tmp_path):
    paths = write_report(tmp_path / "run", ROWS, SECTIONS, title="quickstart")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["pareto.png", "report.json", "report.md"]
    doc = json.loads(paths["json"].read_text())
    assert doc["rows"] == [r.to_dict() for r in ROWS]  # the same rows `edgecv bench --json` writes
    assert doc["calibration"][1]["chosen"] is True and doc["summary"]
    png = paths["pareto"].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000


def test_report_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        paths = write_report(tmp_path, ROWS[:1])
    finally:
        os.umask(old)
    for p in paths.values():
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))


def test_nan_is_written_as_null_and_shown_as_missing(tmp_path):
    row = _row("train", "torch", "torch", float("nan"), 1, 1, 1.0, 2.0)
    paths = write_report(tmp_path, [row])
    assert json.loads(paths["json"].read_text())["rows"][0]["top1"] is None
    assert "| train | torch | torch | - |" in paths["markdown"].read_text()


def test_pareto_uses_deployable_models():
    points = plot_points(ROWS)
    front = pareto_front(points)
    assert [p.label for p in front] == ["qat/onnx-int8 (onnxruntime)"]  # fastest and most accurate
    lo, hi = _y_limits(points)
    assert lo > 12.0 and lo < 92.17 and hi <= 100  # the 12 % pruned row does not stretch the axis
    throughput = pareto_front(plot_points(ROWS, "throughput"), lower_is_better=False)
    assert throughput[0].label == "qat/onnx-int8 (onnxruntime)"


def test_labels_do_not_overlap():
    ys = [92.3, 92.31, 92.29, 92.17, 50.0]
    placed = _spread_labels(ys, 0.2)
    ordered = sorted(placed)
    assert all(b - a >= 0.2 - 1e-9 for a, b in zip(ordered, ordered[1:], strict=False))
    assert placed[4] == 50.0


def test_format_value():
    assert format_value("top1", None) == "-"
    assert format_value("params", 11_689_512) == "11.69 M"
    assert format_value("macs", 1_820_000_000) == "1.82 G"
    assert format_value("size_bytes", 5 * 2**20) == "5.00 MiB"
    assert format_value("ms", 5.5912) == "5.591"
    assert format_value("ratio", 2.4149) == "2.41x" and format_value("delta", -0.13) == "-0.13"


def render(table) -> str:
    console = Console(record=True, width=220)
    console.print(table)
    return console.export_text()


def test_bench_table_columns_follow_what_was_measured():
    row = _row("qat", "onnx-int8", "onnxruntime", 91.5, 1, 1, 2.1, 40.0)
    text = render(bench_table([row]))
    assert "qat/onnx-int8" in text and "476.2" in text and "memory MiB" in text
    assert "mJ/image" not in text  # energy measured nowhere: no column
    row.latency[0].energy_mj_per_image = 12.25
    assert re.search(r"mJ/image", render(bench_table([row]))) and "12.25" in render(bench_table([row]))
