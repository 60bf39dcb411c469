"""Structured channel pruning with torch-pruning (Fang et al., DepGraph, CVPR 2023).

`ratio` removes that fraction of channels from every prunable layer; `target_macs` keeps that fraction of
the model's MACs (within MACS_TOLERANCE, checked). The layer that computes the class scores is found by
running the model, whatever its type, and is never pruned.

Channel counts are planned here, not by torch-pruning's `round_to`: each group of coupled layers keeps a
multiple of `round_to` channels, counted over all its convolution groups (torch-pruning rounds a grouped
convolution's per-group count as if it were the whole layer, and misses the asked MACs). For
`target_macs`, channels are removed one quantum at a time from the group that keeps the largest fraction,
and the number of quanta is searched on the MACs the pruned model really has.

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
from dataclasses import dataclass

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
IMPORTANCES.register("taylor", lambda: tp.importance.GroupTaylorImportance())
IMPORTANCES.register("random", lambda: tp.importance.RandomImportance())


TAYLOR_BATCHES = 4  # default number of batches the taylor importance scores channels on
MACS_TOLERANCE = 0.05  # target_macs: the pruned model's MACs must be within this fraction of the ask
ROOT_TYPES = [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM]  # torch-pruning's group roots


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
    graph_timeout: float = Field(
        120.0, gt=0.0, description="seconds torch-pruning may spend analysing the model's layer dependencies"
    )

    @model_validator(mode="after")
    def _one_goal(self) -> PruneConfig:
        if (self.ratio is None) == (self.target_macs is None):
            raise ValueError("prune needs exactly one of 'ratio' or 'target_macs'")
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


def _slots(dg: tp.DependencyGraph, group) -> int:
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


def analyse(model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor) -> list[PrunableGroup]:
    """torch-pruning's groups of `model` (the classifier and `cfg.ignore` excluded), under the time limit.
    Raises a one-line EdgecvError for a model torch-pruning cannot prune: a check that needs no training."""
    model = model.eval()
    names = {m: n for n, m in model.named_modules()}
    round_to = cfg.round_to or 1

    def work() -> list[PrunableGroup]:
        ignored = _ignored_layers(model, cfg.ignore, example_input)
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        groups = []
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
            root = group[0].dep.target.module
            slots = _slots(dg, group)
            channels = dg.get_out_channels(root) // slots
            groups.append(PrunableGroup(names[root], channels, slots, round_to // math.gcd(round_to, slots)))
        return groups

    return _guarded(model, cfg.graph_timeout, work)


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
    """(group, channels kept) steps from the full model to the smallest, one quantum at a time, always from
    the group that keeps the largest fraction of its channels: every prefix is a near-uniform pruning."""
    levels = {g.root: g.levels() for g in groups}
    position = {g.root: 0 for g in groups}
    steps = []
    while True:
        candidates = [r for r in levels if position[r] + 1 < len(levels[r])]
        if not candidates:
            return steps
        root = max(candidates, key=lambda r: levels[r][position[r] + 1] / levels[r][0])
        position[root] += 1
        steps.append((root, levels[root][position[root]]))


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


def _score_and_step(model: nn.Module, pruner, cfg: PruneConfig, batches: list) -> None:
    for _ in range(cfg.iterative_steps):
        if cfg.importance == "taylor":
            if not batches:
                raise EdgecvError("prune.importance 'taylor' needs training batches to score channels")
            model.zero_grad()
            for x, y in batches[: cfg.taylor_batches or TAYLOR_BATCHES]:
                F.cross_entropy(model(x), y).backward()
        pruner.step()
    model.zero_grad(set_to_none=True)


def prune_to_plan(
    model: nn.Module, plan: dict[str, int], groups: list[PrunableGroup], cfg: PruneConfig,
    example_input: torch.Tensor, batches: list,
) -> nn.Module:  # fmt: skip
    """Prune `model` in place so that each group keeps `plan[root]` channels per convolution group."""
    modules = dict(model.named_modules())
    ratios = {}
    for g in groups:
        if plan[g.root] < g.channels:  # +0.5: torch-pruning keeps int(channels * (1 - ratio)) channels
            ratios[modules[g.root]] = 1.0 - (plan[g.root] + 0.5) / g.channels

    def work() -> nn.Module:
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            IMPORTANCES.get(cfg.importance)(),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            iterative_steps=cfg.iterative_steps,
            ignored_layers=_ignored_layers(model, cfg.ignore, example_input),
        )
        _score_and_step(model, pruner, cfg, batches)
        return model

    return _guarded(model, cfg.graph_timeout, work)


def _prune_global(
    model: nn.Module, ratio: float, cfg: PruneConfig, example_input: torch.Tensor, batches: list
) -> nn.Module:
    """global_pruning: torch-pruning ranks channels across layers and applies round_to itself."""

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
        _score_and_step(model, pruner, cfg, batches)
        return model

    return _guarded(model, cfg.graph_timeout, work)


class _MacsSearch:
    """Prunes copies of one model and remembers each result's MACs."""

    def __init__(self, model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, batches: list) -> None:
        self.model, self.cfg, self.example_input, self.batches = model, cfg, example_input, batches
        self.trials = 0

    def measure(self, pruned: nn.Module) -> int:
        self.trials += 1
        return count_macs_params(pruned, self.example_input)[0]


def _search_plan(
    search: _MacsSearch, groups: list[PrunableGroup], budget: float, base_macs: int
) -> tuple[nn.Module, dict[str, int], int]:
    """The least-pruned plan along removal_order whose MACs fit `budget`, found by false position on the
    number of removed quanta (MACs fall monotonically along the order); stops within 1 % under budget."""
    order = removal_order(groups)

    def pruned_at(n: int) -> tuple[nn.Module, int]:
        plan = plan_after(groups, order, n)
        m = prune_to_plan(copy.deepcopy(search.model), plan, groups, search.cfg, search.example_input,
                          search.batches)
        return m, search.measure(m)

    lo, lo_macs = 0, base_macs  # lo: over budget, hi: within it
    hi = len(order)
    best, hi_macs = pruned_at(hi)
    if hi_macs > budget:
        return best, plan_after(groups, order, hi), hi_macs
    step = 0
    while hi - lo > 1 and hi_macs < 0.99 * budget:
        step += 1
        guess = lo + (hi - lo) * (lo_macs - budget) / max(lo_macs - hi_macs, 1)
        n = min(max(int(round(guess)), lo + 1), hi - 1)
        if step % 3 == 0:  # every third trial halves the bracket: false position alone can stall
            n = (lo + hi) // 2
        model, macs = pruned_at(n)
        if macs <= budget:
            hi, hi_macs, best = n, macs, model
        else:
            lo, lo_macs = n, macs
    return best, plan_after(groups, order, hi), hi_macs


def prune_model(
    model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor, batches: list | None = None
) -> tuple[nn.Module, dict]:
    """Return a pruned copy of `model` and a summary (MACs, params, ratio before/after). The class count is
    unchanged, and with target_macs the MACs are within MACS_TOLERANCE of the ask, or this raises."""
    batches = batches or []
    base = copy.deepcopy(model).eval()
    base_macs, base_params = count_macs_params(base, example_input)
    with torch.no_grad():
        classes = base(example_input).shape[1:]
    search = _MacsSearch(base, cfg, example_input, batches)
    if cfg.global_pruning:
        pruned, ratio = _prune_global_search(search, base_macs)
    else:
        groups = analyse(base, cfg, example_input)
        if cfg.ratio is not None:
            plan = plan_for_ratio(groups, cfg.ratio)
            pruned = prune_to_plan(copy.deepcopy(base), plan, groups, cfg, example_input, batches)
        else:
            pruned, plan, _ = _search_plan(search, groups, cfg.target_macs * base_macs, base_macs)
        ratio = removed_fraction(groups, plan)
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
        "trials": max(search.trials, 1),
    }


def _prune_global_search(search: _MacsSearch, base_macs: int) -> tuple[nn.Module, float]:
    cfg = search.cfg
    if cfg.ratio is not None:
        model = copy.deepcopy(search.model)
        return _prune_global(model, cfg.ratio, cfg, search.example_input, search.batches), cfg.ratio
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):  # bisection on the global channel ratio until the MACs fit
        mid = (lo + hi) / 2
        trial = _prune_global(copy.deepcopy(search.model), mid, cfg, search.example_input, search.batches)
        if search.measure(trial) <= cfg.target_macs * base_macs:
            best, hi = (trial, mid), mid
        else:
            lo = mid
    if best is None:
        raise EdgecvError(f"prune.target_macs {cfg.target_macs}: cannot reach it even at ratio 0.95")
    return best


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
