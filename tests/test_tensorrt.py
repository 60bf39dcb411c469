"""TensorRT build decisions, engine metadata and compatibility checks, what an engine is fed, and trtexec
parsing.

TensorRT has run on none of this project's machines, so every decision is a plain function tested here,
and every name edgecv calls is checked against the real bindings in tests/test_trt_api.py. Building and
running a real engine needs TensorRT and a GPU (`-m tensorrt`, skipped cleanly elsewhere).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli, without_tensorrt
from onnx import TensorProto, helper

from edgecv.bench.trtexec import parse_trtexec_output
from edgecv.errors import EdgecvError
from edgecv.export.trt.graph import onnx_has_qdq, onnx_input
from edgecv.export.trt.metadata import (
    EngineMetadata,
    check_compatible,
    metadata_path,
    parse_version,
    read_metadata,
    write_metadata,
)
from edgecv.export.trt.options import builder_options
from edgecv.models import build_model

SHAPES = ([1, 3, 224, 224], [1, 3, 224, 224], [8, 3, 224, 224])


def meta(**overrides) -> EngineMetadata:
    fields = {
        "tensorrt_version": "10.3.0.30",
        "compute_capability": "8.7",
        "device_name": "Orin",
        "jetpack": "6.2",
        "l4t": "36.4.3",
        "precision": "int8",
        "onnx_sha256": "ab" * 32,
        "input_name": "input",
        "input_shape_min": [1, 3, 224, 224],
        "input_shape_opt": [1, 3, 224, 224],
        "input_shape_max": [8, 3, 224, 224],
        "built_at": "2025-01-08T01:49:37+00:00",
    }
    fields.update(overrides)
    return EngineMetadata(**fields)


# ------------------------------------------------------------------------------------ builder_options
@pytest.mark.parametrize(
    ("version", "precision", "network_flags", "builder_flags", "strongly_typed"),
    [
        ("8.5.2.2", "int8", ["EXPLICIT_BATCH"], ["INT8"], False),
        ("8.6.2.3", "fp16", ["EXPLICIT_BATCH"], ["FP16"], False),
        ("8.6.2.3", "fp32", ["EXPLICIT_BATCH"], [], False),
        ("10.3.0.30", "int8", ["STRONGLY_TYPED"], [], True),
        ("10.3.0.30", "fp16", [], ["FP16"], False),
        ("10.13.0.35", "fp32", [], [], False),
        ("11.0.0", "int8", [], [], True),  # every network is strongly typed; the flag is deprecated, ignored
        ("11.0.0", "fp16", [], [], True),
    ],
)
def test_builder_options_per_version(version, precision, network_flags, builder_flags, strongly_typed):
    options = builder_options(precision, version, 512, *SHAPES, has_qdq=True)
    assert options["network_flags"] == network_flags
    assert options["builder_flags"] == builder_flags
    assert options["strongly_typed"] is strongly_typed
    assert options["workspace_bytes"] == 512 * 2**20
    assert options["profile"] == {"min": SHAPES[0], "opt": SHAPES[1], "max": SHAPES[2]}
    if version.startswith("11") and precision == "fp16":
        assert "FP16 copy of the graph" in options["notes"][0] and options["needs_fp16_graph"] is True
    else:
        assert options["needs_fp16_graph"] is False


def test_builder_options_never_emit_removed_flags_on_trt11():
    for precision in ("fp32", "fp16", "int8"):
        assert builder_options(precision, "11.2.0", 256, *SHAPES, has_qdq=True)["builder_flags"] == []


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0", "8.6.1"])
def test_int8_without_qdq_is_refused(version):
    with pytest.raises(EdgecvError, match="no QuantizeLinear/DequantizeLinear") as err:
        builder_options("int8", version, 256, *SHAPES, has_qdq=False)
    if not version.startswith("8"):
        assert "deprecated in TensorRT 10 and removed in 11" in str(err.value)
    # fp16 needs no Q/DQ; has_qdq=None means "not known" and is not held against the caller
    builder_options("fp16", version, 256, *SHAPES, has_qdq=False)
    builder_options("int8", version, 256, *SHAPES)


def test_builder_options_reject_bad_arguments():
    with pytest.raises(EdgecvError, match="precision 'int4'.*fp32, fp16, int8"):
        builder_options("int4", "10.3", 256, *SHAPES)
    with pytest.raises(EdgecvError, match="too old.*8.5"):
        builder_options("int8", "8.2.1", 256, *SHAPES)
    with pytest.raises(EdgecvError, match="min <= opt <= max"):
        builder_options("fp16", "10.3", 256, [4, 3, 224, 224], [1, 3, 224, 224], [8, 3, 224, 224])
    with pytest.raises(EdgecvError, match="cannot read TensorRT version"):
        builder_options("fp16", "unknown", 256, *SHAPES)


def test_parse_version():
    assert parse_version("10.3.0.30") == (10, 3, 0, 30)
    assert parse_version("10.13.0.post1") == (10, 13, 0)
    assert parse_version("8.6") == (8, 6)


# ----------------------------------------------------------------------------------- compatibility
def test_check_compatible_accepts_same_device():
    current = {"tensorrt_version": "10.3.0.30", "compute_capability": "8.7", "device_name": "Orin"}
    check_compatible(meta(), current)
    check_compatible(
        meta(), {"tensorrt_version": "10.3.0.26"}
    )  # same major.minor.patch; missing facts skipped


@pytest.mark.parametrize(
    ("current", "message"),
    [
        (
            {"tensorrt_version": "10.7.0.23"},
            "TensorRT 10.3.0.30 built it, this device has TensorRT 10.7.0.23",
        ),
        ({"compute_capability": "7.2"}, "compute capability 8.7 built it, this GPU is 7.2"),
        (
            {"device_name": "NVIDIA GeForce RTX 4090"},
            "built on 'Orin', this device is 'NVIDIA GeForce RTX 4090'",
        ),
    ],
)
def test_check_compatible_names_the_mismatch(current, message, tmp_path):
    engine = tmp_path / "model.engine"
    with pytest.raises(EdgecvError) as err:
        check_compatible(meta(), current, engine)
    text = str(err.value)
    assert message in text and str(engine) in text and "rebuild" in text
    assert "\n" not in text


def test_check_compatible_lists_every_mismatch():
    current = {"tensorrt_version": "8.6.2", "compute_capability": "7.2", "device_name": "Xavier"}
    with pytest.raises(EdgecvError, match="TensorRT.*; compute capability.*; it was built on"):
        check_compatible(meta(), current)


# ---------------------------------------------------------------------------------------- metadata
def test_metadata_round_trip_is_atomic(tmp_path):
    engine = tmp_path / "model.engine"
    written = write_metadata(engine, meta())
    assert written == metadata_path(engine) == tmp_path / "model.engine.json"
    assert read_metadata(engine) == meta()
    assert json.loads(written.read_text())["compute_capability"] == "8.7"
    write_metadata(engine, meta(precision="fp16"))
    assert read_metadata(engine).precision == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine.json"]  # no temporary files left


def test_read_metadata_errors(tmp_path):
    engine = tmp_path / "model.engine"
    with pytest.raises(EdgecvError, match="model.engine.json.*not found"):
        read_metadata(engine)
    metadata_path(engine).write_text("{not json")
    with pytest.raises(EdgecvError, match="cannot read engine metadata"):
        read_metadata(engine)
    metadata_path(engine).write_text(json.dumps({"tensorrt_version": "10.3"}))
    with pytest.raises(EdgecvError, match="lacks precision, onnx_sha256, input_name"):
        read_metadata(engine)


# -------------------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "float.onnx"
    model = build_model("edgecv:resnet8", num_classes=10, in_channels=1, image_size=28).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.randn(1, 1, 28, 28),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )
    return path


def qdq_onnx(path) -> None:
    """x -> QuantizeLinear -> DequantizeLinear -> Relu: the smallest explicitly quantized graph."""
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05])
    zero = helper.make_tensor("zero", TensorProto.INT8, [], [0])
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
            helper.make_node("Relu", ["dq"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 28, 28])],
        initializer=[scale, zero],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_onnx_has_qdq_and_input(float_onnx, tmp_path):
    assert onnx_has_qdq(float_onnx) is False
    assert onnx_input(float_onnx) == ("input", ["batch", 1, 28, 28])
    qdq = tmp_path / "qdq.onnx"
    qdq_onnx(qdq)
    assert onnx_has_qdq(qdq) is True
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 5)
    with pytest.raises(EdgecvError, match="bad.onnx"):
        onnx_has_qdq(bad)


@without_tensorrt
def test_build_engine_without_tensorrt_is_a_user_error(float_onnx, tmp_path):
    from edgecv.export.trt.build import BuildOptions
    pytest.importorskip("onnx")
    from edgecv.export.trt.build import build_engine

    with pytest.raises(EdgecvError, match="TensorRT is not installed here.*TensorRT's Python bindings"):
        build_engine(float_onnx, tmp_path / "model.engine", BuildOptions(precision="fp16"))
    assert not (tmp_path / "model.engine").exists()


@pytest.mark.tensorrt
def test_build_and_run_engine_matches_onnxruntime(float_onnx, tmp_path):
    """On a device: build, reuse, run batches larger than the profile, read back what was built."""
    pytest.importorskip("tensorrt")
    from edgecv.bench.runners import create_runner
    from edgecv.export.trt.build import BuildOptions, build_engine

    engine = tmp_path / "model.engine"
    options = BuildOptions(precision="fp32", batches=(1, 4, 4), workspace_mb=256,
                           timing_cache=str(tmp_path / "timing.cache"))
    built = build_engine(float_onnx, engine, options)
    assert engine.is_file() and read_metadata(engine) == built and (tmp_path / "timing.cache").is_file()
    assert build_engine(float_onnx, engine, options) == built  # reused
    assert built.built_precision["fp32"] == 1.0 and built.compute_capability and built.device_memory_bytes
    batch = np.random.default_rng(0).standard_normal((11, 1, 28, 28), dtype=np.float32)  # > profile max 4
    runner = create_runner("tensorrt", engine)
    trt_logits = runner(batch)
    ort_logits = create_runner("onnxruntime", float_onnx)(batch)
    np.testing.assert_allclose(trt_logits, ort_logits, rtol=1e-2, atol=1e-2)
    assert runner.memory_mb(batch[:4]) > 1.0  # engine + context + buffers: at least a MiB on any GPU
    write_metadata(engine, meta(compute_capability="1.0"))
    with pytest.raises(EdgecvError, match="compute capability 1.0 built it"):
        create_runner("tensorrt", engine)


# ------------------------------------------------------------------------------------------ trtexec
TRT86_LOG = """\
[12/04/2022-02:01:36] [I] Average on 10 runs - GPU latency: 31.0868 ms - Host latency: 41.2747 ms (enqueue 0.151758 ms)
[12/04/2022-02:01:36] [I]
[12/04/2022-02:01:36] [I] === Performance summary ===
[12/04/2022-02:01:36] [I] Throughput: 31.8446 qps
[12/04/2022-02:01:36] [I] Latency: min = 41.1393 ms, max = 41.3042 ms, mean = 41.273 ms, median = 41.2759 ms, percentile(90%) = 41.2895 ms, percentile(95%) = 41.2952 ms, percentile(99%) = 41.3042 ms
[12/04/2022-02:01:36] [I] Enqueue Time: min = 0.120361 ms, max = 0.22583 ms, mean = 0.148609 ms, median = 0.146973 ms, percentile(90%) = 0.173096 ms, percentile(95%) = 0.180908 ms, percentile(99%) = 0.22583 ms
[12/04/2022-02:01:36] [I] H2D Latency: min = 0.00842285 ms, max = 0.0283203 ms, mean = 0.0102436 ms, median = 0.00927734 ms, percentile(90%) = 0.012207 ms, percentile(95%) = 0.0171509 ms, percentile(99%) = 0.0283203 ms
[12/04/2022-02:01:36] [I] GPU Compute Time: min = 30.9525 ms, max = 31.1133 ms, mean = 31.0858 ms, median = 31.0869 ms, percentile(90%) = 31.0991 ms, percentile(95%) = 31.1025 ms, percentile(99%) = 31.1133 ms
[12/04/2022-02:01:36] [I] D2H Latency: min = 10.1565 ms, max = 10.2148 ms, mean = 10.177 ms, median = 10.1768 ms, percentile(90%) = 10.1864 ms, percentile(95%) = 10.1912 ms, percentile(99%) = 10.2148 ms
[12/04/2022-02:01:36] [I] Total Host Walltime: 3.07743 s
[12/04/2022-02:01:36] [I] Total GPU Compute Time: 3.04641 s
[12/04/2022-02:01:36] [I] Explanations of the performance metrics are printed in the verbose logs.
&&&& PASSED TensorRT.trtexec [TensorRT v8602] # trtexec --loadEngine=model.engine
"""

TRT10_LOG = """\
[04/07/2025-23:59:50] [I] === Performance summary ===
[04/07/2025-23:59:50] [I] Throughput: 691.435 qps
[04/07/2025-23:59:50] [I] Latency: min = 1.4209 ms, max = 3.047 ms, mean = 1.48372 ms, median = 1.43823 ms, percentile(90%) = 1.45624 ms, percentile(95%) = 1.71796 ms, percentile(99%) = 2.61597 ms
[04/07/2025-23:59:50] [I] Enqueue Time: min = 0.208801 ms, max = 0.461304 ms, mean = 0.263621 ms, median = 0.259033 ms, percentile(90%) = 0.293823 ms, percentile(95%) = 0.311768 ms, percentile(99%) = 0.402832 ms
[04/07/2025-23:59:50] [I] H2D Latency: min = 0.0258789 ms, max = 0.0687256 ms, mean = 0.0362824 ms, median = 0.0361328 ms, percentile(90%) = 0.0378418 ms, percentile(95%) = 0.0385742 ms, percentile(99%) = 0.0616455 ms
[04/07/2025-23:59:50] [I] GPU Compute Time: min = 1.38855 ms, max = 3.00439 ms, mean = 1.44357 ms, median = 1.39819 ms, percentile(90%) = 1.41504 ms, percentile(95%) = 1.67773 ms, percentile(99%) = 2.57617 ms
[04/07/2025-23:59:50] [I] D2H Latency: min = 0.00341797 ms, max = 0.0107422 ms, mean = 0.00408 ms, median = 0.00390625 ms, percentile(90%) = 0.00463867 ms, percentile(95%) = 0.00488281 ms, percentile(99%) = 0.00683594 ms
[04/07/2025-23:59:50] [I] Total Host Walltime: 3.00535 s
[04/07/2025-23:59:50] [I] Total GPU Compute Time: 2.99797 s
&&&& PASSED TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=model.int8.onnx --saveEngine=model.engine
"""


def test_parse_trtexec_86():
    result = parse_trtexec_output(TRT86_LOG)
    assert result["throughput_qps"] == pytest.approx(31.8446)
    assert result["latency"] == pytest.approx(
        {
            "min": 41.1393,
            "max": 41.3042,
            "mean": 41.273,
            "median": 41.2759,
            "p90": 41.2895,
            "p95": 41.2952,
            "p99": 41.3042,
        }
    )
    assert result["gpu_compute"]["median"] == pytest.approx(31.0869)
    assert result["h2d"]["p99"] == pytest.approx(0.0283203)
    assert result["d2h"]["mean"] == pytest.approx(10.177)
    assert result["enqueue"]["min"] == pytest.approx(0.120361)
    assert result["total_host_walltime_s"] == pytest.approx(3.07743)
    assert result["total_gpu_compute_s"] == pytest.approx(3.04641)


def test_parse_trtexec_10_without_log_prefix_and_last_summary_wins():
    plain = "\n".join(line.split("[I] ", 1)[-1] for line in TRT10_LOG.splitlines())
    for text in (TRT10_LOG, plain, TRT86_LOG + TRT10_LOG):
        result = parse_trtexec_output(text)
        assert result["throughput_qps"] == pytest.approx(691.435)
        assert result["latency"]["median"] == pytest.approx(1.43823)
        assert result["latency"]["p90"] == pytest.approx(1.45624)
        assert result["gpu_compute"]["p99"] == pytest.approx(2.57617)


def test_parse_trtexec_converts_microseconds():
    text = "Throughput: 1000 qps\nLatency: min = 800 us, max = 1.2 ms, mean = 950 us, median = 940 us\n"
    result = parse_trtexec_output(text)
    assert result["latency"] == pytest.approx({"min": 0.8, "max": 1.2, "mean": 0.95, "median": 0.94})


@pytest.mark.parametrize(
    "text",
    ["", "garbage\nnothing to see", "Throughput: 12.0 qps\n", TRT10_LOG.replace("Throughput", "Speed")],
)
def test_parse_trtexec_rejects_garbage(text):
    with pytest.raises(EdgecvError, match="not trtexec output"):
        parse_trtexec_output(text)


def test_runner_checks_metadata_before_loading_the_engine(tmp_path, monkeypatch):
    import edgecv.export.trt.metadata as trt_meta
    from edgecv.bench.runners import create_runner

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")  # never read: the check comes first
    write_metadata(engine, meta())
    jetson_nano = {"tensorrt_version": "8.2.1", "compute_capability": "5.3", "device_name": "NVIDIA Tegra X1"}
    monkeypatch.setattr(trt_meta, "current_device_facts", lambda: jetson_nano)
    with pytest.raises(
        EdgecvError, match="model.engine: engine does not match this device: TensorRT 10.3.0.30"
    ):
        create_runner("tensorrt", engine)


# ----------------------------------------------------------- defect 1: batches beyond the engine's profile
@pytest.mark.parametrize(("n", "lo", "hi"), [(500, 1, 64), (256, 1, 8), (7, 1, 8), (1, 1, 1), (10, 4, 4), (3, 8, 8)])
def test_any_batch_runs_in_calls_the_profile_allows(n, lo, hi):
    from edgecv.bench.runners import engine_batches

    batch = np.arange(n * 2 * 3 * 3, dtype=np.float32).reshape(n, 2, 3, 3)
    parts = engine_batches(batch, "float32", lo, hi)
    assert all(lo <= len(part) <= hi for part, _ in parts)  # every call inside the profile
    kept = np.concatenate([part[:keep] for part, keep in parts])
    np.testing.assert_array_equal(kept, batch)  # every image once, in order; padding dropped


def test_profile_covers_bench_and_validation_batches():
    """What edgecv runs on an engine it builds: bench batches and data.eval_batch_size (quick start: 500)."""
    from edgecv.export.trt.options import engine_profile
    from edgecv.recipe import load_recipe
    from edgecv.stages.export import EngineConfig, build_options

    assert engine_profile([1, 8]) == (1, 8, 8)
    assert engine_profile([1, 64], 500) == (1, 64, 500)
    assert engine_profile([8, 1, 32], 16) == (1, 32, 32)
    for name in ("quickstart",):
        recipe = load_recipe(name)
        lo, _, hi = build_options(EngineConfig(), recipe.bench.batch_sizes, recipe.data.eval_batch_size).batches
        assert lo == 1 and hi >= max(*recipe.bench.batch_sizes, recipe.data.eval_batch_size)


# ----------------------------------------------------------- defect 6: the engine's own input dtype
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint8"])
def test_input_is_sent_in_the_engines_dtype(dtype):
    from edgecv.bench.runners import engine_batches

    batch = np.full((3, 1, 4, 4), 7.0, dtype=np.float32)
    (part, keep), = engine_batches(batch, dtype, 1, 8)
    assert part.dtype == np.dtype(dtype) and part.flags.c_contiguous and keep == 3
    assert (part == 7).all()


# ----------------------------------------------------------- defect 3: what was built, not what was asked
INSPECTOR_JSON = json.dumps({"Layers": [
    {"Name": "Reformatting CopyNode for Input Tensor 0 to conv1", "LayerType": "Reformat",
     "Inputs": [{"Name": "input", "Format/Datatype": "Row major linear FP32"}],
     "Outputs": [{"Name": "r", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}]},
    {"Name": "conv1 + relu", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "r", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}],
     "Outputs": [{"Name": "a", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}],
     "Weights": {"Type": "Int8", "Count": 4608}, "Bias": {"Type": "Float", "Count": 32}},
    {"Name": "conv2 + add + relu", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "a", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}],
     "Outputs": [{"Name": "b", "Format/Datatype": "Row major linear FP32"}], "Weights": {"Type": "Int8"}},
    {"Name": "pool", "LayerType": "CaskPooling",
     "Inputs": [{"Name": "b", "Format/Datatype": "Channel major FP16 format where channel % 4 == 0"}],
     "Outputs": [{"Name": "c", "Format/Datatype": "Channel major FP16 format where channel % 4 == 0"}]},
    {"Name": "fc", "LayerType": "CaskGemmConvolution",
     "Inputs": [{"Name": "c", "Format/Datatype": "Float"}], "Outputs": [{"Name": "logits", "Format/Datatype": "Float"}],
     "Weights": {"Type": "Float"}},
    {"Name": "shape", "LayerType": "Shape"},
], "Bindings": ["input", "logits"]})


def test_layer_precisions_from_the_engine_inspector():
    from edgecv.export.trt.engine import format_precisions, layer_precisions

    shares = layer_precisions(INSPECTOR_JSON)
    assert shares == {"layers": 4, "int8": 0.5, "fp16": 0.25, "fp32": 0.25}  # reformat and shape not counted
    assert format_precisions(shares) == "4 layers: INT8 50%, FP16 25%, FP32 25%"
    names_only = json.dumps({"Layers": ["conv1 + relu", "fc"], "Bindings": ["input", "logits"]})
    assert layer_precisions(names_only) is None and format_precisions(None) == "layer precisions unknown"
    assert layer_precisions("not json") is None


@pytest.fixture(scope="module")
def qdq_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qdq") / "qdq.onnx"
    qdq_onnx(path)
    return path


@pytest.mark.parametrize(
    ("version", "precision", "fp16_source", "flags"),
    [("11.4.0.106", "fp16", True, []), ("10.3.0", "fp16", False, ["--fp16"]),
     ("10.13.3.9", "auto", False, ["--fp16"]), ("8.6.1", "fp32", False, [])],
)
def test_fp16_on_tensorrt_11_builds_from_an_fp16_graph(float_onnx, tmp_path, version, precision, fp16_source, flags):
    from edgecv.export.trt.build import BuildOptions, plan_build

    engine = tmp_path / "model.engine"
    plan = plan_build(float_onnx, engine, version, BuildOptions(precision=precision, batches=(1, 8, 256)))
    assert plan.source.name == ("float.fp16.onnx" if fp16_source else "float.onnx")
    assert plan.options["precision"] == ("fp16" if precision == "auto" else precision)
    assert [f for f in ("--stronglyTyped", "--fp16", "--int8") if f in plan.trtexec.split()] == flags
    assert "--minShapes=input:1x1x28x28" in plan.trtexec and "--maxShapes=input:256x1x28x28" in plan.trtexec
    assert f"--onnx={plan.source}" in plan.trtexec and f"--saveEngine={engine}" in plan.trtexec


def test_int8_plan_from_a_qdq_graph_and_dla(qdq_path, tmp_path):
    from edgecv.export.trt.build import BuildOptions, plan_build

    plan = plan_build(qdq_path, tmp_path / "m.engine", "8.6.1", BuildOptions(batches=(1, 8, 8), dla_core=1))
    assert plan.options["precision"] == "int8" and plan.options["builder_flags"] == ["INT8", "GPU_FALLBACK"]
    assert "--int8" in plan.trtexec and "--useDLACore=1 --allowGPUFallback" in plan.trtexec
    on_jetpack6 = plan_build(qdq_path, tmp_path / "m.engine", "10.3.0", BuildOptions(batches=(1, 8, 8), dla_core=0))
    assert on_jetpack6.options["builder_flags"] == ["INT8", "GPU_FALLBACK"]  # weakly typed, as DLA builds are
    assert on_jetpack6.options["network_flags"] == [] and "--stronglyTyped" not in on_jetpack6.trtexec
    on_jetpack72 = plan_build(qdq_path, tmp_path / "m.engine", "11.4.1", BuildOptions(batches=(1, 8, 8), dla_core=0))
    assert on_jetpack72.options["builder_flags"] == ["GPU_FALLBACK"] and on_jetpack72.options["strongly_typed"]
    with pytest.raises(EdgecvError, match="DLA runs INT8 and FP16 layers only"):
        plan_build(qdq_path, tmp_path / "m.engine", "10.3.0", BuildOptions(precision="fp32", dla_core=0))
    for no_dla in ("10.13.3.9", "11.4.0.106"):
        with pytest.raises(EdgecvError, match=f"TensorRT {no_dla} does not drive the DLA"):
            plan_build(qdq_path, tmp_path / "m.engine", no_dla, BuildOptions(dla_core=0))
    from edgecv.export.trt.options import check_dla_core

    check_dla_core(1, 2)
    with pytest.raises(EdgecvError, match="dla_core 0: this device has no DLA"):
        check_dla_core(0, 0)


def test_fp16_graph_runs_and_agrees_with_the_float_graph(float_onnx, tmp_path):
    """The FP16 copy TensorRT 11 builds from: float16 weights, float32 inputs and outputs, same logits."""
    from edgecv.bench.runners import create_runner
    from edgecv.export.trt.graph import onnx_is_fp16, write_fp16_onnx

    fp16 = write_fp16_onnx(float_onnx, tmp_path / "float.fp16.onnx")
    assert onnx_is_fp16(fp16) and not onnx_is_fp16(float_onnx)
    batch = np.random.default_rng(0).standard_normal((8, 1, 28, 28), dtype=np.float32)
    full = create_runner("onnxruntime", float_onnx, threads=1)(batch)
    half = create_runner("onnxruntime", fp16, threads=1)(batch)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=2e-2 * np.abs(full).max())
    assert (half.argmax(1) == full.argmax(1)).mean() >= 0.75  # random weights: near-ties can flip


def test_fp16_conversion_refuses_a_qdq_graph(qdq_path):
    from edgecv.export.trt.graph import write_fp16_onnx

    with pytest.raises(EdgecvError, match="INT8 \\(Q/DQ\\) graph is not converted"):
        write_fp16_onnx(qdq_path)


# ----------------------------------------------------------- defect 4: never refuse on a fact unknown at build
@pytest.mark.parametrize("unknown", [None, "unknown", ""])
def test_fields_unknown_at_build_time_are_never_held_against_the_engine(unknown):
    here = {"tensorrt_version": "10.3.0.30", "compute_capability": "8.7", "device_name": "Orin"}
    check_compatible(meta(compute_capability=unknown, device_name=unknown), here)
    with pytest.raises(EdgecvError, match="TensorRT 10.3.0.30 built it, this device has TensorRT 10.7"):
        check_compatible(meta(compute_capability=unknown), {**here, "tensorrt_version": "10.7.0"})


def test_metadata_of_a_build_keeps_unknown_facts_unknown(float_onnx, tmp_path):
    from edgecv.export.trt.build import BuildOptions, engine_metadata, plan_build

    engine = tmp_path / "model.engine"
    plan = plan_build(float_onnx, engine, "10.3.0", BuildOptions(precision="fp16"))
    built = engine_metadata(plan, {"tensorrt_version": "10.3.0"}, None, None, ["w1", "w1", "w2"])
    assert built.compute_capability is None and built.device_name is None  # not the string "unknown"
    assert built.builder_warnings == ["w1", "w2"] and built.trtexec == plan.trtexec
    write_metadata(engine, built)
    assert read_metadata(engine) == built
    check_compatible(read_metadata(engine), {"tensorrt_version": "10.3.0.30", "compute_capability": "8.7",
                                             "device_name": "Orin"})


def test_device_facts_come_from_the_cuda_runtime_without_torch(tmp_path):
    """current_device_facts() reads CUDA device 0 through cuda-python (None here: no GPU), never torch."""
    import subprocess
    import sys

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    code = ("from edgecv.export.trt.metadata import current_device_facts\nimport sys\n"
            "f = current_device_facts()\nprint(f['compute_capability'], f['device_name'], 'torch' in sys.modules "
            "and sys.modules['torch'] is not None)")
    import os

    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None", "False"]


# ----------------------------------------------------------- defect 5: device memory measured, or "-"
def test_cuda_memory_is_the_drop_in_free_memory():
    from edgecv.bench.runners import cuda_memory_mb

    assert cuda_memory_mb(1000 * 2**20, 900 * 2**20) == 100.0
    assert cuda_memory_mb(1000 * 2**20, 1000 * 2**20) == 0.0
    assert cuda_memory_mb(None, 900 * 2**20) is None and cuda_memory_mb(1000, None) is None
    assert cuda_memory_mb(900 * 2**20, 1000 * 2**20) is None  # memory freed meanwhile: nothing measured


def test_free_memory_is_read_from_the_cuda_runtime_or_unknown():
    """With the installed cuda-bindings (no GPU here) the real cudaMemGetInfo fails: unknown, not 0."""
    from edgecv.bench.runners import TensorRTRunner, free_cuda_memory
    from edgecv.device import cuda_runtime

    runtime = cuda_runtime()
    if runtime is None:
        pytest.skip("cuda-python is not installed")
    assert free_cuda_memory(runtime) is None
    assert callable(getattr(TensorRTRunner, "memory_mb", None))  # measure() uses it, not CPU RSS


def test_a_gpu_runner_without_a_measurement_shows_a_dash():
    from edgecv.bench.measure import BenchSettings, Subject, measure
    from edgecv.report.cells import format_value

    class EngineLike:
        backend = "tensorrt"

        def __call__(self, batch):
            return np.zeros((len(batch), 3), dtype=np.float32)

        def memory_mb(self, batch):
            return None  # cudaMemGetInfo failed

        def describe(self):
            return {"device": "Orin"}

    row = measure([Subject("m.engine", EngineLike(), "engine")], BenchSettings((1,), 0, 2, 1, accuracy=False),
                  (1, 4, 4))[0]
    assert row.memory_mb is None and format_value("memory_mb", row.memory_mb) == "-"


# ----------------------------------------------------------- defect 9: int(stream) deprecated in cuda-bindings 13
def test_stream_handle_without_int_on_cuda_bindings():
    import warnings as w

    from edgecv.bench.runners import native_handle
    from edgecv.device import cuda_runtime

    runtime = cuda_runtime()
    if runtime is None or not hasattr(runtime, "cudaStream_t"):
        pytest.skip("cuda-python (cuda.bindings) is not installed")
    with w.catch_warnings():
        w.simplefilter("error")
        assert native_handle(runtime.cudaStream_t(1234)) == 1234
    assert native_handle(5678) == 5678  # a plain integer stays what it is


def test_cuda_errors_are_one_line_with_their_name():
    from edgecv.bench.runners import _check_cuda
    from edgecv.device import cuda_runtime

    runtime = cuda_runtime()
    if runtime is None:
        pytest.skip("cuda-python is not installed")
    result = runtime.cudaMalloc(16)  # a real call: no driver here
    with pytest.raises(EdgecvError, match=r"CUDA error in cudaMalloc: cudaError\w+ \(\d+\)"):
        _check_cuda(result, "cudaMalloc")


# ----------------------------------------------------------- defect 7: engines without edgecv metadata
@without_tensorrt
def test_engine_without_metadata_needs_tensorrt_not_metadata(tmp_path):
    from edgecv.model_files import model_input_shape

    engine = tmp_path / "trtexec.engine"
    engine.write_bytes(b"serialized by trtexec")
    with pytest.raises(EdgecvError, match="TensorRT is not installed here") as err:
        model_input_shape(engine)
    assert "metadata" not in str(err.value)


@without_tensorrt
@pytest.mark.parametrize("with_metadata", [False, True])
def test_bench_an_engine_here_exits_2_naming_tensorrt(tmp_path, with_metadata):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized by trtexec")
    if with_metadata:
        write_metadata(engine, meta(input_shape_opt=[1, 1, 28, 28]))
    proc = run_cli("bench", str(engine), "--no-accuracy", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: TensorRT is not installed here") and "Traceback" not in proc.stderr


# ----------------------------------------------------------- trtexec logs as bench rows
TRT10_FULL_LOG = (
    "[04/07/2025-23:59:40] [I] === Device Information ===\n"
    "[04/07/2025-23:59:40] [I] Selected Device: Orin\n"
    "[04/07/2025-23:59:47] [I] Input binding for input with dimensions 8x3x224x224 is created.\n"
    "[04/07/2025-23:59:50] [I] Timing trace has 2077 queries over 3.0039 s\n" + TRT10_LOG
)


def test_trtexec_log_as_a_bench_row():
    from edgecv.bench.trtexec import trtexec_row

    row = trtexec_row(TRT10_FULL_LOG, name="resnet18.log")
    (b,) = row.latency
    assert (row.model, row.backend, row.format, row.device) == ("resnet18.log", "trtexec", "engine", "Orin")
    assert (b.batch_size, b.runs) == (8, 2077)
    assert (b.p50_ms, b.p90_ms, b.p99_ms) == pytest.approx((1.43823, 1.45624, 2.61597))
    assert b.throughput_ips == pytest.approx(691.435 * 8)  # queries/s x images per query
    assert "GPU compute median 1.398 ms, p99 2.576 ms" in row.note
    (old,) = trtexec_row(TRT86_LOG).latency
    assert old.batch_size == 1 and old.throughput_ips == pytest.approx(31.8446)


def test_bench_trtexec_log_cli(tmp_path):
    log = tmp_path / "trtexec.log"
    log.write_text(TRT10_FULL_LOG)
    proc = run_cli("bench", "--trtexec-log", str(log), "--json", str(tmp_path / "b.json"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trtexec.log" in proc.stdout and "1.438" in proc.stdout and "5,531.5" in proc.stdout
    assert "GPU compute median 1.398 ms, p99 2.576 ms" in proc.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[0]["backend"] == "trtexec" and rows[0]["latency"][0]["p99_ms"] == pytest.approx(2.61597)
    log.write_text("nothing here")
    bad = run_cli("bench", "--trtexec-log", str(log), timeout=120)
    assert bad.returncode == 2 and "trtexec.log" in bad.stderr and "not trtexec output" in bad.stderr
