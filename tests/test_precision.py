"""INT8 or float, measured on the target: the one-line verdict when INT8 is slower, and `precision: auto`
shipping the faster model (export, metadata.json and the report say which and why)."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import run_cli, write_recipe

from edgecv.bench.latency import input_batch
from edgecv.errors import EdgecvError
from edgecv.pipeline import Pipeline
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
FORCED_INT8 = [{"ptq": {"compare": ["max"], "calib_batches": 2}}, {"export": {"parity_samples": 64}}]


def fixed_times(int8_ms: float, float_ms: float, calls: list):
    """A precision timing that returns the times given: it runs each real ONNX Runtime session once at the
    batch asked for (what a real timing would time), and records what it was asked."""

    def time_ms(runners, input_shape, batch):
        outputs = {name: runner(input_batch(input_shape, batch, False)) for name, runner in runners.items()}
        calls.append({"formats": sorted(runners), "batch": batch, "rows": {k: len(v) for k, v in outputs.items()}})
        return {"onnx": float_ms, "onnx-int8": int8_ms}

    return time_ms


def _run(recipe: dict, out, time_ms, capsys) -> tuple[str, dict]:
    Pipeline(validate(recipe), out, "cpu", time_precisions=time_ms).run()
    run = out / recipe["name"]
    ptq = next(e for e in json.loads((run / "manifest.json").read_text())["stages"] if e["name"] == "ptq")
    return capsys.readouterr().out, ptq


def assert_float_shipped(run) -> None:
    """What a user finds when ship_precision auto shipped float: no INT8 file, the verdict in the export's
    metadata, report.md and report.json."""
    assert (run / "export" / "model.onnx").exists() and not (run / "export" / "model.int8.onnx").exists()
    metadata = json.loads((run / "export" / "metadata.json").read_text())
    assert metadata["precision"]["chosen"] == "float" and VERDICT.search(metadata["precision"]["verdict"])
    report = (run / "report.md").read_text()
    assert VERDICT.search(report) and "ship_precision auto shipped the float model" in report
    notes = json.loads((run / "report.json").read_text())["notes"]
    assert any("ship_precision auto shipped the float model" in n for n in notes)


def test_int8_measured_slower_prints_the_verdict_and_auto_ships_float(tmp_path, capsys):
    """The verdict and `precision: auto` on injected times, through the real stages (ptq, export, report)."""
    out, calls = tmp_path / "runs", []
    stdout, ptq = _run(SLOW_INT8, out, fixed_times(2.0, 1.0, calls), capsys)
    assert calls == [{"formats": ["onnx", "onnx-int8"], "batch": 1, "rows": {"onnx": 1, "onnx-int8": 1}}]
    verdicts = [line for line in stdout.splitlines() if VERDICT.search(line)]
    assert len(verdicts) == 1, stdout[-4000:]
    assert "INT8 is 2.0x slower than float here (ONNX Runtime, batch 1: 2 vs 1 ms): " in verdicts[0]
    assert "convs have fewer than 16 output channels" in verdicts[0]
    assert "precision auto: float ships (float is 2.00x as fast as int8 at batch 1" in stdout
    decision = ptq["metrics"]["precision"]
    assert decision["chosen"] == "float" and decision["requested"] == "auto" and decision["ratio"] == 2.0
    assert decision["float_top1"] is not None and decision["int8_top1"] is not None
    assert ptq["quantized"] is False  # the stage's model is the float one
    run = out / "slow-int8"
    assert_float_shipped(run)

    # precision int8 (the default) on the same times: the verdict again, and INT8 ships
    stdout, ptq = _run({**SLOW_INT8, "stages": FORCED_INT8}, out, fixed_times(2.0, 1.0, calls), capsys)
    assert "00-train: finished earlier, skipped" in stdout
    assert len([line for line in stdout.splitlines() if VERDICT.search(line)]) == 1
    assert (run / "export" / "model.int8.onnx").exists()
    metadata = json.loads((run / "export" / "metadata.json").read_text())
    assert metadata["precision"]["chosen"] == "int8" and metadata["precision"]["requested"] == "int8"

    # INT8 measured faster, an accuracy budget that any top-1 meets: auto ships INT8, and no "slower" line
    faster = [{"ptq": {**FORCED_INT8[0]["ptq"], "ship_precision": "auto", "accuracy_budget": 100.0}}, FORCED_INT8[1]]
    stdout, ptq = _run({**SLOW_INT8, "stages": faster}, out, fixed_times(0.5, 1.0, calls), capsys)
    assert "INT8 is 2.0x faster than float here (ONNX Runtime, batch 1: 0.5 vs 1 ms)" in stdout
    assert not VERDICT.search(stdout) and "precision auto: int8 ships (int8 is 2.00x as fast as float" in stdout
    assert ptq["metrics"]["precision"]["chosen"] == "int8" and ptq["quantized"] is True
    assert (run / "export" / "model.int8.onnx").exists()
    report = (run / "report.md").read_text()
    assert "ship_precision auto shipped the float model" not in report
    # model.onnx is the baseline itself here (no float stage after train): one row for it, not two
    assert report.count("| train | onnx | onnxruntime |") == 1, report


@pytest.mark.slow  # real timing: INT8 must be measured slower than float on a tiny net (noise can say otherwise)
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
    assert_float_shipped(run)

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
    """20 runs of a 50-microsecond model are 1 ms of timing: the block grows to ~0.1 s, within its bounds.
    Each call advances a clock by a chosen time (no measuring)."""
    from edgecv.stages.precision import BLOCK_S, MAX_RUNS, MIN_RUNS, runs_for

    def runs(call_s: float, batch: int = 1, shapes: list | None = None) -> int:
        now = [0.0]

        def runner(x):
            now[0] += call_s
            if shapes is not None:
                shapes.append(x.shape)

        return runs_for(runner, (3, 8, 8), batch, clock=lambda: now[0])

    shapes = []
    assert runs(0.0, 2, shapes) == MAX_RUNS  # a no-op: the most runs
    assert shapes[0] == (2, 3, 8, 8)  # timed at the batch asked for
    assert runs(0.02) == MIN_RUNS  # 20 ms a call: the fewest
    assert MIN_RUNS < runs(2**-11) == 205 < MAX_RUNS  # ~0.5 ms a call (exact in binary): 0.1 s of runs
    assert 205 == math.ceil(BLOCK_S / 2**-11)
