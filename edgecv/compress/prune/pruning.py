"""Pruning a model to a channel ratio or a MACs fraction: uniform (each group the same ratio, planned
here), global (torch-pruning's MetaPruner ranks channels across layers), or weighted per group by measured
latency. The result keeps its class outputs, and with target_macs its MACs within MACS_TOLERANCE of the ask."""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from edgecv.compress.prune.config import IMPORTANCES, MACS_TOLERANCE, PruneConfig
from edgecv.compress.prune.guard import guarded
from edgecv.compress.prune.macs import MacsModel, count_macs, prune_to_macs
from edgecv.compress.prune.plan import (
    GroupPruner,
    ignored_layers,
    plan_for_ratio,
    plan_weighted,
    removed_fraction,
    taylor_gradients,
)
from edgecv.errors import EdgecvError
from edgecv.models.complexity import count_macs_params


def _prune_global(
    model: nn.Module, ratio: float, cfg: PruneConfig, example_input: torch.Tensor, batches: list
) -> nn.Module:
    """allocation global: torch-pruning's MetaPruner ranks channels across layers and applies round_to."""

    def work() -> nn.Module:
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            IMPORTANCES.get(cfg.importance)(),
            pruning_ratio=ratio,
            ignored_layers=ignored_layers(model, cfg.ignore, example_input),
            round_to=cfg.round_to if cfg.round_to > 1 else None,
            global_pruning=True,
        )
        taylor_gradients(model, cfg, batches)
        pruner.step()
        model.zero_grad(set_to_none=True)
        return model

    return guarded(model, cfg.graph_timeout, work)


def _prune_global_search(
    model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, batches: list, base_macs: int
) -> tuple[nn.Module, float, int]:
    if cfg.ratio is not None:
        return _prune_global(copy.deepcopy(model), cfg.ratio, cfg, example_input, batches), cfg.ratio, 1
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):  # bisection on the global channel ratio until the MACs fit
        mid = (lo + hi) / 2
        trial = _prune_global(copy.deepcopy(model), mid, cfg, example_input, batches)
        if count_macs(trial, example_input) <= cfg.target_macs * base_macs:
            best, hi = (trial, mid), mid
        else:
            lo = mid
    if best is None:
        raise EdgecvError(f"prune.target_macs {cfg.target_macs}: cannot reach it even at ratio 0.95")
    return best[0], best[1], 12


def prune_model(
    model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, batches: list | None = None,
    latency_weights: dict[str, float] | None = None,
) -> tuple[nn.Module, dict]:
    """Return a pruned copy of `model` and a summary (MACs, params, ratio before/after). The class count is
    unchanged, and with target_macs the MACs are within MACS_TOLERANCE of the ask, or this raises.
    `latency_weights` (from `latency_weights`): each group's ratio scaled by its weight."""
    batches = batches or []
    base = copy.deepcopy(model).eval()
    base_macs, base_params = count_macs_params(base, example_input)
    with torch.no_grad():
        classes = base(example_input).shape[1:]
    if cfg.target_latency_ms is not None:
        raise EdgecvError("prune.target_latency_ms is searched by prune_to_latency, with a measuring function")
    if cfg.allocation == "latency" and latency_weights is None:
        raise EdgecvError("prune.allocation 'latency' needs the layers' measured latency table (latency_table)")
    if cfg.allocation == "global":
        pruned, ratio, trials = _prune_global_search(base, cfg, example_input, batches, base_macs)
    elif latency_weights is not None:
        pruned, ratio, trials = _prune_weighted(base, cfg, example_input, batches, base_macs, latency_weights)
    else:
        pruner = GroupPruner(copy.deepcopy(base), cfg, example_input, batches)
        if cfg.ratio is not None:
            plan = plan_for_ratio(pruner.groups, cfg.ratio)
            pruner.prune_to(plan)
            trials = 1
        else:
            plan, _ = prune_to_macs(pruner, cfg.target_macs * base_macs, base_macs)
            trials = pruner.trials
        pruned, ratio = pruner.model, removed_fraction(pruner.groups, plan)
    pruned.eval()
    macs, params = count_macs_params(pruned, example_input)
    _check_result(pruned, cfg, example_input, classes, macs / base_macs)
    return pruned, {
        "ratio": round(ratio, 4),
        "macs_before": base_macs,
        "macs_after": macs,
        "macs_kept": round(macs / base_macs, 4),
        "params_before": base_params,
        "params_after": params,
        "trials": trials,
    }


def _check_result(
    pruned: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, classes: torch.Size, kept: float
) -> None:
    """The pruned model keeps its class outputs, and (target_macs) its MACs are what was asked."""
    with torch.no_grad():
        got = pruned(example_input).shape[1:]
    if got != classes:
        raise EdgecvError(
            f"prune: the pruned {type(pruned).__name__} has outputs of shape {tuple(got)}, not {tuple(classes)}:"
            " its classifier was pruned; name the layer that computes the class scores in prune.ignore"
        )
    if cfg.target_macs is not None and abs(kept / cfg.target_macs - 1.0) > MACS_TOLERANCE:
        raise EdgecvError(
            f"prune.target_macs {cfg.target_macs}: the pruned {type(pruned).__name__} keeps {kept:.3f} of its "
            f"MACs, more than {100 * MACS_TOLERANCE:g} % away from the ask"
            + (" (round_to steps are too coarse for this model: lower prune.round_to)" if cfg.round_to > 1 else "")
        )


def _prune_weighted(
    model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, batches: list, base_macs: int,
    weights: dict[str, float],
) -> tuple[nn.Module, float, int]:
    """Latency allocation: the ratio scaled per group by `weights`; for target_macs the common ratio is
    bisected on the MACs model's prediction, then the pruned model is counted."""
    pruner = GroupPruner(copy.deepcopy(model), cfg, example_input, batches)
    if cfg.ratio is not None:
        plan = plan_weighted(pruner.groups, cfg.ratio, weights)
    else:
        predict, lo, hi = MacsModel(pruner, base_macs), 0.0, 1.0 / min(weights.values())
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if predict(plan_weighted(pruner.groups, mid, weights)) <= cfg.target_macs * base_macs \
                else (mid, hi)
        plan = plan_weighted(pruner.groups, hi, weights)
    pruner.prune_to(plan)
    return pruner.model, removed_fraction(pruner.groups, plan), 1

