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


CHECKS = {"collectives": collectives}


def main() -> None:
    check, out = sys.argv[1], Path(sys.argv[2])
    info = init_distributed("cpu")
    result = CHECKS[check](info)
    (out / f"{check}-rank{info.rank}.json").write_text(json.dumps({"rank": info.rank, "world": info.world_size,
                                                                   "backend": info.backend, **result}))


if __name__ == "__main__":
    main()
