"""The recipe's `train` section (the baseline) and the training keys a later stage may override."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, create_model

from edgecv.config import Strict


class TrainConfig(Strict):
    epochs: int = Field(8, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    grad_clip: float | None = Field(None, gt=0.0)
    bn_momentum: float | None = Field(
        None, gt=0.0, le=1.0,
        description="set every BatchNorm's momentum before training; torchvision builds MobileNetV3 and "
        "EfficientNet with 0.01, too slow for a schedule of a few hundred steps (0.1: torch's default)",
    )  # fmt: skip


def _optional_fields(base: type[Strict], **defaults: Any) -> dict[str, Any]:
    """`base`'s fields with the same constraints, each defaulting to None (or to `defaults[name]`)."""
    fields = {}
    for name, info in base.model_fields.items():
        copied = copy.copy(info)
        copied.default = defaults.get(name)
        annotation = info.annotation if name in defaults else info.annotation | None
        fields[name] = (annotation, copied)
    return fields


class TrainOverrides(
    create_model("_TrainOverrideFields", __base__=Strict, **_optional_fields(TrainConfig, epochs=2))  # type: ignore[misc]
):
    """Training settings of a later stage; a key left out is taken from the recipe's `train` section."""

    def merged(self, base: TrainConfig) -> TrainConfig:
        fields = {k: v for k, v in self.model_dump().items() if k in TrainConfig.model_fields and v is not None}
        return base.model_copy(update=fields)
