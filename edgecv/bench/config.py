"""The recipe's `bench` section: what the report measures, and how."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from edgecv.config import Strict, registry_choice


def _runners():
    from edgecv.bench.runners import RUNNERS

    return RUNNERS


class BenchConfig(Strict):
    removed: ClassVar[dict[str, str]] = {
        "eval_limit": "accuracy is measured on the validation split (data.limit_val shortens it)"}
    backends: list[registry_choice(_runners)] = ["torch", "onnxruntime"]  # type: ignore[valid-type]
    batch_sizes: list[int] = Field([1, 64], min_length=1)
    warmup: int = Field(10, ge=0)
    runs: int = Field(50, ge=1)
    rounds: int = Field(3, ge=1)
    threads: int | None = Field(None, ge=1, description="CPU threads (null: all cores)")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"batch sizes must be >= 1, got {v}")
        return sorted(set(v))
