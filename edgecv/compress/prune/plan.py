"""The layers that are never pruned, the groups of coupled layers that are (one torch-pruning dependency
graph, pruned in place plan after plan), and channel plans: how many channels each group keeps.

Channel counts are planned here, not by torch-pruning's `round_to`: each group keeps a multiple of
`round_to` channels, counted over all its convolution groups (torch-pruning rounds a grouped convolution's
per-group count as if it were the whole layer, and misses the asked MACs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from edgecv.compress.prune.config import IMPORTANCES, MAX_RATIO, ROOT_TYPES, TAYLOR_BATCHES, PruneConfig
from edgecv.compress.prune.guard import guarded
from edgecv.errors import EdgecvError
from edgecv.models.adapt import executed_classifier


def ignored_layers(model: nn.Module, names: Sequence[str], example_input: torch.Tensor) -> list[nn.Module]:
    """The modules never pruned: those named in `names` (prune.ignore) and the classifier, found by running
    the model."""
    modules = dict(model.named_modules())
    ignored = []
    for name in names:
        if name not in modules:
            import difflib

            close = difflib.get_close_matches(name, [n for n in modules if n], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EdgecvError(f"prune.ignore: the model has no module {name!r}{hint}")
        ignored.append(modules[name])
    head = executed_classifier(model, example_input)
    if head is not None:
        ignored.append(head[1])  # the classifier keeps one output per class, whatever its type
    return [m for layer in ignored for m in layer.modules()]


def taylor_gradients(model: nn.Module, cfg: PruneConfig, batches: list) -> None:
    """importance taylor: the gradients of TAYLOR_BATCHES training batches, which it scores channels by."""
    if cfg.importance != "taylor":
        return
    if not batches:
        raise EdgecvError("prune.importance 'taylor' needs training batches to score channels")
    model.zero_grad()
    for x, y in batches[:TAYLOR_BATCHES]:
        F.cross_entropy(model(x), y).backward()


@dataclass(frozen=True)
class PrunableGroup:
    """Coupled layers torch-pruning prunes together, named by their root layer. `channels` is the count per
    convolution group (`slots` of them, pruned alike); `quantum` the step that keeps the layer's total a
    multiple of round_to."""

    root: str
    channels: int
    slots: int
    quantum: int

    def levels(self) -> list[int]:
        """Channel counts this group may keep, widest first: its full width, then multiples of quantum."""
        below = [k for k in range(self.channels - self.channels % self.quantum, 0, -self.quantum)]
        return [self.channels] + [k for k in below if k < self.channels]


def _slots(group) -> int:
    """Convolution groups of a pruning group (torch-pruning prunes the same index in each); depthwise
    convolutions couple their input and output instead and count as one."""
    slots = [1]
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups != module.out_channels:
            slots.append(module.groups)
        elif isinstance(module, nn.GroupNorm):
            slots.append(module.num_groups)
    return max(slots)


class GroupPruner:
    """One torch-pruning dependency graph of `model`, pruned in place, plan after plan, without rebuilding
    the graph (the costly part). Channels are removed by `cfg.importance` within each group, the same
    channel index in every convolution group, as torch-pruning's MetaPruner does."""

    def __init__(self, model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, batches: list) -> None:
        self.model, self.cfg, self.example_input, self.batches = model.eval(), cfg, example_input, batches
        names = {m: n for n, m in model.named_modules()}
        round_to = cfg.round_to

        def build() -> None:
            ignored = ignored_layers(model, cfg.ignore, example_input)
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
            self.groups, self.roots, self.effects = [], {}, {}
            for group in self.dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
                root = group[0].dep.target.module
                slots = _slots(group)
                channels = self.dg.get_out_channels(root) // slots
                quantum = round_to // math.gcd(round_to, slots)
                self.groups.append(PrunableGroup(names[root], channels, slots, quantum))
                self.roots[names[root]] = root
                self.effects[names[root]] = self._effects(group, names)

        guarded(model, cfg.graph_timeout, build)
        self.plan = {g.root: g.channels for g in self.groups}
        self.trials = 0  # MACs measurements of a target_macs walk

    def _effects(self, group, names: dict) -> list[tuple[str, str, float]]:
        """(layer, "out" | "in", channels) of each Conv/Linear a group prunes, per root channel removed:
        what MacsModel needs to predict a plan's MACs without pruning."""
        per_root = max(len(group[0].idxs), 1)
        effects = []
        for dep, idxs in group:
            module = dep.target.module
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module in names:
                side = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
                effects.append((names[module], side, len(idxs) / per_root))
        return effects

    def prune_to(self, plan: dict[str, int]) -> None:
        """Remove channels until each group keeps `plan[root]` per convolution group (never adds back)."""
        guarded(self.model, self.cfg.graph_timeout, lambda: self._prune_to(plan))
        self.plan = {root: min(keep, plan[root]) for root, keep in self.plan.items()}

    def _prune_to(self, plan: dict[str, int]) -> None:
        taylor_gradients(self.model, self.cfg, self.batches)
        importance = IMPORTANCES.get(self.cfg.importance)()
        removals = []  # every group scored before any is pruned, as MetaPruner does
        for g in self.groups:
            current, keep = self.plan[g.root], plan[g.root]
            if keep >= current:
                continue
            root = self.roots[g.root]
            prune_out = self.dg.get_pruner_of_module(root).prune_out_channels
            scores = importance(self.dg.get_pruning_group(root, prune_out, list(range(current * g.slots))))
            if scores is None:
                continue
            drop = torch.argsort(scores.view(g.slots, current).mean(0))[: current - keep]
            removals.append((root, prune_out, torch.cat([drop + s * current for s in range(g.slots)]).tolist()))
        for root, prune_out, idxs in removals:
            self.dg.get_pruning_group(root, prune_out, idxs).prune()
        self.model.zero_grad(set_to_none=True)


def analyse(model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor) -> list[PrunableGroup]:
    """torch-pruning's groups of `model` (the classifier and `cfg.ignore` excluded), under the time limit.
    Raises a one-line EdgecvError for a model torch-pruning cannot prune: a check that needs no training."""
    return GroupPruner(model, cfg, example_input, []).groups


# ---- channel plans ---------------------------------------------------------------------------------


def plan_for_ratio(groups: list[PrunableGroup], ratio: float) -> dict[str, int]:
    """Channels each group keeps when `ratio` of them is removed (rounded down to the group's quantum)."""
    plan = {}
    for g in groups:
        target = g.channels * (1.0 - ratio)
        fitting = [k for k in g.levels() if k <= target + 1e-9]
        plan[g.root] = fitting[0] if fitting else g.levels()[-1]
    return plan


def removal_order(groups: list[PrunableGroup]) -> list[tuple[str, int]]:
    """(group, channels kept) steps from the full model to the smallest, one quantum at a time. A step from
    keeping fraction a to b of a group's channels comes when a uniform fraction t, falling from 1, passes
    (a + b) / 2: every prefix is the uniform pruning at t rounded to each group's nearest level, and a group
    with coarse steps (few channels per convolution group) takes them away from where t ends."""
    steps = []
    for g in groups:
        levels = g.levels()
        for a, b in zip(levels, levels[1:], strict=False):
            steps.append(((a + b) / (2 * g.channels), g.root, b))
    steps.sort(key=lambda s: -s[0])  # stable: groups in graph order at equal fractions
    return [(root, keep) for _, root, keep in steps]



def removed_fraction(groups: list[PrunableGroup], plan: dict[str, int]) -> float:
    total = sum(g.channels * g.slots for g in groups)
    kept = sum(plan[g.root] * g.slots for g in groups)
    return 1.0 - kept / total if total else 0.0



def plan_weighted(groups: list[PrunableGroup], ratio: float, weights: dict[str, float]) -> dict[str, int]:
    """Each group loses `ratio * weight` of its channels (at most MAX_RATIO), rounded to its quantum."""
    plan = {}
    for g in groups:
        plan.update(plan_for_ratio([g], min(ratio * weights.get(g.root, 1.0), MAX_RATIO)))
    return plan
