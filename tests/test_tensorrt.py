"""TensorRT build decisions, engine metadata and compatibility checks, and trtexec parsing.

The pure parts run everywhere; building and running a real engine needs TensorRT and a GPU
(`-m tensorrt`, skipped cleanly elsewhere).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgecv.bench.trtexec import parse_trtexec_output
from edgecv.errors import EdgecvError
from edgecv.export.tensorrt import (
    EngineMetadata,
    builder_options,
    check_compatible,
    metadata_path,
    onnx_has_qdq,
    onnx_input,
    parse_version,
    read_metadata,
    write_metadata,
)
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
        ("11.0.0", "int8", ["STRONGLY_TYPED"], [], True),
        ("11.0.0", "fp16", ["STRONGLY_TYPED"], [], True),
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
        assert "FP16 graph" in options["notes"][0]


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
    with pytest.raises(EdgecvError, match="lacks compute_capability"):
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


def test_build_engine_without_tensorrt_is_a_user_error(float_onnx, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from edgecv.export.tensorrt import build_engine

    with pytest.raises(EdgecvError, match="TensorRT's Python bindings"):
        build_engine(float_onnx, tmp_path / "model.engine", precision="fp16")
    assert not (tmp_path / "model.engine").exists()


@pytest.mark.tensorrt
def test_build_and_run_engine_matches_onnxruntime(float_onnx, tmp_path):
    pytest.importorskip("tensorrt")
    from edgecv.bench.runners import create_runner
    from edgecv.export.tensorrt import build_engine

    engine = tmp_path / "model.engine"
    built = build_engine(float_onnx, engine, precision="fp32", max_batch=4, workspace_mb=256)
    assert engine.is_file() and read_metadata(engine) == built
    assert (
        build_engine(float_onnx, engine, precision="fp32", max_batch=4, workspace_mb=256) == built
    )  # reused
    batch = np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)
    trt_logits = create_runner("tensorrt", engine)(batch)
    ort_logits = create_runner("onnxruntime", float_onnx)(batch)
    np.testing.assert_allclose(trt_logits, ort_logits, rtol=1e-2, atol=1e-2)
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
    import edgecv.export.tensorrt as trt_export
    from edgecv.bench.runners import create_runner

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")  # never read: the check comes first
    write_metadata(engine, meta())
    jetson_nano = {"tensorrt_version": "8.2.1", "compute_capability": "5.3", "device_name": "NVIDIA Tegra X1"}
    monkeypatch.setattr(trt_export, "current_device_facts", lambda: jetson_nano)
    with pytest.raises(
        EdgecvError, match="model.engine: engine does not match this device: TensorRT 10.3.0.30"
    ):
        create_runner("tensorrt", engine)
