"""The recipe's `train` section (the baseline) and the training keys a later stage may override."""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

from pydantic import Field, create_model, model_validator

from edgecv.config import Strict
from edgecv.errors import EdgecvError


class TrainConfig(Strict):
    """Training hyperparameters. `lr` is the learning rate for a global batch of `lr_reference_batch`
    images (per-process batch x processes x grad_accum) when `lr_scale` is linear or sqrt; with
    `lr_scale: none` it is used as written, whatever the batch."""

    removed: ClassVar[dict[str, str]] = {
        "cudnn_benchmark": "cuDNN always picks its fastest kernels on CUDA (leave the key out)",
    }
    epochs: int = Field(8, ge=0)
    optimizer: Literal["sgd", "adamw", "rmsprop"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    lr_scale: Literal["none", "linear", "sqrt"] = Field(
        "none", description="scale lr by global batch / lr_reference_batch (linear: Goyal et al. 2017)")
    lr_reference_batch: int = Field(256, ge=1, description="the global batch that lr is written for")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "onecycle", "constant", "step"] = "cosine"
    step_epochs: float | None = Field(
        None, gt=0.0, description="schedule step (only): multiply lr by gamma every N epochs; null for the others")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule: the factor")
    warmup_epochs: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    amp_dtype: Literal["bfloat16", "float16"] = Field(
        "bfloat16", description="float16 adds a gradient scaler; bfloat16 needs Ampere or newer")
    channels_last: bool = Field(False, description="NHWC memory layout (faster convolutions on tensor cores)")
    compile: bool = Field(False, description="torch.compile the training model (minutes of compiling first)")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="keep an exponential moving average of the "
                             "weights with this decay per update, evaluate and keep it (0: off)")
    ema_steps: int = Field(1, ge=1, description="optimizer steps between EMA updates")
    grad_accum: int = Field(1, ge=1, description="batches whose gradients are summed before each step")
    grad_clip: float = Field(0.0, ge=0.0, description="clip the gradients' global norm to this (0: off)")
    bn_momentum: float | None = Field(
        None, gt=0.0, le=1.0,
        description="set every BatchNorm's momentum before training (null: keep the model's own); torchvision "
        "builds MobileNetV3 and EfficientNet with 0.01, too slow for a schedule of a few hundred steps (0.1: "
        "torch's default)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _schedule_options(self) -> TrainConfig:
        check_schedule(self)
        return self


def check_schedule(cfg: TrainConfig) -> None:
    """The step schedule needs step_epochs, and only it takes it (ValueError: a validation message)."""
    if cfg.schedule == "step" and cfg.step_epochs is None:
        raise ValueError("schedule 'step' needs step_epochs (the lr is multiplied by gamma every step_epochs)")
    if cfg.schedule != "step" and cfg.step_epochs is not None:
        raise ValueError(f"step_epochs: only schedule 'step' takes it, not {cfg.schedule!r}")


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

    renamed: ClassVar[dict[str, str]] = TrainConfig.renamed
    removed: ClassVar[dict[str, str]] = TrainConfig.removed

    def merged(self, base: TrainConfig) -> TrainConfig:
        fields = {k: v for k, v in self.model_dump().items() if k in TrainConfig.model_fields and v is not None}
        if fields.get("schedule", "step") != "step" and "step_epochs" not in fields:
            fields["step_epochs"] = None  # the base's step interval belongs to its step schedule
        merged = base.model_copy(update=fields)
        try:
            check_schedule(merged)
        except ValueError as exc:
            raise EdgecvError(f"{getattr(self, 'stage', 'stage')}: {exc}") from None
        return merged
