"""An engine is built from a graph TensorRT accepts: the INT8 model rebuilt for target tensorrt with the same
calibrated or trained ranges, written as model.int8.tensorrt.onnx, and file names and metadata that say
which target each INT8 file is for. Everything up to the TensorRT call runs here."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli, without_tensorrt

from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat, quant_spec
from edgecv.compress.quantize.fakequant import FakeQuantize, QuantConv2d, QuantLinear
from edgecv.compress.quantize.retarget import retarget
from edgecv.errors import EdgecvError
from edgecv.export.lint import inspect_onnx
from edgecv.export.onnx import export_onnx
from edgecv.models import EDGECV_MODELS, build_model

MODELS = [f"edgecv:{n}" for n in EDGECV_MODELS.names()] + ["torchvision:resnet18", "torchvision:mobilenet_v2"]


def calibrated(name: str, target: str = "onnxruntime"):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32).eval()
    x = torch.randn(1, 3, 32, 32)
    qmodel = prepare_qat(model, target, x)
    apply_calibrator(qmodel, collect_stats(qmodel, [torch.randn(16, 3, 32, 32) for _ in range(2)]), "max")
    return qmodel, x


def _range(q: FakeQuantize) -> float:
    return float(q.amax.abs().max()) if q.symmetric else float(max(-q.lo.clamp(max=0), q.hi.clamp(min=0)))


@pytest.mark.parametrize("name", MODELS)
def test_retarget_keeps_weights_and_ranges_with_tensorrt_placement(name, tmp_path):
    qmodel, x = calibrated(name)
    trt = retarget(qmodel, "tensorrt", build_model(name, 10, 3, 32), x)
    assert quant_spec(trt).target == "tensorrt" and quant_spec(qmodel).target == "onnxruntime"
    source = dict(qmodel.named_modules())
    for module_name, m in trt.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            assert torch.equal(m.weight, source[module_name].weight)  # trained weights, not the twin's
    source_ranges = {round(_range(q), 6) for _, q in qmodel.named_modules()
                     if isinstance(q, FakeQuantize) and not q.is_weight}
    activations = [q for _, q in trt.named_modules() if isinstance(q, FakeQuantize) and not q.is_weight]
    assert activations and all(q.symmetric and bool(q.enabled) for q in activations)
    assert {round(_range(q), 6) for q in activations} <= source_ranges  # every range is one the source had
    trt_file = export_onnx(trt, tmp_path / "model.int8.tensorrt.onnx", x)
    ort_file = export_onnx(qmodel, tmp_path / "model.int8.onnx", x)
    assert inspect_onnx(trt_file, "tensorrt")["violations"] == []
    assert inspect_onnx(ort_file, "tensorrt")["violations"]  # what TensorRT would have been given before
    xs = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        agreement = (qmodel(xs).argmax(1) == trt(xs).argmax(1)).float().mean().item()
    assert agreement >= 0.9  # the same ranges, symmetric: near-ties of a random net may flip


def test_retarget_to_the_same_target_is_the_model_itself():
    qmodel, x = calibrated("edgecv:resnet8", "tensorrt")
    assert retarget(qmodel, "tensorrt", build_model("edgecv:resnet8", 10, 3, 32), x) is qmodel


def test_a_tensor_without_a_source_range_is_one_line(monkeypatch):
    import edgecv.compress.quantize.retarget as rt

    qmodel, x = calibrated("edgecv:resnet8")
    monkeypatch.setattr(rt, "_quantizer_of", lambda node, modules: None)
    with pytest.raises(EdgecvError, match="cannot rebuild the INT8 model for tensorrt.*quantize with target: tensorrt"):
        rt.retarget(qmodel, "tensorrt", build_model("edgecv:resnet8", 10, 3, 32), x)


def test_int8_file_names_say_their_target():
    from edgecv.stages.export import ExportConfig, engine_source, int8_file_name, other_backends

    qmodel, _ = calibrated("edgecv:resnet8")
    assert int8_file_name("onnxruntime", "onnxruntime") == "model.int8.onnx"
    assert int8_file_name("tensorrt", "onnxruntime") == "model.int8.tensorrt.onnx"
    assert other_backends(qmodel, ExportConfig(build_engine=True)) == ["tensorrt"]
    assert other_backends(qmodel, ExportConfig(backends=["onnxruntime", "tensorrt"])) == ["tensorrt"]
    assert other_backends(qmodel, ExportConfig()) == []
    files = {"model.onnx": {"format": "onnx"}, "model.int8.onnx": {"target": "onnxruntime"},
             "model.int8.tensorrt.onnx": {"target": "tensorrt"}}
    assert engine_source(files) == "model.int8.tensorrt.onnx"  # never the onnxruntime-target graph
    assert engine_source({**files, "model.int8.onnx": {"target": "tensorrt"}}) == "model.int8.tensorrt.onnx"
    assert engine_source({"model.int8.onnx": {"target": "tensorrt"}}) == "model.int8.onnx"
    assert engine_source({"model.onnx": {}}) == "model.onnx"


@pytest.mark.parametrize(
    ("override", "expected"),
    [("stages.export.backends=[tflite]", "unknown quantization target 'tflite'"),
     ("stages.export.engine.build_precision=int4", "build_precision 'int4': choose from auto, fp32, fp16, int8"),
     ("stages.export.engine.dla_core=-1", "dla_core")],
)
def test_engine_options_are_checked_in_the_recipe(tmp_path, override, expected):
    from conftest import TINY, write_recipe

    path = write_recipe(tmp_path / "r.yaml", TINY)
    proc = run_cli("recipes", "validate", str(path), "--set", override, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def run_with_tensorrt_file(finished_run, tmp_path_factory):
    """The finished tiny run, exported again with an INT8 file for TensorRT (earlier stages are reused)."""
    base = tmp_path_factory.mktemp("retarget")
    shutil.copytree(finished_run["run_dir"], base / "runs" / "tiny")
    proc = run_cli("compress", str(finished_run["recipe"]), "--out", str(base / "runs"), "--device", "cpu",
                   "--set", "stages.export.backends=[tensorrt]", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base / "runs" / "tiny", proc


def test_export_writes_an_int8_file_per_target(run_with_tensorrt_file):
    run_dir, proc = run_with_tensorrt_file
    meta = json.loads((run_dir / "export" / "metadata.json").read_text())
    files = meta["files"]
    assert files["model.int8.onnx"]["target"] == "onnxruntime"
    trt = files["model.int8.tensorrt.onnx"]
    assert trt["target"] == "tensorrt" and trt["derived_from"] == "model.int8.onnx" and trt["parity"]["ok"]
    assert 0.9 <= trt["agreement_with_source"] <= 1.0
    assert trt["inspect"]["target"] == "tensorrt" and trt["inspect"]["violations"] == []
    assert meta["engine"] == {"precision": "auto", "workspace_mb": 1024, "timing_cache": None, "dla_core": None,
                              "batch_sizes": [1, 8]}
    report = json.loads((run_dir / "report.json").read_text())
    measured = {r["model"] for r in report["rows"]}
    assert not any(m.endswith("model.int8.tensorrt.onnx") for m in measured)  # TensorRT's own runtime measures it


def test_inspect_the_tensorrt_file(run_with_tensorrt_file):
    run_dir, _ = run_with_tensorrt_file
    trt = run_cli("inspect", str(run_dir / "export" / "model.int8.tensorrt.onnx"), "--target", "tensorrt", timeout=120)
    ort = run_cli("inspect", str(run_dir / "export" / "model.int8.onnx"), "--target", "tensorrt", timeout=120)
    assert trt.returncode == 0 == ort.returncode
    assert "violation" not in trt.stdout and "violation" in ort.stdout


@without_tensorrt
def test_export_tensorrt_walks_up_to_the_tensorrt_call(finished_run, tmp_path):
    """`edgecv export QAT.pt --tensorrt` on an onnxruntime-target checkpoint writes the TensorRT-target
    graph (checked against torch) and stops where TensorRT is needed: exit 2, naming TensorRT."""
    out = tmp_path / "model.int8.onnx"
    proc = run_cli("export", str(finished_run["run_dir"] / "04-qat" / "model.pt"), "--out", str(out), "--tensorrt",
                   timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: TensorRT is not installed here")
    trt_file = tmp_path / "model.int8.tensorrt.onnx"
    assert out.is_file() and trt_file.is_file() and not list(tmp_path.glob("*.engine"))
    assert inspect_onnx(trt_file, "tensorrt")["violations"] == []


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0", "11.4.0.106"])
def test_the_device_build_plan_of_the_exported_file(run_with_tensorrt_file, version):
    """What a Jetson would build from the copied export folder: INT8 from the TensorRT-target graph, with
    the recipe's engine options and a profile covering bench (1, 8) and eval_batch_size (128)."""
    from edgecv.export.trt.build import BuildOptions, engine_path_for, plan_build
    from edgecv.export.trt.options import engine_profile
    from edgecv.model_files import stored_data_section, stored_engine_options

    run_dir, _ = run_with_tensorrt_file
    onnx = run_dir / "export" / "model.int8.tensorrt.onnx"
    stored = stored_engine_options(onnx)
    build = BuildOptions(precision=stored["precision"], workspace_mb=stored["workspace_mb"],
                         batches=engine_profile(stored["batch_sizes"], stored_data_section(onnx)["eval_batch_size"]))
    plan = plan_build(onnx, engine_path_for(onnx), version, build)
    assert plan.options["precision"] == "int8" and plan.options["profile"]["max"][0] == 128
    assert plan.options["profile"]["opt"][0] == 8 and plan.source == onnx
    assert ("--int8" in plan.trtexec) == version.startswith("8")
    assert ("--stronglyTyped" in plan.trtexec) == version.startswith("10")  # 11: always strongly typed
    assert plan.engine_path.name == "model.int8.tensorrt.engine"


@without_tensorrt
def test_bench_an_onnx_file_on_tensorrt_walks_up_to_the_build(run_with_tensorrt_file, tmp_path):
    run_dir, _ = run_with_tensorrt_file
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    proc = run_cli("bench", str(export / "model.int8.tensorrt.onnx"), "--backend", "tensorrt", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: TensorRT is not installed here")
    assert not list(export.glob("*.engine"))


def test_learned_weight_ranges_give_int8_weights_within_127(tmp_path):
    """QAT may learn a weight range below a channel's largest weight; the TensorRT file still holds int8
    weights in [-127, 127] (inspect's rule), one step from what the source rounded them to."""
    from edgecv.compress.quantize import set_learnable_ranges

    qmodel, x = calibrated("edgecv:resnet8")
    set_learnable_ranges(qmodel, True)  # weight ranges become stored values
    with torch.no_grad():
        for m in qmodel.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m.weight_quant.amax.mul_(0.5)  # as if training had narrowed them
    trt = retarget(qmodel, "tensorrt", build_model("edgecv:resnet8", 10, 3, 32), x)
    for m in trt.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            bound = m.weight_quant.amax.reshape(-1, *([1] * (m.weight.dim() - 1)))
            assert (m.weight.abs() <= bound + 1e-6).all()
    report = inspect_onnx(export_onnx(trt, tmp_path / "t.onnx", x), "tensorrt")
    assert report["violations"] == []
    ort = inspect_onnx(export_onnx(qmodel, tmp_path / "o.onnx", x), "tensorrt")
    assert any("outside [-127, 127]" in v for v in ort["violations"])
