"""INT8 or float, measured on the target: the one-line verdict when INT8 is slower, and `precision: auto`
shipping the faster model (export, metadata.json and the report say which and why)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli, write_recipe

from edgecv.errors import EdgecvError
from edgecv.recipe import validate
from edgecv.stages.precision import PrecisionComparison, choose_precision

# A ResNet-8 two channels wide: every conv has fewer than 16 output channels, where ONNX Runtime's int8
# kernels take their slow path, so INT8 runs at about half the speed of float (measured 1.8x at batch 1).
SLOW_INT8 = {
    "name": "slow-int8",
    "seed": 0,
    "data": {"dataset": "synthetic", "image_size": 16, "channels": 3, "num_classes": 4,
             "train_size": 256, "val_size": 256, "batch_size": 64, "eval_batch_size": 128},
    "model": {"name": "edgecv:resnet8", "width": 2},
    "train": {"epochs": 1, "lr": 0.1, "schedule": "onecycle", "optimizer": "sgd"},
    "stages": [{"ptq": {"compare": ["max"], "calib_batches": 2, "ship_precision": "auto"}},
               {"export": {"parity_samples": 64}}],
    "bench": {"batch_sizes": [1], "warmup": 2, "runs": 5, "rounds": 1},
}  # fmt: skip
VERDICT = re.compile(r"INT8 is \d+\.\dx slower than float here \(ONNX Runtime, batch 1: .* ms\): .+")


def test_int8_slower_than_float_prints_the_verdict_and_auto_ships_float(tmp_path):
    recipe = write_recipe(tmp_path / "slow.yaml", SLOW_INT8)
    proc = run_cli("compress", str(recipe), "--out", str(tmp_path / "runs"), "--device", "cpu",
                   env={"COLUMNS": "400"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdicts = [line for line in proc.stdout.splitlines() if VERDICT.search(line)]
    assert len(verdicts) == 1, proc.stdout[-4000:]
    assert "convs have fewer than 16 output channels" in verdicts[0]
    run = tmp_path / "runs" / "slow-int8"
    ptq = next(e for e in json.loads((run / "manifest.json").read_text())["stages"] if e["name"] == "ptq")
    decision = ptq["metrics"]["precision"]
    assert decision["chosen"] == "float" and decision["requested"] == "auto" and decision["ratio"] > 1
    assert decision["float_top1"] is not None and decision["int8_top1"] is not None
    assert ptq["quantized"] is False  # the stage's model is the float one
    assert (run / "export" / "model.onnx").exists() and not (run / "export" / "model.int8.onnx").exists()
    metadata = json.loads((run / "export" / "metadata.json").read_text())
    assert metadata["precision"]["chosen"] == "float" and VERDICT.search(metadata["precision"]["verdict"])
    report = (run / "report.md").read_text()
    assert VERDICT.search(report) and "precision auto shipped the float model" in report
    assert any("precision auto shipped the float model" in n for n in json.loads((run / "report.json").read_text())["notes"])

    # precision int8 (the default) on the same model: the verdict again, and INT8 ships
    forced = {**SLOW_INT8, "stages": [{"ptq": {"compare": ["max"], "calib_batches": 2}}, {"export": {"parity_samples": 64}}]}
    proc = run_cli("compress", str(write_recipe(tmp_path / "forced.yaml", forced)), "--out", str(tmp_path / "runs"),
                   "--device", "cpu", env={"COLUMNS": "400"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "00-train: finished earlier, skipped" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if VERDICT.search(line)]) == 1
    assert (run / "export" / "model.int8.onnx").exists()
    metadata = json.loads((run / "export" / "metadata.json").read_text())
    assert metadata["precision"]["chosen"] == "int8" and metadata["precision"]["requested"] == "int8"


def _comparison(int8_ms: float, float_ms: float, int8_top1: float | None, float_top1: float | None):
    return PrecisionComparison("ONNX Runtime", 1, float_ms, int8_ms, float_top1, int8_top1, ["HardSigmoid"], 3, 0, 10)


@pytest.mark.parametrize(
    ("int8_ms", "int8_top1", "budget", "chosen"),
    [
        (1.4, 90.0, 0.5, "float"),  # INT8 slower: float ships
        (0.5, 89.8, 0.5, "int8"),  # INT8 faster, within the budget
        (0.5, 89.0, 0.5, "float"),  # INT8 faster but loses more than the budget
        (0.5, 89.0, 2.0, "int8"),  # ... which a wider budget allows
        (0.5, None, 0.5, "int8"),  # INT8 accuracy not known yet (QAT before training): speed decides
    ],
)
def test_choose_precision(int8_ms, int8_top1, budget, chosen):
    cmp = _comparison(int8_ms, 1.0, int8_top1, 90.0)
    got, why = choose_precision(cmp, budget)
    assert got == chosen and why
    if int8_ms > 1:
        assert cmp.verdict().startswith("INT8 is 1.4x slower than float here (ONNX Runtime, batch 1: 1.4 vs 1 ms): ")
        assert "hard-sigmoid has no integer kernel in ONNX Runtime, 3 float islands" in cmp.verdict()
    else:
        assert cmp.verdict().startswith("INT8 is 2.0x faster than float here")


def test_precision_options_are_checked():
    base = {"name": "p", "model": {"name": "edgecv:resnet8"}}
    validate({**base, "stages": [{"qat": {"ship_precision": "auto", "accuracy_budget": 1.0, "batch_size": 8}}]})
    with pytest.raises(EdgecvError, match="accuracy_budget: only ship_precision 'auto' takes it"):
        validate({**base, "stages": [{"ptq": {"accuracy_budget": 1.0}}]})
    with pytest.raises(EdgecvError, match="ship_precision auto times INT8 and float in ONNX Runtime"):
        validate({**base, "stages": [{"ptq": {"ship_precision": "auto", "backend": "tensorrt"}}]})
    with pytest.raises(EdgecvError, match="ship_precision"):
        validate({**base, "stages": [{"ptq": {"ship_precision": "fp16"}}]})


def test_a_tiny_model_is_timed_long_enough_to_tell_the_precisions_apart():
    """20 runs of a 50-microsecond model are 1 ms of timing: the block grows to ~0.1 s, within its bounds."""
    import time

    from edgecv.stages.precision import MAX_RUNS, MIN_RUNS, runs_for

    calls = []
    assert runs_for(lambda x: calls.append(x.shape), (3, 8, 8), 2) == MAX_RUNS  # a no-op: the most runs
    assert calls[0] == (2, 3, 8, 8)  # timed at the batch asked for
    assert runs_for(lambda x: time.sleep(0.02), (3, 8, 8), 1) == MIN_RUNS  # 20 ms a call: the fewest
    assert MIN_RUNS < runs_for(lambda x: time.sleep(0.0005), (3, 8, 8), 1) < MAX_RUNS
