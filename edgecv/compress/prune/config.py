"""How to prune (the `prune` stage's keys other than its steps), the importance criteria, and the limits the
pruning works within."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch_pruning as tp
from pydantic import Field, model_validator

from edgecv.config import Strict, registry_choice
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
MAX_RATIO = 0.9  # the most channels a search removes from a layer
SEARCH_STEPS = 8  # target_latency_ms: the most candidates a search measures
LATENCY_TOLERANCE = 0.10  # target_latency_ms: the chosen candidate is within this fraction of the target


class PruneConfig(Strict):
    """How to prune: by a channel ratio, to a fraction of the MACs, or to a latency measured on a backend,
    with an importance criterion and an allocation of the pruning among layers."""

    renamed: ClassVar[dict[str, str]] = {"global_pruning": "allocation: global", "precision": "measure_precision",
                                         "batch": "batch_size"}
    removed: ClassVar[dict[str, str]] = {
        "search_steps": f"a latency search measures at most {SEARCH_STEPS} candidates (leave the key out)",
        "taylor_batches": f"importance taylor scores channels on {TAYLOR_BATCHES} training batches (leave the key out)",
    }
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of channels removed (one goal of three)")
    target_macs: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of MACs kept (one goal of three)")
    target_latency_ms: float | None = Field(
        None, gt=0.0, description="latency to reach, measured on `backend` (one goal of three)")
    backend: str = Field("onnxruntime", description="target_latency_ms / allocation latency: where to measure")
    measure_precision: Literal["fp32", "int8"] = Field(
        "fp32", description="target_latency_ms / allocation latency: the precision the candidates are timed at")
    batch_size: int = Field(1, ge=1, description="target_latency_ms / allocation latency: the batch size timed")
    allocation: Literal["uniform", "global", "latency"] = Field(
        "uniform", description="uniform: each layer the same ratio; global: channels ranked across layers "
        "(torch-pruning's global pruning); latency: more where the measured time per channel is higher"
    )
    latency_widths: list[float] = Field(
        default_factory=lambda: [0.75, 0.5], description="allocation latency: widths each layer is measured at"
    )
    importance: registry_choice(lambda: IMPORTANCES) = "l2"  # type: ignore[valid-type]
    ignore: list[str] = Field(default_factory=list, description="module names never pruned")
    round_to: int = Field(1, ge=1, description="keep channel counts multiples of this (1: any count)")
    graph_timeout: float = Field(
        120.0, gt=0.0, description="seconds torch-pruning may spend analysing the model's layer dependencies"
    )

    @model_validator(mode="after")
    def _one_goal(self) -> PruneConfig:
        goals = [g for g in (self.ratio, self.target_macs, self.target_latency_ms) if g is not None]
        if len(goals) != 1:
            raise ValueError("prune needs exactly one of 'ratio', 'target_macs' or 'target_latency_ms'")
        return self
