"""The run report: files written atomically, JSON round trip, Markdown content, a real PNG, rich tables."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from edgecv.report import ROW_FIELDS, bench_table, rows_table, write_report
from edgecv.report.plots import pareto_front, plot_points
from edgecv.report.render import format_value, render_section

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {
        "stage": "train",
        "format": "torch",
        "backend": "torch",
        "top1": 91.8,
        "top5": 99.7,
        "params": 78042,
        "macs": 12_400_000,
        "size_bytes": 320_000,
        "latency_ms_p50": 1.92,
        "latency_ms_p90": 2.31,
        "throughput_ips": 520.8,
    },
    {
        "stage": "train",
        "format": "onnx",
        "backend": "onnxruntime",
        "top1": 91.8,
        "top5": 99.7,
        "params": 78042,
        "macs": 12_400_000,
        "size_bytes": 318_500,
        "latency_ms_p50": 0.61,
        "latency_ms_p90": 0.70,
        "throughput_ips": 1639.3,
    },
    {
        "stage": "qat",
        "format": "onnx-int8",
        "backend": "onnxruntime",
        "top1": 91.5,
        "top5": 99.6,
        "params": 78042,
        "macs": 12_400_000,
        "size_bytes": 98_000,
        "latency_ms_p50": 0.25,
        "latency_ms_p90": 0.29,
        "throughput_ips": 4000.0,
    },
    {
        "stage": "qat",
        "format": "engine",
        "backend": "tensorrt",
        "top1": None,
        "top5": None,
        "params": None,
        "macs": None,
        "size_bytes": None,
        "latency_ms_p50": None,
        "latency_ms_p90": None,
        "throughput_ips": None,
    },
]


def render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_write_report_files(tmp_path):
    sections = {
        "device": {"cpu": "Intel Xeon", "cores": 2, "onnxruntime": "1.32.0"},
        "stages": [{"name": "train", "seconds": 376.0}, {"name": "qat", "seconds": 120.5}],
        "notes": "INT8 is 2.4x faster than float ONNX Runtime at batch 1.",
    }
    paths = write_report(tmp_path / "run", ROWS, sections, title="quickstart")
    assert {k: p.name for k, p in paths.items()} == {
        "json": "report.json",
        "markdown": "report.md",
        "pareto": "pareto.png",
    }
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["pareto.png", "report.json", "report.md"]

    document = json.loads(paths["json"].read_text())
    assert document["rows"] == ROWS
    assert document["device"] == sections["device"] and document["stages"] == sections["stages"]

    md = paths["markdown"].read_text()
    assert md.startswith("# quickstart\n")
    table_lines = [line for line in md.splitlines() if line.startswith("| train") or line.startswith("| qat")]
    assert len(table_lines) == len(ROWS) + 2  # each row, plus the two rows of the stages section
    assert (
        "| train | onnx | onnxruntime | 91.80 | 99.70 | 78.04 k | 12.40 M | 311.04 KiB | 0.610 | 0.700 | 1639.3 |"
        in md
    )
    assert "| qat | engine | tensorrt | - | - | - | - | - | - | - | - |" in md
    assert "| cores | 2 |" in md and "| name | seconds |" in md
    assert "How to read this" in md and sections["notes"] in md
    assert "![top-1 vs latency](pareto.png)" in md

    png = paths["pareto"].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000


def test_write_report_overwrites_and_handles_no_plottable_rows(tmp_path):
    write_report(tmp_path, ROWS)
    paths = write_report(tmp_path, [ROWS[-1]])  # nothing to plot still gives a PNG
    assert json.loads(paths["json"].read_text()) == {"rows": [ROWS[-1]]}
    assert paths["pareto"].read_bytes().startswith(PNG_SIGNATURE)
    assert not list(tmp_path.glob(".*.tmp"))


def test_nan_is_written_as_null(tmp_path):
    row = dict(ROWS[0], top1=float("nan"))
    paths = write_report(tmp_path, [row])
    assert json.loads(paths["json"].read_text())["rows"][0]["top1"] is None
    assert "| train | torch | torch | - |" in paths["markdown"].read_text()


def test_pareto_front():
    points = plot_points(ROWS)
    assert [p[0] for p in points] == ["train/torch", "train/onnx", "qat/onnx-int8"]
    front = pareto_front(points)
    # int8 is fastest; onnx is slower but more accurate; torch is as accurate as onnx but slower.
    assert [p[0] for p in front] == ["qat/onnx-int8", "train/onnx"]


def test_format_value():
    assert format_value("top1", None) == "-"
    assert format_value("params", 11_689_512) == "11.69 M"
    assert format_value("macs", 1_820_000_000) == "1.82 G"
    assert format_value("size_bytes", 5 * 2**20) == "5.00 MiB"
    assert format_value("latency_ms_p50", 5.5912) == "5.591"
    assert format_value("stage", "prune") == "prune"
    assert render_section("empty", {}) == "## empty\n\n-"


def test_rows_table_shows_every_row():
    text = render(rows_table(ROWS, title="resnet8"))
    for header in ("stage", "format", "top-1 %", "p50 ms", "img/s"):
        assert header in text
    assert "onnx-int8" in text and "engine" in text and "4000.0" in text
    assert len(ROW_FIELDS) == 11


def test_bench_table_columns_follow_what_was_measured():
    from edgecv.bench import BENCH_FIELDS

    result = {
        "model": "model.int8.onnx",
        "backend": "onnxruntime",
        "batch_size": 1,
        "p50_ms": 2.1,
        "p90_ms": 2.4,
        "p99_ms": 3.0,
        "throughput_ips": 476.2,
        "memory_mb": 12.5,
        "size_bytes": 3_879_888,
        "top1": 91.5,
        "top5": 99.6,
        "energy_mj_per_image": None,
    }
    assert set(result) == set(BENCH_FIELDS)
    text = render(bench_table([result]))
    assert "model.int8.onnx" in text and "476.2" in text and "memory MiB" in text and "3.70 MiB" in text
    assert "mJ/img" not in text  # energy measured nowhere: no column
    with_energy = render(bench_table([dict(result, energy_mj_per_image=12.25)]))
    assert "mJ/img" in with_energy and "12.25" in with_energy


def test_sections_cannot_shadow_rows(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        write_report(tmp_path, ROWS, {"rows": []})
