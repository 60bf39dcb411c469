"""Structured channel pruning with torch-pruning (Fang et al., DepGraph, CVPR 2023).

`ratio` removes that fraction of channels from every prunable layer; `target_macs` keeps that fraction of
the model's MACs (within MACS_TOLERANCE, checked); `target_latency_ms` searches the ratio whose measured
latency reaches it. The layer that computes the class scores is found by running the model, whatever its
type, and is never pruned.

Modules, each using only those above it: `config` (the keys, the importances, the limits), `guard`
(torch-pruning under a time limit, its failures as one line), `plan` (groups of coupled layers and channel
plans), `macs` (MACs predicted from a plan, the walk to a MACs budget), `pruning` (prune_model: uniform,
global or latency-weighted), `latency` (the measured latency table and search).
"""

from edgecv.compress.prune.config import (
    IMPORTANCES,
    LATENCY_TOLERANCE,
    MACS_TOLERANCE,
    MAX_RATIO,
    TAYLOR_BATCHES,
    PruneConfig,
)
from edgecv.compress.prune.latency import (
    LatencySearch,
    MeasureMs,
    latency_table,
    latency_weights,
    prune_to_latency,
)
from edgecv.compress.prune.macs import MacsModel, choose_plan
from edgecv.compress.prune.plan import (
    GroupPruner,
    PrunableGroup,
    analyse,
    plan_for_ratio,
    plan_weighted,
    removal_order,
    removed_fraction,
)
from edgecv.compress.prune.pruning import prune_model

__all__ = [
    "IMPORTANCES",
    "LATENCY_TOLERANCE",
    "MACS_TOLERANCE",
    "MAX_RATIO",
    "TAYLOR_BATCHES",
    "GroupPruner",
    "LatencySearch",
    "MacsModel",
    "MeasureMs",
    "PrunableGroup",
    "PruneConfig",
    "analyse",
    "choose_plan",
    "latency_table",
    "latency_weights",
    "plan_for_ratio",
    "plan_weighted",
    "prune_model",
    "prune_to_latency",
    "removal_order",
    "removed_fraction",
]
