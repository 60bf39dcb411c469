"""Latency-aware allocation (each layer pruned in proportion to the time its channels cost, measured) and the
search for a ratio whose measured latency reaches `target_latency_ms`."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgecv.compress.prune.config import LATENCY_TOLERANCE, MAX_RATIO, SEARCH_STEPS, PruneConfig
from edgecv.compress.prune.plan import GroupPruner, PrunableGroup
from edgecv.compress.prune.pruning import prune_model
from edgecv.errors import EdgecvError
from edgecv.models.complexity import count_macs_params

MeasureMs = Callable[[list[nn.Module]], list[float]]  # models -> their latencies, measured together in blocks


def latency_table(
    model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, measure_ms: MeasureMs
) -> dict[str, dict[float, float]]:
    """Per prunable group, the model's measured latency with only that group cut to each of
    `cfg.latency_widths` (width 1.0 is the unpruned model): where the backend spends time, layer by layer.
    All variants are measured together, in blocks, so they share the machine's conditions."""
    groups = GroupPruner(copy.deepcopy(model), cfg, example_input, []).groups
    variants, keys = [copy.deepcopy(model).eval()], [(None, 1.0)]
    for g in groups:
        for width in cfg.latency_widths:
            pruner = GroupPruner(copy.deepcopy(model), cfg, example_input, [])
            pruner.prune_to({**pruner.plan, g.root: max(1, round(g.channels * width))})
            variants.append(pruner.model)
            keys.append((g.root, width))
    times = measure_ms(variants)
    table = {g.root: {1.0: times[0]} for g in groups}
    for (root, width), ms in zip(keys[1:], times[1:], strict=True):
        table[root][width] = ms
    return table


def latency_weights(groups: list[PrunableGroup], table: dict[str, dict[float, float]]) -> dict[str, float]:
    """A weight per group from its measured time saved per channel removed, normalised to a channel-weighted
    mean of 1 and kept within [0.25, 2.5]: layers whose channels cost more time are pruned more."""
    per_channel = {}
    for g in groups:
        rows = table[g.root]
        savings = [max(rows[1.0] - ms, 0.0) / ((1.0 - w) * g.channels * g.slots)
                   for w, ms in rows.items() if w < 1.0]
        per_channel[g.root] = sum(savings) / max(len(savings), 1)
    total = sum(g.channels * g.slots for g in groups)
    mean = sum(per_channel[g.root] * g.channels * g.slots for g in groups) / max(total, 1)
    if mean <= 0:
        return {g.root: 1.0 for g in groups}  # nothing measurable: uniform
    return {root: min(max(v / mean, 0.25), 2.5) for root, v in per_channel.items()}



@dataclass
class LatencySearch:
    """The candidates a target_latency_ms search measured, in the order tried, and the one chosen."""

    target_ms: float
    candidates: list[dict] = field(default_factory=list)  # {"ratio", "latency_ms", "macs", "params"}
    chosen: int | None = None
    reason: str = ""

    def rows(self, cfg: PruneConfig) -> list[dict]:
        return [{**c, "backend": cfg.backend, "precision": cfg.measure_precision, "batch": cfg.batch_size,
                 "chosen": i == self.chosen} for i, c in enumerate(self.candidates)]


def _closest_candidate(search: LatencySearch, lo: tuple[float, float], hi: tuple[float, float]) -> None:
    """No candidate landed within the tolerance: keep the closest, and say why (the bracket it ended in)."""
    target = search.target_ms
    best = min(range(len(search.candidates)), key=lambda i: abs(search.candidates[i]["latency_ms"] / target - 1.0))
    search.chosen = best
    search.reason = (f"no candidate within {100 * LATENCY_TOLERANCE:g} % of {target:g} ms after "
                     f"{len(search.candidates)} measurements: the latency jumps from {lo[1]:.3f} ms at ratio "
                     f"{lo[0]:.3f} to {hi[1]:.3f} ms at ratio {hi[0]:.3f} (the backend's kernels change with "
                     f"the channel counts; prune.round_to 8 often helps); the closest is "
                     f"{search.candidates[best]['latency_ms']:.3f} ms")


def _latency_info(model: nn.Module, pruned: nn.Module, example_input: torch.Tensor, search: LatencySearch) -> dict:
    chosen = search.candidates[search.chosen]
    macs, params = count_macs_params(pruned, example_input)
    base_macs, base_params = count_macs_params(model, example_input)
    return {"ratio": chosen["ratio"], "macs_before": base_macs, "macs_after": macs,
            "macs_kept": round(macs / base_macs, 4), "params_before": base_params, "params_after": params,
            "trials": len(search.candidates), "latency_ms": chosen["latency_ms"],
            "target_latency_ms": search.target_ms}


def prune_to_latency(
    model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, measure_ms: MeasureMs,
    batches: list | None = None, weights: dict[str, float] | None = None,
) -> tuple[nn.Module, dict, LatencySearch]:
    """Bisect the pruning ratio until the measured latency is within LATENCY_TOLERANCE of
    `cfg.target_latency_ms`. The unpruned model and the most pruned one (MAX_RATIO) are measured first,
    together; a target faster than the most pruned is one line naming the best reached."""
    target, search = cfg.target_latency_ms, LatencySearch(cfg.target_latency_ms)
    models: list[nn.Module] = []  # one per candidate

    def candidate(ratio: float) -> nn.Module:
        goal = cfg.model_copy(update={"target_latency_ms": None, "ratio": ratio})
        return prune_model(model, goal, example_input, batches, weights)[0] if ratio > 0 else \
            copy.deepcopy(model).eval()

    def record(ratios: list[float]) -> list[float]:
        trial = [candidate(r) for r in ratios]
        times = measure_ms(trial)
        for r, ms, m in zip(ratios, times, trial, strict=True):
            models.append(m)
            macs, params = count_macs_params(m, example_input)
            search.candidates.append({"ratio": round(r, 4), "latency_ms": round(ms, 4), "macs": macs,
                                      "params": params})
        return times

    def close(ms: float) -> bool:
        return abs(ms / target - 1.0) <= LATENCY_TOLERANCE

    full_ms, fastest_ms = record([0.0, MAX_RATIO])
    hi = (MAX_RATIO, fastest_ms)  # (ratio, ms): the least pruned candidate known faster than the target
    if fastest_ms > target * (1 + LATENCY_TOLERANCE):  # very narrow layers can be slower (int8 slow paths)
        (mid_ms,) = record([MAX_RATIO / 2])
        hi = min(hi, (MAX_RATIO / 2, mid_ms), key=lambda c: c[1])
    if hi[1] > target * (1 + LATENCY_TOLERANCE):
        raise EdgecvError(
            f"prune.target_latency_ms {target:g}: the model cannot reach it on {cfg.backend} {cfg.measure_precision} "
            f"batch {cfg.batch_size}; the best reached is {hi[1]:.3f} ms at ratio {hi[0]:g} (unpruned {full_ms:.3f} ms)")
    lo = (0.0, full_ms)  # slower than the target
    if full_ms <= target * (1 + LATENCY_TOLERANCE):
        search.chosen, search.reason = 0, f"the unpruned model already runs in {full_ms:.3f} ms"
    elif close(hi[1]):
        search.chosen = next(i for i, c in enumerate(search.candidates) if c["ratio"] == round(hi[0], 4))
    for _ in range(SEARCH_STEPS - 2 if search.chosen is None else 0):
        ratio = lo[0] + (hi[0] - lo[0]) * (lo[1] - target) / max(lo[1] - hi[1], 1e-9)  # interpolate the time
        ratio = min(max(ratio, lo[0] + 0.1 * (hi[0] - lo[0])), hi[0] - 0.1 * (hi[0] - lo[0]))
        (ms,) = record([ratio])
        if close(ms):
            search.chosen = len(search.candidates) - 1
            break
        lo, hi = ((ratio, ms), hi) if ms > target else (lo, (ratio, ms))
        if hi[0] - lo[0] < 0.02:  # about one channel in fifty: no pruning lies between
            break
    if search.chosen is None:
        _closest_candidate(search, lo, hi)
    pruned = models[search.chosen]
    info = _latency_info(model, pruned, example_input, search)
    return pruned, info, search
