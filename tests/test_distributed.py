"""torchrun / DDP: collectives on the device their backend needs, equal step counts on every rank,
calibration shared by rank 0, and multi-process training that matches one process and resumes."""

from __future__ import annotations

import inspect

import pytest
import torch

import edgecv.train.distributed as D


class _Recorded(Exception):
    """Raised by a fake torch.distributed op once it has seen what it was given."""


@pytest.mark.parametrize(
    "backend, gpu, expected",
    [("nccl", 0, "cuda:0"), ("nccl", 3, "cuda:3"), ("gloo", 2, "cpu"), ("mpi", 0, "cpu")],
)
def test_the_backend_decides_where_collective_tensors_live(backend, gpu, expected):
    """NCCL takes only CUDA tensors of the process's own GPU; gloo and MPI take CPU tensors."""
    assert D.collective_device(backend, gpu) == expected


def _collective_calls() -> dict:
    return {
        "all_reduce_sum": lambda info: D.all_reduce_sum([1.0, 2.0], info),
        "all_reduce_mean": lambda info: D.all_reduce_mean(1.0, info),
        "broadcast_object": lambda info: D.broadcast_object({"a": 1}, info),
        "gather_objects": lambda info: D.gather_objects(["x"], info),
        "broadcast_module_state": lambda info: D.broadcast_module_state(torch.nn.Linear(2, 2), info),
        "barrier": lambda info: D.barrier(info),
    }


def test_every_collective_is_checked_here():
    """A new function that takes a DistInfo is a collective: it must be added to the device test below."""
    takes_info = {name for name, fn in inspect.getmembers(D, inspect.isfunction)
                  if fn.__module__ == D.__name__ and not name.startswith("_")
                  and any(p.annotation in ("DistInfo", D.DistInfo) for p in inspect.signature(fn).parameters.values())}
    assert takes_info == set(_collective_calls())


@pytest.mark.parametrize("name", sorted(_collective_calls()))
def test_every_collective_uses_the_backends_device(name, monkeypatch):
    """Run each collective as if under NCCL: what reaches torch.distributed is on the process's device.
    The tensors live on the 'meta' device here (this machine has no GPU); a CPU tensor is the bug."""
    seen: list = []

    def tensor_op(tensor, *args, **kwargs):
        seen.append(str(tensor.device))
        raise _Recorded

    def object_op(objects, *args, device=None, **kwargs):
        seen.append(str(device))
        raise _Recorded

    def barrier(*args, device_ids=None, **kwargs):
        seen.append(f"cuda:{device_ids[0]}" if device_ids else "no device")
        raise _Recorded

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", tensor_op)
    monkeypatch.setattr(torch.distributed, "broadcast", tensor_op)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", object_op)
    monkeypatch.setattr(torch.distributed, "barrier", barrier)
    device = "cuda:1" if name == "barrier" else "meta"
    info = D.DistInfo(rank=0, world_size=2, local_rank=1, backend="nccl", device=device)
    with pytest.raises(_Recorded):
        _collective_calls()[name](info)
    assert seen == [device]


def test_one_process_needs_no_process_group():
    info = D.DistInfo()
    assert D.all_reduce_mean(2.5, info) == 2.5 and D.broadcast_object({"a": 1}, info) == {"a": 1}
    assert D.gather_objects(["x"], info) == [["x"]]


def _rank_results(out, check: str, world: int) -> list[dict]:
    import json

    return [json.loads((out / f"{check}-rank{r}.json").read_text()) for r in range(world)]


def test_collectives_on_three_gloo_processes(tmp_path):
    from torchrun import ROOT, torchrun

    run = torchrun(3, str(ROOT / "tests" / "dist_worker.py"), "collectives", str(tmp_path), timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = _rank_results(tmp_path, "collectives", 3)
    assert [r["backend"] for r in ranks] == ["gloo"] * 3
    for r in ranks:
        assert r["sum"] == [0.0 + 1.0 + 2.0, 3.0] and r["mean"] == pytest.approx(1.0)
        assert r["broadcast"] == {"from": 0}
        assert r["weights"] == ranks[0]["weights"] and r["running_mean"] == [0.0, 0.0]
    assert ranks[0]["gathered"] == [["rank0"], ["rank1"], ["rank2"]]


# ----------------------------------------------------------------------------- equal step counts per rank


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [10, 22, 23, 24, 25])
def test_in_memory_shards_give_every_rank_the_same_number_of_batches(n, world, drop_last):
    """[rank::world] gives rank 0 one sample more than the last rank; with batch 4 that can be one step
    more, and DDP then waits forever for the ranks that stopped. Shards are padded (or cut) to equal size
    as DistributedSampler does."""
    from edgecv.data.loaders import TensorLoader

    images, labels = torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n)
    loaders = [TensorLoader(images, labels, 4, (0.5,), (0.25,), shuffle=True, rank=r, world_size=world,
                            drop_last=drop_last) for r in range(world)]
    batches = [[y for _, y in loader] for loader in loaders]
    assert len({len(b) for b in batches}) == 1, [len(b) for b in batches]
    assert all(len(loader) == len(b) for loader, b in zip(loaders, batches, strict=True))
    assert len({loader.num_samples for loader in loaders}) == 1
    seen = [int(v) for b in batches for y in b for v in y]
    if drop_last:
        assert len(seen) == len(set(seen))  # cut, never repeated
    else:
        assert set(seen) == set(range(n))  # padded with repeats, never lost


@pytest.mark.parametrize("batch_size", [3, 8])
def test_image_folder_shards_give_every_rank_the_same_number_of_batches(tmp_path, batch_size):
    """10 images on 3 ranks: every rank runs the same number of steps, and at least one."""
    from image_files import make_image_folder

    from edgecv.data import build_data
    from edgecv.data.config import DataConfig

    root = make_image_folder(tmp_path / "img", classes=("a", "b"), per_class=5, size=(12, 12))
    cfg = DataConfig(dataset="imagefolder", image_size=8, batch_size=batch_size, augment=False)
    counts = [sum(1 for _ in build_data(cfg, str(root), rank=r, world_size=3).train) for r in range(3)]
    assert len(set(counts)) == 1 and counts[0] >= 1, counts


def test_three_ranks_on_a_dataset_that_does_not_divide_finish(tmp_path):
    """22 images, batch 4, 3 ranks: rank 0 used to get 8 images (2 steps), the others 7 (1 step), and the
    run hung in DDP's gradient all-reduce."""
    from conftest import TINY, write_recipe
    from torchrun import torchrun

    recipe = {**TINY, "name": "uneven", "data": {**TINY["data"], "train_size": 22, "val_size": 8, "batch_size": 4},
              "train": {**TINY["train"], "epochs": 1}, "stages": []}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run = torchrun(3, "-m", "edgecv", "train", str(path), "--out", str(tmp_path / "runs"), "--device", "cpu",
                   timeout=150)
    assert run.returncode == 0, f"returncode {run.returncode} after {run.seconds} s\n{run.stderr[-3000:]}"
    assert (tmp_path / "runs" / "uneven" / "00-train" / "model.pt").is_file()


def test_rank_0_calibrates_and_every_rank_quantizes_identically(tmp_path):
    """Each rank gets different calibration batches; the ptq stage's ranges (and the `auto:1` layer kept in
    float) are rank 0's on every rank. Before, each rank calibrated on its own batches."""
    from torchrun import ROOT, torchrun

    run = torchrun(2, str(ROOT / "tests" / "dist_worker.py"), "calibration", str(tmp_path), timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = _rank_results(tmp_path, "calibration", 2)
    assert r0["first_calibration_batch_sum"] != r1["first_calibration_batch_sum"]  # the data did differ
    assert r0["ranges"] and r0["ranges"] == r1["ranges"]
    assert r0["skipped_layers"] == r1["skipped_layers"] and len(r0["skipped_layers"]) == 1


# ----------------------------------------------------------------------------- training on JPEG files

GLOBAL_BATCH = 12


def _jpeg_recipe(tmp_path, root, name: str, epochs: int = 2, **train) -> object:
    """A net without BatchNorm (see tests/nets.py), no augmentation: a step's update depends only on the
    global batch, however it is split over processes."""
    from conftest import write_recipe

    recipe = {"name": name, "seed": 0, "model": {"name": "nets:no_batchnorm"},
              "data": {"dataset": "imagefolder", "root": str(root), "image_size": 16, "augment": False,
                       "batch_size": GLOBAL_BATCH, "eval_batch_size": 8},
              "train": {"epochs": epochs, "lr": 0.05, "schedule": "cosine", **train}}
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


@pytest.fixture(scope="module")
def jpeg_runs(tmp_path_factory):
    """36 JPEG files (3 classes), and the weights one process trains from them with batch 12."""
    from conftest import run_cli
    from image_files import make_image_folder
    from torchrun import ROOT

    base = tmp_path_factory.mktemp("jpegs")
    root = make_image_folder(base / "img", per_class=12, val_per_class=2, size=(20, 24))
    recipe = _jpeg_recipe(base, root, "one")
    proc = run_cli("train", str(recipe), "--out", str(base / "runs"), "--device", "cpu",
                   env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"base": base, "root": root, "one": base / "runs" / "one" / "00-train" / "model.pt"}


def _weights(path) -> dict:
    from edgecv.checkpoint import read_checkpoint

    return read_checkpoint(path)["state_dict"]


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_torchrun_trains_the_same_weights_as_one_process(jpeg_runs, world, tmp_path):
    """The same global batch (12 = 2 x 6 = 3 x 4) over real JPEG files gives the same weights, up to the
    float rounding of summing gradients in another order."""
    from torchrun import torchrun

    recipe = _jpeg_recipe(tmp_path, jpeg_runs["root"], f"world{world}")
    run = torchrun(world, "-m", "edgecv", "train", str(recipe), "--out", str(tmp_path / "runs"), "--device", "cpu",
                   "--set", f"data.batch_size={GLOBAL_BATCH // world}", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"train: {world} process(es), global batch {GLOBAL_BATCH}" in run.stdout
    one, many = _weights(jpeg_runs["one"]), _weights(tmp_path / "runs" / f"world{world}" / "00-train" / "model.pt")
    start = _initial_weights()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    diff = max(float((one[k] - many[k]).abs().max()) for k in one)
    assert moved > 1e-2 and diff < 1e-5, (moved, diff)


def _initial_weights() -> dict:
    import torch
    from nets import no_batchnorm

    torch.manual_seed(0)  # the train stage seeds with recipe.seed before building the model
    from edgecv.models.adapt import adapt_model

    return adapt_model(no_batchnorm(3), 3, 3, 16).state_dict()


def _worker_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=`rank`."""
    from torchrun import descendants

    for pid in descendants(torchrun_pid):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


@pytest.mark.slow
def test_kill_9_of_a_rank_mid_epoch_then_resume_with_another_world_size(tmp_path):
    """2 processes train; once epoch 1 is saved, rank 1 is killed with SIGKILL in the middle of the next
    epoch and torchrun stops the job. The same command with 3 processes resumes from the last finished
    epoch (the schedule placed for its own steps per epoch) and finishes."""
    import json
    import os
    import signal
    import subprocess
    import time

    from image_files import make_image_folder
    from torchrun import ROOT, kill_tree, torchrun, torchrun_args

    root = make_image_folder(tmp_path / "img", per_class=80, val_per_class=2, size=(20, 24))
    recipe = _jpeg_recipe(tmp_path, root, "killed", epochs=4)
    run_dir = tmp_path / "runs" / "killed" / "00-train"
    args = ["-m", "edgecv", "train", str(recipe), "--out", str(tmp_path / "runs"), "--device", "cpu",
            "--set", "data.batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    proc = subprocess.Popen(torchrun_args(2, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (run_dir / "state.pt").exists(), "epoch 1 was never saved"
        victim = _worker_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # torchrun stops the job when a rank dies
    finally:
        kill_tree(proc.pid)
    done = torch.load(run_dir / "state.pt", weights_only=True)["epochs_done"]
    assert 1 <= done < 4
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in logged if e["event"] == "epoch"] == list(range(1, done + 1))  # killed mid-epoch

    again = torchrun(3, *args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming train from epoch {done + 1}/4" in again.stdout
    assert "written by 2 process(es), continued by 3" in " ".join(again.stdout.split())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    resume = next(i for i, e in enumerate(log) if e["event"] == "resume")
    assert log[resume]["epochs_done"] == done and log[resume]["world_size"] == 3
    assert [e["epoch"] for e in log[resume:] if e["event"] == "epoch"] == list(range(done + 1, 5))
    assert (run_dir / "model.pt").is_file() and not (run_dir / "state.pt").exists()
