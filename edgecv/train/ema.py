"""An exponential moving average of a model's weights (and BatchNorm statistics), as torchvision's
classification reference keeps with `--model-ema`: evaluated each epoch and kept as the stage's model."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """`average = decay * average + (1 - decay) * weights`, every `every` optimizer steps."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1) -> None:
        self.every = every
        self.steps = 0
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def step(self, model: nn.Module) -> None:
        """Call after every optimizer step."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        return {"averaged": self.averaged.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.steps = int(state["steps"])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Put the averaged weights and buffers into `model`."""
        model.load_state_dict(self.module.state_dict())
