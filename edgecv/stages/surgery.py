"""The `surgery` stage: make a float model INT8-friendly (ReLU for hard-swish / SiLU / hard-sigmoid, no
squeeze-excitation), to be fine-tuned next with distillation from the original model."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator
from torch import nn

from edgecv.compress.quantize import is_quantized
from edgecv.compress.surgery import ACTIVATIONS, SE_ACTIONS, SurgerySpec, apply_surgery
from edgecv.config import registry_choice
from edgecv.console import console
from edgecv.errors import EdgecvError
from edgecv.models.complexity import count_macs_params
from edgecv.stages.base import StageConfig, StageContext, stage
from edgecv.train.loop import evaluate_model


class SurgeryConfig(StageConfig):
    stage: ClassVar[str] = "surgery"
    activation: registry_choice(lambda: ACTIVATIONS) = "relu"  # type: ignore[valid-type]
    squeeze_excitation: registry_choice(lambda: SE_ACTIONS) = "keep"  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _changes_something(self) -> SurgeryConfig:
        if self.activation == "keep" and self.squeeze_excitation == "keep":
            raise ValueError("surgery changes nothing with activation: keep and squeeze_excitation: keep")
        return self

    def spec(self) -> SurgerySpec:
        return SurgerySpec(self.activation, self.squeeze_excitation)


@stage(SurgeryConfig, "swap hard-swish/SiLU/hard-sigmoid for ReLU, remove squeeze-excitation (then fine-tune)")
def surgery_stage(model: nn.Module, cfg: SurgeryConfig, ctx: StageContext) -> nn.Module:
    if is_quantized(model):
        raise EdgecvError("stages: 'surgery' needs a float model; put it before 'ptq' and 'qat'")
    example = ctx.spec.example_input()
    macs_before, params_before = count_macs_params(model, example)
    counts = apply_surgery(model, cfg.spec())
    macs, params = count_macs_params(model, example)
    acc = evaluate_model(model, ctx.data.val, ctx.device)
    ctx.metrics.update(
        surgery=cfg.spec().to_dict(), changed=counts, top1=acc["top1"], top5=acc["top5"],
        macs_before=macs_before, macs_after=macs, params_before=params_before, params_after=params,
    )  # fmt: skip
    se = f"{counts['squeeze_excitation']} squeeze-excitation blocks removed"
    console.print(
        f"surgery ({cfg.spec().describe()}): {counts['activations']} activations replaced"
        + (f", {se}" if cfg.squeeze_excitation != "keep" else "")
        + f"; MACs {macs_before:,} -> {macs:,}; top-1 before fine-tuning {acc['top1']:.2f}%"
    )
    return model.cpu()
