"""Runners, latency, accuracy, memory and device facts, on a real ResNet-8 and a real ONNX Runtime session."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from edgecv.bench.accuracy import evaluate
from edgecv.bench.latency import LatencyStats, benchmark_blocks, block_order, latency_stats, measure_latency
from edgecv.bench.measure import BenchSettings, Subject, measure
from edgecv.bench.memory import peak_memory_mb
from edgecv.bench.runners import RUNNERS, backend_available, create_runner
from edgecv.device import cpu_model, host_facts, jetpack_for_l4t, jetson_facts, parse_nv_tegra_release
from edgecv.errors import EdgecvError
from edgecv.models import build_model

INPUT_SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("edgecv:resnet8", num_classes=10, in_channels=1, image_size=28)
    # Non-trivial BatchNorm statistics, so eval mode differs from train mode and the test would see it.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "resnet8.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; the project pins it (tests/test_export_onnx.py)
        warnings.simplefilter("ignore", DeprecationWarning)
        export(model, path)
    return path


def export(model, path) -> None:
    torch.onnx.export(
        model,
        (torch.randn(1, *INPUT_SHAPE),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def model_for(backend: str, model, onnx_path):
    return {"torch": model, "onnxruntime": onnx_path}[backend]


CPU_BACKENDS = [b for b in RUNNERS.names() if b != "tensorrt"]  # TensorRT needs a GPU and an engine


def test_registry_lists_every_backend():
    assert {"torch", "onnxruntime", "tensorrt"} <= set(RUNNERS.names())


def test_import_does_not_pull_in_heavy_backends():
    import subprocess
    import sys

    code = "import sys, edgecv.bench, edgecv.report; print('onnxruntime' in sys.modules, 'tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_runner_outputs_logits_and_describes_itself(backend, model, onnx_path):
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    runner = create_runner(backend, model_for(backend, model, onnx_path), threads=1)
    logits = runner(np.zeros((3, *INPUT_SHAPE), dtype=np.float32))
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    info = runner.describe()
    assert info["backend"] == backend == runner.backend
    assert {"device", "threads", "versions", "providers", "file"} <= set(info)
    assert info["threads"] == 1
    if backend == "onnxruntime":
        assert info["providers"] == ["CPUExecutionProvider"]
        assert info["file"] == str(onnx_path)
        assert "onnxruntime" in info["versions"]


def test_torch_and_onnxruntime_agree(model, onnx_path):
    batch = np.random.default_rng(1).standard_normal((4, *INPUT_SHAPE), dtype=np.float32)
    torch_logits = create_runner("torch", model)(batch)
    ort_logits = create_runner("onnxruntime", onnx_path, threads=1)(batch)
    np.testing.assert_allclose(ort_logits, torch_logits, rtol=1e-4, atol=1e-4)
    assert (ort_logits.argmax(1) == torch_logits.argmax(1)).all()


def test_wrong_files_are_user_errors(tmp_path, model, onnx_path):
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    with pytest.raises(EdgecvError, match="model.pt"):
        create_runner("onnxruntime", checkpoint)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(EdgecvError, match="corrupt.onnx.*onnxruntime cannot load"):
        create_runner("onnxruntime", corrupt)
    with pytest.raises(EdgecvError, match="not found: .*missing.onnx"):
        create_runner("onnxruntime", tmp_path / "missing.onnx")
    with pytest.raises(EdgecvError, match="resnet8.onnx"):
        create_runner("torch", onnx_path)
    with pytest.raises(EdgecvError, match="resnet8.onnx.*TensorRT engine"):
        create_runner("tensorrt", onnx_path)
    with pytest.raises(EdgecvError, match="did you mean 'onnxruntime'"):
        create_runner("onnxrutime", onnx_path)
    with pytest.raises(EdgecvError, match="NCHW"):
        create_runner("onnxruntime", onnx_path)(np.zeros((28, 28), dtype=np.float32))


def test_latency_stats_are_ordered_and_throughput_is_batch_over_median(onnx_path):
    runner = create_runner("onnxruntime", onnx_path, threads=1)
    stats = measure_latency(runner, INPUT_SHAPE, batch_sizes=[1, 4], warmup=2, runs=15)
    assert list(stats) == [1, 4]
    for bs, s in stats.items():
        assert isinstance(s, LatencyStats)
        assert s.batch_size == bs and s.runs == 15
        assert 0 < s.min_ms <= s.p50_ms <= s.p90_ms <= s.p99_ms
        assert s.min_ms <= s.mean_ms
        assert s.throughput_ips == pytest.approx(bs / (s.p50_ms / 1000))


def test_latency_stats_of_known_times():
    s = latency_stats(8, [float(v) for v in range(1, 101)])
    assert (s.min_ms, s.p50_ms, s.mean_ms, s.runs) == (1.0, 50.5, 50.5, 100)
    assert s.p90_ms == pytest.approx(90.1) and s.p99_ms == pytest.approx(99.01)
    assert s.throughput_ips == pytest.approx(8 / 0.0505)
    with pytest.raises(EdgecvError):
        latency_stats(1, [])


def test_latency_rejects_bad_arguments(onnx_path):
    runner = create_runner("onnxruntime", onnx_path, threads=1)
    for kwargs in ({"batch_sizes": [0]}, {"batch_sizes": []}, {"batch_sizes": [1], "runs": 0}):
        with pytest.raises(EdgecvError):
            measure_latency(runner, INPUT_SHAPE, **kwargs)
    with pytest.raises(EdgecvError, match="channels, height, width"):
        measure_latency(runner, (28, 28), batch_sizes=[1])


class RecordingRunner:
    """Records which runner ran, so the test can see the order of blocks."""

    def __init__(self, name: str, backend: str, log: list[str]) -> None:
        self.name, self.backend, self.log = name, backend, log

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.log.append(f"{self.name}:{batch.shape[0]}")
        return np.zeros((batch.shape[0], 10), dtype=np.float32)

    def describe(self) -> dict:
        return {"backend": self.backend}


def test_benchmark_blocks_time_runners_in_blocks_torch_last():
    log: list[str] = []
    runners = {
        "eager": RecordingRunner("eager", "torch", log),
        "fp32": RecordingRunner("fp32", "onnxruntime", log),
        "int8": RecordingRunner("int8", "onnxruntime", log),
    }
    ticks: list[int] = []
    results = benchmark_blocks(
        runners, INPUT_SHAPE, [1, 2], warmup=2, runs=3, rounds=2, progress=ticks.append, settle_s=0
    )
    assert block_order(runners) == ["fp32", "int8", "eager"]
    block = 2 + 3  # warm-up + timed calls, never interleaved with another runner
    blocks = [log[i : i + block] for i in range(0, len(log), block)]
    assert all(len(set(b)) == 1 for b in blocks)
    expected_round = ["fp32:1", "fp32:2", "int8:1", "int8:2", "eager:1", "eager:2"]
    assert [b[0] for b in blocks] == expected_round * 2
    assert sum(ticks) == 3 * 2 * 2 * 3  # runs x batch sizes x rounds x runners
    for per_bs in results.values():
        assert list(per_bs) == [1, 2]
        assert all(s.runs == 3 * 2 for s in per_bs.values())


def test_benchmark_blocks_on_real_runners(model, onnx_path):
    runners = {
        "torch": create_runner("torch", model),
        "ort": create_runner("onnxruntime", onnx_path, threads=1),
    }
    results = benchmark_blocks(runners, INPUT_SHAPE, [1], warmup=1, runs=5, rounds=2, settle_s=0)
    for per_bs in results.values():
        s = per_bs[1]
        assert s.runs == 10 and s.min_ms <= s.p50_ms <= s.p99_ms


def test_measure_gives_one_row_per_model_with_every_batch(model, onnx_path):
    """The one measurement API: accuracy (measured or given), memory, and per batch size latency."""
    rng = np.random.default_rng(0)
    val = [(rng.standard_normal((4, *INPUT_SHAPE), dtype=np.float32), np.array([0, 1, 2, 3])) for _ in range(2)]
    subjects = [
        Subject("model.onnx", create_runner("onnxruntime", onnx_path, threads=1), "onnx", stage="export",
                macs=10, params=5, size_bytes=onnx_path.stat().st_size),
        Subject("model.pt", create_runner("torch", model), "torch", stage="train",
                accuracy={"top1": 12.5, "top5": 50.0}, deployable=False, note="for comparison"),
    ]
    rows = measure(subjects, BenchSettings((1, 2), warmup=1, runs=3, rounds=2), INPUT_SHAPE, lambda: val)
    assert [r.model for r in rows] == ["model.onnx", "model.pt"]
    onnx_row, torch_row = rows
    assert onnx_row.backend == "onnxruntime" and torch_row.backend == "torch"
    assert onnx_row.batch_sizes == [1, 2] and all(b.runs == 6 for b in onnx_row.latency)
    assert onnx_row.at(2).throughput_ips == pytest.approx(2000 / onnx_row.at(2).p50_ms)
    expected = evaluate(subjects[0].runner, val)
    assert (onnx_row.top1, onnx_row.top5) == (round(expected["top1"], 3), round(expected["top5"], 3))
    assert (torch_row.top1, torch_row.deployable, torch_row.note) == (12.5, False, "for comparison")
    assert onnx_row.memory_mb is not None and onnx_row.memory_mb >= 0
    assert set(onnx_row.to_dict()) == set(torch_row.to_dict())
    assert onnx_row.at(1).energy_mj_per_image is None  # not a Jetson: not measured, not zero


def test_memory_counts_what_loading_and_running_a_model_takes(onnx_path):
    """A subject given as a loader is built inside `measure`: its memory includes the session and its
    buffers at the largest batch, so a bigger batch needs more."""
    subject = lambda: Subject("m.onnx", None, "onnx", load=lambda: create_runner("onnxruntime", onnx_path))  # noqa: E731
    at = lambda b: BenchSettings((b,), warmup=0, runs=1, rounds=1, accuracy=False)  # noqa: E731
    measure([subject()], at(1), INPUT_SHAPE)  # the first session in a process also loads ONNX Runtime itself
    small = measure([subject()], at(1), INPUT_SHAPE)[0].memory_mb
    big = measure([subject()], at(256), INPUT_SHAPE)[0].memory_mb
    assert small > 0 and big > small + 10, (small, big)  # 256 x 16 x 28 x 28 float activations: 12.8 MiB each


def test_evaluate_counts_known_answers(onnx_path):
    runner = create_runner("onnxruntime", onnx_path, threads=1)
    rng = np.random.default_rng(2)
    images = [rng.standard_normal((8, *INPUT_SHAPE), dtype=np.float32) for _ in range(2)]
    order = [np.argsort(-runner(x), axis=1) for x in images]  # classes by falling logit, per image

    def batches(rank: int):
        return [(x, o[:, rank]) for x, o in zip(images, order, strict=True)]

    assert evaluate(runner, batches(0)) == {"top1": 100.0, "top5": 100.0, "n": 16}
    assert evaluate(runner, batches(3)) == {"top1": 0.0, "top5": 100.0, "n": 16}
    assert evaluate(runner, batches(9)) == {"top1": 0.0, "top5": 0.0, "n": 16}
    # First batch right, second batch at rank 6: half the images in top-1 and in top-5.
    mixed = [(images[0], order[0][:, 0]), (images[1], order[1][:, 6])]
    seen: list[int] = []
    assert evaluate(runner, mixed, progress=seen.append) == {"top1": 50.0, "top5": 50.0, "n": 16}
    assert seen == [1, 1]


def test_evaluate_with_fewer_than_five_classes_and_bad_labels():
    def three_classes(batch: np.ndarray) -> np.ndarray:
        return np.tile(np.array([[3.0, 2.0, 1.0]], dtype=np.float32), (batch.shape[0], 1))

    x = np.zeros((4, *INPUT_SHAPE), dtype=np.float32)
    result = evaluate(three_classes, [(x, np.array([0, 1, 2, 2]))])
    assert result == {"top1": 25.0, "top5": 100.0, "n": 4}
    with pytest.raises(EdgecvError, match="outside the model's 3 classes"):
        evaluate(three_classes, [(x, np.array([0, 1, 2, 7]))])
    with pytest.raises(EdgecvError, match="no images"):
        evaluate(three_classes, [])


def test_peak_memory_sees_a_large_allocation():
    def allocate() -> None:
        block = np.ones(40_000_000, dtype=np.float32)  # 160 MB, touched
        assert block[-1] == 1.0

    grown = peak_memory_mb(allocate)
    assert 120 < grown < 400
    assert peak_memory_mb(lambda: None) < 20


def test_jetson_facts_from_fixture_files(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
        "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n"
    )
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(
        b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00"
    )
    facts = jetson_facts(tmp_path, run=lambda cmd: None)  # nvpmodel / jetson_clocks: tests/test_jetson.py
    assert facts == {
        "model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
        "l4t": "36.4.3",
        "jetpack": "6.2",
        "tensorrt_expected": "10.3",
        "power_mode": None,
        "clocks": None,
    }
    assert jetson_facts(tmp_path / "nothing") is None


@pytest.mark.parametrize(
    ("release", "l4t", "jetpack"),
    [
        ("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64", "32.7.1", "4.6.1"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64", "35.4.1", "5.1.2"),
        ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64", "36.4.0", "6.1"),
        ("# R36 (release), REVISION: 9.9, GCID: 1, BOARD: generic, EABI: aarch64", "36.9.9", "6"),
    ],
)
def test_l4t_to_jetpack(release, l4t, jetpack):
    assert parse_nv_tegra_release(release) == l4t
    assert jetpack_for_l4t(l4t) == jetpack


def test_host_facts_describe_this_machine():
    facts = host_facts()
    assert facts["cores"] >= 1 and facts["python"] and facts["machine"]
    assert facts["versions"]["torch"] and facts["versions"]["onnxruntime"]
    assert facts["jetson"] is None or "l4t" in facts["jetson"]
    assert (
        cpu_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n")
        == "Intel(R) Xeon(R) Platinum 8488C"
    )
