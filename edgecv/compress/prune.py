"""Structured channel pruning with torch-pruning (Fang et al., DepGraph, CVPR 2023).

`ratio` removes that fraction of channels from every prunable layer; `target_macs` searches the ratio
that keeps at most that fraction of the model's MACs. The classifier's outputs are never pruned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from pydantic import Field, model_validator
from torch import nn

from edgecv.config import Strict, registry_choice
from edgecv.errors import EdgecvError
from edgecv.models.complexity import count_macs_params
from edgecv.registry import Registry

IMPORTANCES: Registry[Callable[[], object]] = Registry("pruning importance")
IMPORTANCES.register("l1", lambda: tp.importance.GroupMagnitudeImportance(p=1))
IMPORTANCES.register("l2", lambda: tp.importance.GroupMagnitudeImportance(p=2))
IMPORTANCES.register("taylor", lambda: tp.importance.GroupTaylorImportance())
IMPORTANCES.register("random", lambda: tp.importance.RandomImportance())


TAYLOR_BATCHES = 4  # default number of batches the taylor importance scores channels on


class PruneConfig(Strict):
    """How to prune: by a channel ratio or to a fraction of the MACs, with an importance criterion."""

    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of channels removed")
    target_macs: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of MACs kept")
    importance: registry_choice(lambda: IMPORTANCES) = "l2"  # type: ignore[valid-type]
    iterative_steps: int = Field(1, ge=1)
    ignore: list[str] = Field(default_factory=list, description="module names never pruned")
    round_to: int | None = Field(None, ge=1, description="keep channel counts multiples of this")
    global_pruning: bool = False
    taylor_batches: int | None = Field(None, ge=1, description="taylor: batches used to score channels (default 4)")

    @model_validator(mode="after")
    def _one_goal(self) -> PruneConfig:
        if (self.ratio is None) == (self.target_macs is None):
            raise ValueError("prune needs exactly one of 'ratio' or 'target_macs'")
        if self.taylor_batches is not None and self.importance != "taylor":
            raise ValueError(f"taylor_batches: only importance 'taylor' takes it, not {self.importance!r}")
        return self


def _ignored_layers(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    ignored = []
    for name in names:
        if name not in modules:
            import difflib

            close = difflib.get_close_matches(name, [n for n in modules if n], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EdgecvError(f"prune.ignore: the model has no module {name!r}{hint}")
        ignored.append(modules[name])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        ignored.append(linears[-1])  # the classifier keeps one output per class
    return ignored


def _prune_once(
    model: nn.Module, ratio: float, cfg: PruneConfig, example_input: torch.Tensor, batches: list
) -> nn.Module:
    importance = IMPORTANCES.get(cfg.importance)()
    pruner = tp.pruner.MetaPruner(
        model,
        example_input,
        importance,
        pruning_ratio=ratio,
        iterative_steps=cfg.iterative_steps,
        ignored_layers=_ignored_layers(model, cfg.ignore),
        round_to=cfg.round_to,
        global_pruning=cfg.global_pruning,
    )
    for _ in range(cfg.iterative_steps):
        if cfg.importance == "taylor":
            if not batches:
                raise EdgecvError("prune.importance 'taylor' needs training batches to score channels")
            model.zero_grad()
            for x, y in batches[: cfg.taylor_batches or TAYLOR_BATCHES]:
                F.cross_entropy(model(x), y).backward()
        pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def prune_model(
    model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, batches: list | None = None
) -> tuple[nn.Module, dict]:
    """Return a pruned copy of `model` and a summary (MACs, params, ratio before/after)."""
    batches = batches or []
    base = copy.deepcopy(model).eval()
    base_macs, base_params = count_macs_params(base, example_input)
    if cfg.ratio is not None:
        ratio = cfg.ratio
        pruned = _prune_once(copy.deepcopy(model), ratio, cfg, example_input, batches)
    else:
        lo, hi, best = 0.0, 0.95, None
        for _ in range(12):  # bisection on the channel ratio until the MACs fit
            mid = (lo + hi) / 2
            trial = _prune_once(copy.deepcopy(model), mid, cfg, example_input, batches)
            macs, _ = count_macs_params(trial, example_input)
            if macs <= cfg.target_macs * base_macs:
                best, hi = (mid, trial), mid
            else:
                lo = mid
        if best is None:
            raise EdgecvError(f"prune.target_macs {cfg.target_macs}: cannot reach it even at ratio 0.95")
        ratio, pruned = best
    pruned.eval()
    macs, params = count_macs_params(pruned, example_input)
    return pruned, {
        "ratio": round(ratio, 4),
        "macs_before": base_macs,
        "macs_after": macs,
        "macs_kept": round(macs / base_macs, 4),
        "params_before": base_params,
        "params_after": params,
    }
