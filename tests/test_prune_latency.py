"""Pruning to a latency measured on ONNX Runtime, latency-aware allocation, and iterative pruning. The
searches are tested on a deterministic latency (a function of the candidate's MACs); the real ONNX Runtime
search runs with -m slow, and the real measurer's numbers are checked only for being times."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from edgecv.compress.prune import (
    LATENCY_TOLERANCE,
    MAX_RATIO,
    GroupPruner,
    PruneConfig,
    latency_table,
    latency_weights,
    prune_model,
    prune_to_latency,
)
from edgecv.errors import EdgecvError
from edgecv.models import build_model
from edgecv.models.complexity import count_macs_params
from edgecv.report.render import ReportSections, render_markdown
from edgecv.stages.prune import PruneStageConfig, _step_config, latency_measurer

EXAMPLE = torch.randn(1, 3, 32, 32)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("edgecv:resnet8", num_classes=10, image_size=32, width=32).eval()


def macs_latency(model: torch.nn.Module):
    """A measuring function without a clock: 0.05 ms plus 1 ms per unpruned model's MACs, so a candidate's
    latency is known exactly and the search itself is what a test checks."""
    full = count_macs_params(model, EXAMPLE)[0]

    def measure_ms(models: list[torch.nn.Module]) -> list[float]:
        return [0.05 + count_macs_params(m, EXAMPLE)[0] / full for m in models]

    return measure_ms


def _check_search(model, pruned, info, search, cfg) -> None:
    assert 0 < info["ratio"] <= MAX_RATIO and info["macs_after"] < info["macs_before"]
    assert count_macs_params(pruned, EXAMPLE)[0] == info["macs_after"]
    rows = search.rows(cfg)
    assert len(rows) == info["trials"] >= 2 and sum(r["chosen"] for r in rows) == 1
    assert all(r["latency_ms"] > 0 and r["macs"] > 0 and r["params"] > 0 for r in rows)
    text = render_markdown([], ReportSections(prune_search=rows))
    assert "## Latency search" in text and f"{rows[0]['ratio']:.3f}" in text


def test_target_latency_lands_within_ten_percent():
    """The target is the latency of the model with half its channels (multiples of 8); the search starts
    from the unpruned and the most pruned model and must find a pruning within 10 % of it."""
    model = small_model()
    measure_ms = macs_latency(model)
    probe = PruneConfig(target_latency_ms=1.0, importance="l1", round_to=8)
    half = prune_model(model, probe.model_copy(update={"target_latency_ms": None, "ratio": 0.5}), EXAMPLE)[0]
    full_ms, target = measure_ms([model, half])
    assert target < 0.8 * full_ms
    cfg = probe.model_copy(update={"target_latency_ms": target})
    pruned, info, search = prune_to_latency(model, cfg, EXAMPLE, measure_ms)
    assert search.reason == "" and abs(info["latency_ms"] / target - 1.0) <= LATENCY_TOLERANCE, search.candidates
    assert measure_ms([pruned])[0] == pytest.approx(info["latency_ms"], abs=1e-3)  # the model it measured
    _check_search(model, pruned, info, search, cfg)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_onnxruntime_measurer_times_each_candidate(precision):
    """The real measurer (export, INT8 Q/DQ for int8, ONNX Runtime blocks) gives one time per model."""
    model = small_model()
    cfg = PruneConfig(target_latency_ms=1.0, measure_precision=precision, importance="l1")
    half = prune_model(model, cfg.model_copy(update={"target_latency_ms": None, "ratio": 0.5}), EXAMPLE)[0]
    times = latency_measurer(cfg, EXAMPLE, runs=5, rounds=1, threads=1)([copy.deepcopy(model), half])
    assert len(times) == 2 and all(math.isfinite(ms) and ms > 0 for ms in times)


@pytest.mark.slow  # real timing: a sub-millisecond model on a shared machine can miss 10 % three times
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_target_latency_lands_within_ten_percent_on_onnxruntime(precision):
    """The target is the latency measured here and now (a shared machine's speed varies) of the model with
    half its channels, channel counts in multiples of 8; the search starts from the unpruned and the most
    pruned model and must find a pruning within 10 % of it."""
    model = small_model()
    probe = PruneConfig(target_latency_ms=1.0, measure_precision=precision, importance="l1", round_to=8)
    measure_ms = latency_measurer(probe, EXAMPLE, runs=50, rounds=3, threads=1)
    half = prune_model(model, probe.model_copy(update={"target_latency_ms": None, "ratio": 0.5}), EXAMPLE)[0]
    misses = []
    for _ in range(3):  # a sub-millisecond model on a shared 2-core machine: a busy moment moves a median 20 %
        full_ms, target = measure_ms([copy.deepcopy(model), half])
        assert target < 0.8 * full_ms, (full_ms, target)  # pruning does make this model faster here
        cfg = probe.model_copy(update={"target_latency_ms": target})
        try:
            pruned, info, search = prune_to_latency(model, cfg, EXAMPLE, measure_ms)
        except EdgecvError as exc:
            misses.append(str(exc))
            continue
        if abs(info["latency_ms"] / target - 1.0) <= LATENCY_TOLERANCE and search.reason == "":
            break
        misses.append((search.candidates, search.reason))
    else:
        pytest.fail(f"three searches missed the target: {misses}")
    _check_search(model, pruned, info, search, cfg)


def test_a_target_faster_than_reachable_is_one_line_with_the_best_reached():
    model = small_model()
    cfg = PruneConfig(target_latency_ms=0.01, importance="l1")  # below the 0.05 ms every candidate takes
    with pytest.raises(EdgecvError, match=r"cannot reach it .* best reached is 0\.[0-9]+ ms at ratio 0\.9 ") as err:
        prune_to_latency(model, cfg, EXAMPLE, macs_latency(model))
    assert "\n" not in str(err.value) and "unpruned 1.050 ms" in str(err.value)


def test_exactly_one_goal_and_known_choices():
    with pytest.raises(ValueError, match="exactly one"):
        PruneConfig(ratio=0.5, target_latency_ms=2.0)
    with pytest.raises(ValueError):
        PruneConfig(target_latency_ms=2.0, measure_precision="int4")
    with pytest.raises(ValueError):
        PruneConfig(ratio=0.5, allocation="by-hand")
    with pytest.raises(EdgecvError, match="needs the layers' measured latency table"):
        prune_model(small_model(), PruneConfig(ratio=0.5, allocation="latency"), EXAMPLE)


def test_latency_table_covers_every_group_and_steers_the_allocation():
    """Each prunable group is measured at each width; the weights average 1 over channels, and the latency
    allocation at a MACs target meets it like the uniform one does."""
    model = small_model()
    cfg = PruneConfig(ratio=0.5, allocation="latency", latency_widths=[0.5], importance="l1")
    groups = GroupPruner(copy.deepcopy(model), cfg, EXAMPLE, []).groups
    measured = latency_table(model, cfg, EXAMPLE, latency_measurer(cfg, EXAMPLE, runs=5, rounds=1, threads=1))
    table = latency_table(model, cfg, EXAMPLE, macs_latency(model))  # the steering, on known times
    for t in (measured, table):
        assert set(t) == {g.root for g in groups}
        assert all(set(row) == {1.0, 0.5} and all(ms > 0 for ms in row.values()) for row in t.values())
    assert all(0.25 <= w <= 2.5 for w in latency_weights(groups, measured).values())
    weights = latency_weights(groups, table)
    total = sum(g.channels * g.slots for g in groups)
    mean = sum(weights[g.root] * g.channels * g.slots for g in groups) / total
    assert all(0.25 <= w <= 2.5 for w in weights.values())
    assert 0.5 <= mean <= 1.5  # 1 before clipping
    macs_goal = PruneConfig(target_macs=0.5, allocation="latency", importance="l1")
    _, info = prune_model(model, macs_goal, EXAMPLE, latency_weights=weights)
    assert abs(info["macs_kept"] / 0.5 - 1) <= 0.05


def test_latency_weights_prune_more_where_time_is_spent():
    """A group whose channels save twice the time gets the larger ratio."""
    model = small_model()
    cfg = PruneConfig(ratio=0.4, importance="l1")
    groups = GroupPruner(copy.deepcopy(model), cfg, EXAMPLE, []).groups
    slow = groups[0].root
    table = {g.root: {1.0: 10.0, 0.5: 10.0 - (2.0 if g.root == slow else 1.0) * g.channels * g.slots / 100}
             for g in groups}
    weights = latency_weights(groups, table)
    assert weights[slow] > max(w for r, w in weights.items() if r != slow)
    pruned, _ = prune_model(model, cfg, EXAMPLE, latency_weights=weights)
    uniform, _ = prune_model(model, cfg, EXAMPLE)
    width = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
    width_u = {n: m.out_channels for n, m in uniform.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert width[slow] < width_u[slow]


@pytest.mark.parametrize("goal", [{"ratio": 0.5}, {"target_macs": 0.4}])
def test_steps_compose_to_the_asked_goal(goal):
    """Pruning in steps ends where one step would: ratio steps compose channels kept, MACs steps multiply."""
    model = small_model()
    cfg = PruneStageConfig(**goal, steps=3, importance="l1")
    current, base_macs = model, count_macs_params(model, EXAMPLE)[0]
    for step in range(1, 4):
        current, _ = prune_model(current, _step_config(cfg, step), EXAMPLE)
    kept = count_macs_params(current, EXAMPLE)[0] / base_macs
    one_step = prune_model(model, PruneConfig(**goal, importance="l1"), EXAMPLE)[1]["macs_kept"]
    assert abs(kept / one_step - 1) <= 0.1, (kept, one_step)


def test_the_search_does_not_assume_the_most_pruned_model_is_the_fastest():
    """ONNX Runtime's int8 convs take a slow path below 16 channels, so the most pruned candidate can be slower
    than a half-pruned one. Latency here is a function of the candidate's MACs with that cliff (known values,
    so the search itself is what is tested): the target is met between the unpruned and the half-pruned model."""
    model = small_model()
    full_macs = count_macs_params(model, EXAMPLE)[0]

    def measure_ms(models):
        fractions = [count_macs_params(m, EXAMPLE)[0] / full_macs for m in models]
        return [1.0 * f + (2.0 if f < 0.05 else 0.0) for f in fractions]  # the most pruned: slow kernels

    cfg = PruneConfig(target_latency_ms=0.6, importance="l1")
    pruned, info, search = prune_to_latency(model, cfg, EXAMPLE, measure_ms)
    assert search.candidates[1]["ratio"] == MAX_RATIO and search.candidates[1]["latency_ms"] > 2.0
    assert abs(info["latency_ms"] / 0.6 - 1.0) <= LATENCY_TOLERANCE and 0 < info["ratio"] < MAX_RATIO
