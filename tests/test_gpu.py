"""CUDA paths (run by tools/gpu_check.sh on a GPU machine; skipped elsewhere): AMP, channels_last, NCCL
collectives, DDP training on the GPUs, GPU JPEG decoding, and benchmarking on CUDA."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tiny_fit(cfg_kwargs: dict, tmp_path=None):
    from nets import no_batchnorm

    from edgecv.data.config import DataConfig
    from edgecv.data.datasets import build_data
    from edgecv.train.config import TrainConfig
    from edgecv.train.loop import fit

    data = build_data(DataConfig(dataset="synthetic", image_size=16, num_classes=4, train_size=256, val_size=64,
                                 batch_size=32, augment=False))
    torch.manual_seed(0)
    model = no_batchnorm(4)
    cfg = TrainConfig(epochs=2, lr=0.05, schedule="constant", **cfg_kwargs)
    result = fit(model, data.train, data.val, cfg, device="cuda", log_path=(tmp_path / "log.jsonl") if tmp_path else None)
    return model, result


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_trains_on_cuda(dtype, tmp_path):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    model, result = _tiny_fit({"amp": True, "amp_dtype": dtype}, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["amp"] == ("bfloat16" if dtype == "bfloat16" else "float16 + scaler")
    epochs = [e for e in log if e["event"] == "epoch"]
    assert all(e["gpu_mem_mb"] > 0 and e["images_per_s"] > 0 for e in epochs)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] + 0.5 and result["top1"] > 25
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_channels_last_on_cuda_matches_the_default_layout():
    plain, _ = _tiny_fit({"amp": False})
    nhwc, _ = _tiny_fit({"amp": False, "channels_last": True})
    assert nhwc[0].weight.is_contiguous(memory_format=torch.channels_last)
    diff = max(float((a - b).abs().max()) for a, b in zip(plain.state_dict().values(), nhwc.state_dict().values(),
                                                             strict=True))
    assert diff < 1e-3


def _results(out, world):
    return [json.loads((out / f"nccl_collectives-rank{r}.json").read_text()) for r in range(world)]


def test_nccl_collectives_on_one_gpu(tmp_path):
    """Every collective through NCCL (a one-process group): a CPU tensor would fail here."""
    from torchrun import ROOT, torchrun

    run = torchrun(1, str(ROOT / "tests" / "dist_worker.py"), "nccl_collectives", str(tmp_path), timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    (r,) = _results(tmp_path, 1)
    assert r["backend"] == "nccl" and r["sum"] == [0.0, 1.0] and r["broadcast"] == {"from": 0}
    assert r["gathered"] == [["rank0"]]


def test_nccl_collectives_on_two_processes(tmp_path):
    """Two ranks: on two GPUs, or on one GPU where NCCL allows it (it usually refuses two ranks on one
    device: 'Duplicate GPU detected'; then this is skipped and says so)."""
    from torchrun import ROOT, torchrun

    run = torchrun(2, str(ROOT / "tests" / "dist_worker.py"), "nccl_collectives", str(tmp_path), timeout=180)
    if run.returncode != 0 and torch.cuda.device_count() == 1 and "Duplicate GPU" in run.stderr + run.stdout:
        pytest.skip("NCCL refuses two ranks on one GPU (Duplicate GPU detected); needs 2 GPUs")
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = _results(tmp_path, 2)
    assert all(r["sum"] == [1.0, 2.0] and r["weights"] == ranks[0]["weights"] for r in ranks)


def test_torchrun_trains_on_every_gpu(tmp_path):
    """edgecv train under torchrun with one process per GPU: NCCL, SyncBatchNorm (with 2+ GPUs), AMP."""
    from conftest import TINY, write_recipe
    from torchrun import torchrun

    recipe = {**TINY, "name": "gpus", "stages": [], "train": {**TINY["train"], "epochs": 1, "amp": True}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    world = torch.cuda.device_count()
    run = torchrun(world, "-m", "edgecv", "train", str(path), "--out", str(tmp_path / "runs"), "--device", "cuda",
                   timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"train: {world} process(es)" in run.stdout
    assert (tmp_path / "runs" / "gpus" / "00-train" / "model.pt").is_file()


def test_gpu_jpeg_decoding_matches_the_cpu(tmp_path):
    from image_files import make_image_folder, truncate

    from edgecv.data.config import DataConfig
    from edgecv.data.datasets import build_data

    root = make_image_folder(tmp_path / "img", per_class=3, size=(30, 36))
    bad = truncate(root / "val" / "dog" / "dog_1.JPEG", keep=0.3)
    cfg = DataConfig(dataset="imagefolder", image_size=16, batch_size=4, eval_batch_size=4, gpu_decode=True)
    on_gpu = build_data(cfg, str(root), device="cuda")
    on_cpu = build_data(cfg, str(root), device="cpu")
    xs_gpu = torch.cat([x for x, _ in on_gpu.val])
    xs_cpu = torch.cat([x for x, _ in on_cpu.val])
    assert xs_gpu.is_cuda and xs_gpu.shape == xs_cpu.shape
    assert float((xs_gpu.cpu() - xs_cpu).abs().mean()) < 0.05
    assert [p for p, _ in on_gpu.val.take_skipped()] == [str(bad)]


def test_bench_measures_on_cuda():
    from edgecv.bench.measure import BenchSettings, Subject, measure
    from edgecv.bench.runners import create_runner
    from edgecv.models import build_model

    model = build_model("edgecv:resnet8", 4, 3, 32, width=8).eval()
    subject = Subject("resnet8", create_runner("torch", model, device="cuda"), "torch")
    (row,) = measure([subject], BenchSettings(batch_sizes=(1, 8), warmup=2, runs=5, rounds=1, accuracy=False),
                     (3, 32, 32))
    assert [b.batch_size for b in row.latency] == [1, 8]
    assert all(b.p50_ms > 0 for b in row.latency) and row.memory_mb is not None
