"""Every CLI command, run as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import yaml
from conftest import TINY, run_cli, without_tensorrt, write_recipe

COMMANDS = ["train", "compress", "sensitivity", "eval", "export", "bench", "inspect", "recipes"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def test_recipes_list_show_validate_schema():
    proc = run_cli("recipes", "list")
    assert proc.returncode == 0 and "quickstart" in proc.stdout and "imagenet-resnet18" in proc.stdout
    shown = run_cli("recipes", "show", "quickstart")
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["name"] == "quickstart"
    resolved = run_cli("recipes", "show", "quickstart", "--set", "train.epochs=2")
    assert yaml.safe_load(resolved.stdout)["train"]["epochs"] == 2
    ok = run_cli("recipes", "validate", "quickstart", "imagenet-resnet18", "imagenet-mobilenetv2")
    assert ok.returncode == 0 and ok.stdout.count("ok:") == 3
    schema = run_cli("recipes", "schema")
    assert json.loads(schema.stdout)["title"] == "Recipe"


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["train"].update(epohcs=1), "unknown key 'train.epohcs' (did you mean 'train.epochs'?)"),
        (lambda r: r["train"].update(lr="fast"), "train.lr"),
        (lambda r: r["stages"][0]["prune"].update(ratio=1.2), "stages[0].prune.ratio"),
    ],
)
def test_recipe_mistakes_exit_2_with_one_line(tmp_path, mutate, expected):
    recipe = json.loads(json.dumps(TINY))
    mutate(recipe)
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    line = one_error_line(run_cli("compress", str(path), "--out", str(tmp_path / "runs")))
    assert expected in line
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_file_mistakes_exit_2_with_one_line(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "is empty" in one_error_line(run_cli("compress", str(empty), "--out", str(tmp_path / "r")))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert "YAML syntax error" in one_error_line(run_cli("train", str(broken)))
    assert "not found" in one_error_line(run_cli("compress", str(tmp_path / "missing.yaml")))
    assert "--data" in one_error_line(run_cli("train", "quickstart", "--data", str(tmp_path / "nope")))
    assert "no-such-key" in one_error_line(run_cli("recipes", "validate", "quickstart", "--set", "train.no-such-key=1"))
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"this is not a checkpoint")
    assert "is not a model checkpoint" in one_error_line(run_cli("eval", str(not_a_model), "--recipe", "quickstart"))
    assert "is not a model checkpoint" in one_error_line(run_cli("export", str(not_a_model)))
    bad_onnx = tmp_path / "model.onnx"
    bad_onnx.write_bytes(b"garbage")
    assert "model.onnx" in one_error_line(run_cli("bench", str(bad_onnx), "--no-accuracy"))
    assert "model.onnx" in one_error_line(run_cli("inspect", str(bad_onnx)))
    assert "does not exist" in one_error_line(run_cli("bench", str(tmp_path / "ghost.onnx")))


def test_missing_dataset_folder_in_recipe(tmp_path):
    recipe = {**TINY, "data": {"dataset": "imagefolder", "root": str(tmp_path / "no-imagenet")}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    line = one_error_line(run_cli("train", str(path), "--out", str(tmp_path / "runs")))
    assert "no-imagenet" in line and "does not exist" in line


def test_debug_shows_the_traceback(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = run_cli("compress", str(empty), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    return struct.unpack(">II", data[16:24])


def test_compress_writes_the_run_dir_and_report(finished_run):
    run = finished_run["run_dir"]
    for name in ("recipe.resolved.yaml", "manifest.json", "report.md", "report.json", "pareto.png",
                 "export/model.onnx", "export/model.int8.onnx", "export/metadata.json"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["train", "prune", "finetune", "ptq", "qat", "export"]
    assert all(s["status"] == "done" for s in manifest["stages"])
    report = json.loads((run / "report.json").read_text())
    formats = {(r["format"], r["backend"]) for r in report["rows"]}
    assert {("torch", "torch"), ("onnx", "onnxruntime"), ("onnx-int8", "onnxruntime")} <= formats
    by = {(r["stage"], r["format"]): r for r in report["rows"]}
    assert by[("prune", "torch")]["macs"] < by[("train", "torch")]["macs"]
    assert by[("qat", "onnx-int8")]["size_bytes"] < by[("finetune", "torch")]["size_bytes"]
    assert by[("train", "onnx")]["backend"] == "onnxruntime"  # the baseline on each backend, for the summary
    assert [b["batch_size"] for b in by[("qat", "onnx-int8")]["latency"]] == [1, 8]
    assert not by[("prune", "torch")]["deployable"] and not by[("qat", "torch")]["deployable"]
    assert {(s["model"], s["backend"]) for s in report["summary"]} >= {("qat/onnx-int8", "onnxruntime")}
    assert [c["calibrator"] for c in report["calibration"]] == ["max", "percentile"]
    assert report["settings"]["threads"] == 1  # bench.threads: the runners' CPU threads, recorded
    meta = json.loads((run / "export" / "metadata.json").read_text())
    assert meta["files"]["model.int8.onnx"]["parity"]["n"] == 256  # export.parity_samples
    assert sum(c["chosen"] for c in report["calibration"]) == 1
    assert report["int8_graph"]["float_ops"] == []
    md = (run / "report.md").read_text()
    assert "## What compression bought" in md and "Batch sizes measured: 1, 8." in md
    assert not [line for line in md.splitlines() if line.startswith("|") and "{" in line]
    assert _png_size(run / "pareto.png")[0] > 1000
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert resolved["stages"][0]["prune"]["ratio"] == 0.5


def test_compress_rerun_skips_finished_stages(finished_run):
    proc = run_cli("compress", str(finished_run["recipe"]), "--out", str(finished_run["run_dir"].parent),
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("finished earlier, skipped") == 6
    assert "epoch 1/" not in proc.stdout


def test_eval_pt_and_onnx_agree_with_the_report(finished_run):
    run = finished_run["run_dir"]
    report = json.loads((run / "report.json").read_text())
    by = {(r["stage"], r["format"]): r for r in report["rows"]}
    out = finished_run["base"] / "eval.json"
    proc = run_cli("eval", str(run / "export" / "model.int8.onnx"), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["top1"] == pytest.approx(by[("qat", "onnx-int8")]["top1"], abs=0.01)
    proc = run_cli("eval", str(run / "00-train" / "model.pt"), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["top1"] == pytest.approx(by[("train", "torch")]["top1"], abs=0.01)


def test_export_a_checkpoint(finished_run, tmp_path):
    out = tmp_path / "pruned.onnx"
    proc = run_cli("export", str(finished_run["run_dir"] / "02-finetune" / "model.pt"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "parity vs torch" in proc.stdout
    qout = tmp_path / "q.onnx"
    proc = run_cli("export", str(finished_run["run_dir"] / "04-qat" / "model.pt"), "--out", str(qout))
    assert proc.returncode == 0, proc.stderr
    assert "top-1 agreement" in proc.stdout


def test_bench_several_models_and_backends(finished_run, tmp_path):
    run = finished_run["run_dir"]
    out = tmp_path / "bench.json"
    proc = run_cli("bench", str(run / "export" / "model.onnx"), str(run / "export" / "model.int8.onnx"),
                   "--batch-sizes", "1,4", "--runs", "5", "--warmup", "1", "--rounds", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["format"], r["backend"]) for r in rows] == [("onnx", "onnxruntime"), ("onnx-int8", "onnxruntime")]
    for r in rows:
        assert [b["batch_size"] for b in r["latency"]] == [1, 4]
        assert all(0 < b["p50_ms"] <= b["p90_ms"] <= b["p99_ms"] for b in r["latency"])
        assert r["top1"] is not None and r["memory_mb"] is not None
    report = json.loads((run / "report.json").read_text())
    assert set(rows[0]) == set(report["rows"][0])  # one row type for `bench --json` and report.json
    proc = run_cli("bench", str(run / "02-finetune" / "model.pt"), "--backend", "torch", "--batch-sizes", "2",
                   "--runs", "3", "--rounds", "1", "--no-accuracy", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["backend"] == "torch" and row["top1"] is None


def test_inspect_lists_float_ops(finished_run, tmp_path):
    run = finished_run["run_dir"]
    out = tmp_path / "inspect.json"
    proc = run_cli("inspect", str(run / "export" / "model.int8.onnx"), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["float_ops"] == []
    proc = run_cli("inspect", str(run / "export" / "model.onnx"), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    float_ops = json.loads(out.read_text())["float_ops"]
    assert any(op["op_type"] == "Conv" for op in float_ops)
    assert all(op["name"] and op["reason"] for op in float_ops)


def test_sensitivity_ranks_layers(finished_run, tmp_path):
    out = tmp_path / "sens.json"
    proc = run_cli("sensitivity", str(finished_run["recipe"]), "--out", str(finished_run["run_dir"].parent),
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert len(rows) >= 5
    sqnr = [r["sqnr_db"] for r in rows]
    assert sqnr == sorted(sqnr)  # most sensitive (lowest SQNR) first
    assert "finished earlier, skipped" in proc.stdout  # reused the run's float model
    manifest = json.loads((finished_run["run_dir"] / "manifest.json").read_text())
    assert len(manifest["stages"]) == 6  # stopping early keeps the later stages' records


def test_train_only_runs_the_baseline(tmp_path):
    recipe = {**TINY, "name": "tiny-train", "train": {**TINY["train"], "epochs": 1}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cli("train", str(path), "--out", str(tmp_path / "runs"), "--device", "cpu", "--set", "train.lr=0.05")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "tiny-train"
    assert (run / "00-train" / "model.pt").is_file() and not (run / "01-prune").exists()
    assert yaml.safe_load((run / "recipe.resolved.yaml").read_text())["train"]["lr"] == 0.05


# Stages the tiny ResNet-8 cannot exercise run end to end in their own test, which checks the same things:
# surgery (it changes hard-swish and squeeze-excitation) in tests/test_surgery.py.
STAGES_WITH_THEIR_OWN_RUN = {"surgery"}


def _stage_names():
    from edgecv.stages import STAGES

    return [name for name in STAGES.names() if name not in STAGES_WITH_THEIR_OWN_RUN]


def test_tiny_recipe_uses_every_stage():
    assert {next(iter(s)) for s in TINY["stages"]} | {"train"} == set(_stage_names())


@pytest.mark.parametrize("stage", _stage_names())
def test_every_registered_stage_ran_and_recorded_metrics(finished_run, stage):
    """The tiny recipe uses every stage in the registry; each finished with its metrics on disk."""
    manifest = json.loads((finished_run["run_dir"] / "manifest.json").read_text())
    entry = next(e for e in manifest["stages"] if e["name"] == stage)
    assert entry["status"] == "done" and entry["wall_s"] >= 0
    metrics = json.loads((finished_run["run_dir"] / entry["dir"] / "metrics.json").read_text())
    assert metrics == entry["metrics"]
    if stage != "export":
        assert 0 <= metrics["top1"] <= 100
        assert (finished_run["run_dir"] / entry["dir"] / "model.pt").is_file()
    else:
        assert set(metrics["files"]) == {"model.onnx", "model.int8.onnx"}


@without_tensorrt
def test_tensorrt_export_without_tensorrt_is_refused_before_training(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", TINY)
    line = one_error_line(run_cli("compress", str(path), "--out", str(tmp_path / "runs"), "--set",
                                  "stages.export.build_engine=true"))
    assert "TensorRT is not installed" in line and "export.build_engine" in line
    assert not (tmp_path / "runs").exists()
