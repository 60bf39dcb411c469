"""Checks that need real processes, run under `torchrun` by tests/test_distributed.py (gloo on CPU).

    torchrun --standalone --nproc_per_node=N tests/dist_worker.py CHECK OUT_DIR

Each rank writes what it saw to OUT_DIR/<CHECK>-rank<R>.json; the test compares the ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from edgecv.train.distributed import (
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_module_state,
    broadcast_object,
    gather_objects,
    init_distributed,
)


def collectives(info) -> dict:
    torch.manual_seed(100 + info.rank)  # every rank starts with different weights
    layer = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    layer[1].running_mean.fill_(float(info.rank))
    broadcast_module_state(layer, info)
    barrier(info)
    return {
        "sum": all_reduce_sum([float(info.rank), 1.0], info),
        "mean": all_reduce_mean(float(info.rank), info),
        "broadcast": broadcast_object({"from": info.rank}, info),
        "gathered": gather_objects([f"rank{info.rank}"], info),
        "weights": layer[0].weight.tolist(),
        "running_mean": layer[1].running_mean.tolist(),
    }


def calibration(info) -> dict:
    """The ptq stage with calibration batches that differ per rank: the ranges must still agree."""
    import tempfile

    from edgecv.data.datasets import build_data
    from edgecv.models import build_model
    from edgecv.pipeline import model_spec
    from edgecv.recipe import validate
    from edgecv.stages import STAGES, StageContext

    recipe = validate({
        "name": "calib", "model": {"name": "edgecv:resnet8", "width": 8},
        "data": {"dataset": "synthetic", "image_size": 16, "num_classes": 4, "train_size": 128, "val_size": 32,
                 "batch_size": 16, "eval_batch_size": 32},
        "stages": [{"ptq": {"compare": ["max", "percentile"], "calib_batches": 2, "skip_layers": "auto:1"}}],
    })  # fmt: skip
    data = build_data(recipe.data, seed=10 * info.rank, rank=info.rank, world_size=info.world_size)
    spec = model_spec(recipe, data)
    torch.manual_seed(0)
    model = build_model(spec.name, **spec.build_kwargs()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(recipe, Path(tmp), Path(tmp), 1, "cpu", data, spec, dist=info)
        qmodel = STAGES.get("ptq").run(model, recipe.stages[0], ctx)
    ranges = {k: v.flatten().tolist() for k, v in qmodel.state_dict().items() if k.rsplit(".", 1)[-1] in ("amax", "lo", "hi")}
    return {"ranges": ranges, "first_calibration_batch_sum": float(data.calibration_batches(1)[0].sum()),
            "skipped_layers": ctx.metrics.get("skipped_layers")}


def nccl_info():
    """Under torchrun on CUDA: NCCL, one GPU per process. With one process torchrun makes no group, so
    one is made here: NCCL then runs for real (a CPU tensor fails even at world size 1)."""
    import torch.distributed as dist

    from edgecv.train.distributed import DistInfo

    info = init_distributed("cuda")
    if not info.enabled:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", device_id=torch.device("cuda:0"))
        info = DistInfo(0, 1, 0, "nccl", "cuda:0")
    return info


CHECKS = {"collectives": collectives, "calibration": calibration, "nccl_collectives": collectives}


def main() -> None:
    check, out = sys.argv[1], Path(sys.argv[2])
    info = nccl_info() if check.startswith("nccl") else init_distributed("cpu")
    result = CHECKS[check](info)
    (out / f"{check}-rank{info.rank}.json").write_text(json.dumps({"rank": info.rank, "world": info.world_size,
                                                                   "backend": info.backend, **result}))
    barrier(info)


if __name__ == "__main__":
    main()
