"""What a quantized model's structure is made from: its target backend, the layers left in float, and
whether BatchNorm was folded. Stored with every checkpoint so the fake-quant model can be rebuilt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QuantSpec:
    target: str
    skip_layers: tuple[str, ...] = ()
    freeze_bn: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "skip_layers": list(self.skip_layers), "freeze_bn": self.freeze_bn}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        return cls(str(data["target"]), tuple(data.get("skip_layers") or ()), bool(data.get("freeze_bn", True)))
