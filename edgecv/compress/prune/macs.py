"""MACs of a channel plan, predicted without pruning, and the walk that prunes a model to a MACs budget: channels
are removed one quantum at a time from the group that keeps the largest fraction, on one dependency graph,
until the MACs the pruned model really has fit."""

from __future__ import annotations

import torch
from torch import nn

from edgecv.compress.prune.config import MACS_TOLERANCE
from edgecv.compress.prune.plan import GroupPruner, PrunableGroup, removal_order
from edgecv.models.complexity import count_macs_params


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """The model's MACs for one `example_input`."""
    return count_macs_params(model, example_input)[0]


class MacsModel:
    """Predicts the MACs of a channel plan from each Conv/Linear layer's channel counts and output size (one
    forward pass), without pruning: conv MACs = output pixels x kernel x input channels per group x output
    channels. Other ops (BatchNorm, activations, pooling) are scaled with the layers' output sizes."""

    def __init__(self, pruner: GroupPruner, base_macs: int) -> None:
        self.pruner = pruner
        self.layers: dict[str, tuple[nn.Module, float]] = {}  # name -> (layer, output positions per image)
        hooks = []
        for name, m in pruner.model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):

                def hook(mod, _inputs, out, name=name) -> None:
                    width = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
                    self.layers[name] = (mod, out.numel() / out.shape[0] / width)

                hooks.append(m.register_forward_hook(hook))
        try:
            with torch.no_grad():
                pruner.model(pruner.example_input[:1])
        finally:
            for h in hooks:
                h.remove()
        self.shapes = {n: self._channels(m) for n, (m, _) in self.layers.items()}
        full = {g.root: g.channels for g in pruner.groups}
        layer_macs, activations = self._count(full)
        self.other_per_activation = max(base_macs - layer_macs, 0) / max(activations, 1)

    @staticmethod
    def _channels(m: nn.Module) -> tuple[int, int, int, int]:
        """(in, out, groups, kernel elements) of a Conv2d or Linear."""
        if isinstance(m, nn.Conv2d):
            return m.in_channels, m.out_channels, m.groups, m.kernel_size[0] * m.kernel_size[1]
        return m.in_features, m.out_features, 1, 1

    def _count(self, plan: dict[str, int]) -> tuple[float, float]:
        removed = {n: [0.0, 0.0] for n in self.layers}  # [in, out] channels removed per layer
        for g in self.pruner.groups:
            lost = (g.channels - plan[g.root]) * g.slots
            for name, side, per_root in self.pruner.effects[g.root] if lost else []:
                if name in removed:
                    removed[name][side == "out"] += lost * per_root
        macs = activations = 0.0
        for name, (_, positions) in self.layers.items():
            c_in, c_out, groups, kernel = self.shapes[name]
            c_in, c_out = c_in - removed[name][0], c_out - removed[name][1]
            per_group = 1.0 if groups > 1 and groups == self.shapes[name][0] else c_in / groups  # depthwise: 1
            macs += positions * kernel * per_group * c_out
            activations += positions * c_out
        return macs, activations

    def __call__(self, plan: dict[str, int]) -> float:
        macs, activations = self._count(plan)
        return macs + self.other_per_activation * activations


def choose_plan(
    groups: list[PrunableGroup], predict: MacsModel, budget: float, start: dict[str, int] | None = None
) -> dict[str, int]:
    """Walk removal_order from `start` (default: the full model), taking each step unless it would land
    more than half the tolerance under `budget` (a coarse step there is skipped for finer ones), until the
    predicted MACs fit `budget`."""
    plan = dict(start or {g.root: g.channels for g in groups})
    floor = budget * (1.0 - MACS_TOLERANCE / 2)
    macs = predict(plan)
    for root, keep in removal_order(groups):
        if macs <= budget:
            break
        if keep >= plan[root]:
            continue
        trial = {**plan, root: keep}
        trial_macs = predict(trial)
        if trial_macs < floor:
            continue
        plan, macs = trial, trial_macs
    return plan


def prune_to_macs(pruner: GroupPruner, budget: float, base_macs: int) -> tuple[dict[str, int], int]:
    """Prune to the plan whose predicted MACs fit `budget`, measure the real MACs, and continue with the
    prediction corrected by what was measured while they are over budget (a few rounds at most)."""
    predict = MacsModel(pruner, base_macs)
    scale = 1.0  # measured / predicted MACs, from the last round
    plan = pruner.plan
    for _ in range(4):
        plan = choose_plan(pruner.groups, lambda p, s=scale: predict(p) * s, budget, start=pruner.plan)
        pruner.prune_to(plan)
        macs = count_macs(pruner.model, pruner.example_input)
        pruner.trials += 1
        if macs <= budget:
            return plan, macs
        scale = macs / max(predict(plan), 1.0)
    return plan, macs
