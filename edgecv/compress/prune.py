"""Structured channel pruning with torch-pruning (Fang et al., DepGraph, CVPR 2023).

`ratio` removes that fraction of channels from every prunable layer; `target_macs` keeps that fraction of
the model's MACs (within MACS_TOLERANCE, checked). The layer that computes the class scores is found by
running the model, whatever its type, and is never pruned.

Channel counts are planned here, not by torch-pruning's `round_to`: each group of coupled layers keeps a
multiple of `round_to` channels, counted over all its convolution groups (torch-pruning rounds a grouped
convolution's per-group count as if it were the whole layer, and misses the asked MACs). For
`target_macs`, channels are removed one quantum at a time from the group that keeps the largest fraction,
pruning one model in place on one dependency graph, until the MACs the pruned model really has fit.

torch-pruning's graph analysis runs under a time limit, and its failures (a channel shuffle it cannot
follow, window attention whose analysis does not finish) become one line naming the model and the layer.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from pydantic import Field, model_validator
from torch import nn

from edgecv.config import Strict, registry_choice
from edgecv.errors import EdgecvError
from edgecv.models.adapt import executed_classifier
from edgecv.models.complexity import count_macs_params
from edgecv.registry import Registry

IMPORTANCES: Registry[Callable[[], object]] = Registry("pruning importance")
IMPORTANCES.register("l1", lambda: tp.importance.GroupMagnitudeImportance(p=1))
IMPORTANCES.register("l2", lambda: tp.importance.GroupMagnitudeImportance(p=2))
IMPORTANCES.register("bn_scale", lambda: tp.importance.BNScaleImportance())  # |gamma| of the group's norms
IMPORTANCES.register("taylor", lambda: tp.importance.GroupTaylorImportance())
IMPORTANCES.register("random", lambda: tp.importance.RandomImportance())


TAYLOR_BATCHES = 4  # default number of batches the taylor importance scores channels on
MACS_TOLERANCE = 0.05  # target_macs: the pruned model's MACs must be within this fraction of the ask
ROOT_TYPES = [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM]  # torch-pruning's group roots


ALLOCATIONS = ("uniform", "global", "latency")  # how a pruning amount is shared among the layers
MAX_RATIO = 0.9  # the most channels a search removes from a layer
LATENCY_TOLERANCE = 0.10  # target_latency_ms: the chosen candidate is within this fraction of the target


class PruneConfig(Strict):
    """How to prune: by a channel ratio, to a fraction of the MACs, or to a latency measured on a backend,
    with an importance criterion and an allocation of the pruning among layers."""

    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of channels removed")
    target_macs: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of MACs kept")
    target_latency_ms: float | None = Field(None, gt=0.0, description="latency to reach, measured on `backend`")
    backend: str = Field("onnxruntime", description="target_latency_ms / allocation latency: where to measure")
    precision: Literal["fp32", "int8"] = Field("fp32", description="the precision measured on the backend")
    batch: int = Field(1, ge=1, description="batch size measured")
    allocation: Literal["uniform", "global", "latency"] = Field(
        "uniform", description="uniform: each layer the same ratio; global: ranked across layers; latency: "
        "more where the measured time per channel is higher"
    )
    latency_widths: list[float] = Field(
        default_factory=lambda: [0.75, 0.5], description="allocation latency: widths each layer is measured at"
    )
    search_steps: int = Field(8, ge=2, description="target_latency_ms: most bisection candidates measured")
    importance: registry_choice(lambda: IMPORTANCES) = "l2"  # type: ignore[valid-type]
    iterative_steps: int = Field(1, ge=1)
    ignore: list[str] = Field(default_factory=list, description="module names never pruned")
    round_to: int | None = Field(None, ge=1, description="keep channel counts multiples of this")
    global_pruning: bool = False
    taylor_batches: int | None = Field(None, ge=1, description="taylor: batches used to score channels (default 4)")
    graph_timeout: float = Field(
        120.0, gt=0.0, description="seconds torch-pruning may spend analysing the model's layer dependencies"
    )

    @model_validator(mode="after")
    def _one_goal(self) -> PruneConfig:
        goals = [g for g in (self.ratio, self.target_macs, self.target_latency_ms) if g is not None]
        if len(goals) != 1:
            raise ValueError("prune needs exactly one of 'ratio', 'target_macs' or 'target_latency_ms'")
        if self.global_pruning and self.allocation == "latency":
            raise ValueError("global_pruning and allocation 'latency' exclude each other")
        if self.taylor_batches is not None and self.importance != "taylor":
            raise ValueError(f"taylor_batches: only importance 'taylor' takes it, not {self.importance!r}")
        return self


# ---- torch-pruning under a time limit, its failures as one line ----------------------------------


class _AnalysisTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _AnalysisTimeout in the main thread after `seconds` (torch-pruning's graph analysis is Python,
    so the alarm interrupts it); elsewhere, or without SIGALRM, run unlimited."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(_signum, _frame):
        raise _AnalysisTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:  # give an enclosing timer back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))


def _named(model: nn.Module, value: object, names: dict[int, str]) -> str | None:
    """The model's name for a module, or for the layer nearest upstream of a torch-pruning graph node."""
    if isinstance(value, nn.Module):
        return names.get(id(value))
    if not isinstance(value, tp.dependency.Node):
        return None
    seen, queue = set(), [value]
    while queue and len(seen) < 200:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if names.get(id(node.module)):
            return names[id(node.module)]
        queue.extend(node.inputs)
    return None


def _blocking_layer(model: nn.Module, tb) -> str | None:
    """The layer torch-pruning was working on when it failed: from the innermost torch-pruning frame whose
    locals hold a graph node or one of the model's modules."""
    names = {id(m): n for n, m in model.named_modules() if n}
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        if "torch_pruning" not in frame.f_code.co_filename:
            continue
        for key in ("node", "reshape_node", "module", "m", "layer"):
            name = _named(model, frame.f_locals.get(key), names)
            if name:
                return name
    return None


def _guarded(model: nn.Module, timeout: float, work: Callable[[], object]) -> object:
    """Run torch-pruning `work` on `model` with the time limit; failures become one EdgecvError line."""
    what = type(model).__name__
    try:
        with _time_limit(timeout):
            return work()
    except EdgecvError:
        raise
    except _AnalysisTimeout as exc:
        layer = _blocking_layer(model, exc.__traceback__)
        raise EdgecvError(
            f"prune: torch-pruning did not finish analysing {what} within prune.graph_timeout {timeout:g} s"
            + (f" (stuck at layer {layer!r})" if layer else "")
            + "; its dependency search does not end on some layers (window attention): remove the prune stage"
            " or raise prune.graph_timeout"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch-pruning raises anything from its graph code
        layer = _blocking_layer(model, exc.__traceback__)
        where = f" near layer {layer!r}" if layer else ""
        if isinstance(exc, ZeroDivisionError):
            reason = "it cannot follow a reshape that regroups channels (such as a channel shuffle)"
        else:
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        raise EdgecvError(f"prune: torch-pruning cannot prune {what}{where}: {reason}") from None


# ---- the layers that are never pruned, and the groups that are --------------------------------------


def _ignored_layers(model: nn.Module, names: Sequence[str], example_input: torch.Tensor) -> list[nn.Module]:
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
        round_to = cfg.round_to or 1

        def build() -> None:
            ignored = _ignored_layers(model, cfg.ignore, example_input)
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

        _guarded(model, cfg.graph_timeout, build)
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
        _guarded(self.model, self.cfg.graph_timeout, lambda: self._prune_to(plan))
        self.plan = {root: min(keep, plan[root]) for root, keep in self.plan.items()}

    def _prune_to(self, plan: dict[str, int]) -> None:
        if self.cfg.importance == "taylor":
            if not self.batches:
                raise EdgecvError("prune.importance 'taylor' needs training batches to score channels")
            self.model.zero_grad()
            for x, y in self.batches[: self.cfg.taylor_batches or TAYLOR_BATCHES]:
                F.cross_entropy(self.model(x), y).backward()
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


def plan_after(groups: list[PrunableGroup], order: list[tuple[str, int]], n: int) -> dict[str, int]:
    plan = {g.root: g.channels for g in groups}
    for root, keep in order[:n]:
        plan[root] = keep
    return plan


def removed_fraction(groups: list[PrunableGroup], plan: dict[str, int]) -> float:
    total = sum(g.channels * g.slots for g in groups)
    kept = sum(plan[g.root] * g.slots for g in groups)
    return 1.0 - kept / total if total else 0.0


# ---- pruning ---------------------------------------------------------------------------------------


def _macs(model: nn.Module, example_input: torch.Tensor) -> int:
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


def _prune_to_macs(pruner: GroupPruner, budget: float, base_macs: int) -> tuple[dict[str, int], int]:
    """Prune to the plan whose predicted MACs fit `budget`, measure the real MACs, and continue with the
    prediction corrected by what was measured while they are over budget (a few rounds at most)."""
    predict = MacsModel(pruner, base_macs)
    scale = 1.0  # measured / predicted MACs, from the last round
    plan = pruner.plan
    for _ in range(4):
        plan = choose_plan(pruner.groups, lambda p, s=scale: predict(p) * s, budget, start=pruner.plan)
        pruner.prune_to(plan)
        macs = _macs(pruner.model, pruner.example_input)
        pruner.trials += 1
        if macs <= budget:
            return plan, macs
        scale = macs / max(predict(plan), 1.0)
    return plan, macs


def _prune_global(
    model: nn.Module, ratio: float, cfg: PruneConfig, example_input: torch.Tensor, batches: list
) -> nn.Module:
    """global_pruning: torch-pruning's MetaPruner ranks channels across layers and applies round_to."""

    def work() -> nn.Module:
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            IMPORTANCES.get(cfg.importance)(),
            pruning_ratio=ratio,
            iterative_steps=cfg.iterative_steps,
            ignored_layers=_ignored_layers(model, cfg.ignore, example_input),
            round_to=cfg.round_to,
            global_pruning=True,
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

    return _guarded(model, cfg.graph_timeout, work)


def _prune_global_search(
    model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, batches: list, base_macs: int
) -> tuple[nn.Module, float, int]:
    if cfg.ratio is not None:
        return _prune_global(copy.deepcopy(model), cfg.ratio, cfg, example_input, batches), cfg.ratio, 1
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):  # bisection on the global channel ratio until the MACs fit
        mid = (lo + hi) / 2
        trial = _prune_global(copy.deepcopy(model), mid, cfg, example_input, batches)
        if _macs(trial, example_input) <= cfg.target_macs * base_macs:
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
    if cfg.global_pruning or cfg.allocation == "global":
        pruned, ratio, trials = _prune_global_search(base, cfg, example_input, batches, base_macs)
    elif latency_weights is not None:
        pruned, ratio, trials = _prune_weighted(base, cfg, example_input, batches, base_macs, latency_weights)
    else:
        pruner = GroupPruner(copy.deepcopy(base), cfg, example_input, batches)
        if cfg.ratio is not None:
            plan = plan_for_ratio(pruner.groups, cfg.ratio)
            for step in range(1, cfg.iterative_steps + 1):  # iterative: the widths shrink in equal steps
                pruner.prune_to(plan_for_ratio(pruner.groups, cfg.ratio * step / cfg.iterative_steps))
            trials = 1
        else:
            plan, _ = _prune_to_macs(pruner, cfg.target_macs * base_macs, base_macs)
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
            + (" (round_to steps are too coarse for this model: lower prune.round_to)" if cfg.round_to else "")
        )


# ---- latency-aware allocation and the measured latency search --------------------------------------

MeasureMs = Callable[[list[nn.Module]], list[float]]  # models -> their latencies, measured together in blocks


def plan_weighted(groups: list[PrunableGroup], ratio: float, weights: dict[str, float]) -> dict[str, int]:
    """Each group loses `ratio * weight` of its channels (at most MAX_RATIO), rounded to its quantum."""
    plan = {}
    for g in groups:
        plan.update(plan_for_ratio([g], min(ratio * weights.get(g.root, 1.0), MAX_RATIO)))
    return plan


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


@dataclass
class LatencySearch:
    """The candidates a target_latency_ms search measured, in the order tried, and the one chosen."""

    target_ms: float
    candidates: list[dict] = field(default_factory=list)  # {"ratio", "latency_ms", "macs", "params"}
    chosen: int | None = None
    reason: str = ""

    def rows(self, cfg: PruneConfig) -> list[dict]:
        return [{**c, "backend": cfg.backend, "precision": cfg.precision, "batch": cfg.batch,
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
            f"prune.target_latency_ms {target:g}: the model cannot reach it on {cfg.backend} {cfg.precision} "
            f"batch {cfg.batch}; the best reached is {hi[1]:.3f} ms at ratio {hi[0]:g} (unpruned {full_ms:.3f} ms)")
    lo = (0.0, full_ms)  # slower than the target
    if full_ms <= target * (1 + LATENCY_TOLERANCE):
        search.chosen, search.reason = 0, f"the unpruned model already runs in {full_ms:.3f} ms"
    elif close(hi[1]):
        search.chosen = next(i for i, c in enumerate(search.candidates) if c["ratio"] == round(hi[0], 4))
    for _ in range(cfg.search_steps - 2 if search.chosen is None else 0):
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
