"""Knowledge distillation (Hinton et al. 2015): the loss, with the teacher it asks for its logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgecv.config import Strict


class DistillConfig(Strict):
    teacher: str = Field("baseline", description="'baseline' (the trained baseline) or a checkpoint path")
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="weight of the distillation loss")
    temperature: float = Field(4.0, gt=0.0)


def distillation_loss(
    student_logits, teacher_logits, labels, cfg: DistillConfig, label_smoothing: float = 0.0
):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy with the labels."""
    t = cfg.temperature
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return cfg.alpha * kd + (1.0 - cfg.alpha) * ce


class DistillationLoss(nn.Module):
    """A training loss `(logits, images, labels) -> loss` that runs a frozen `teacher` on the same images."""

    def __init__(self, teacher: nn.Module, cfg: DistillConfig, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg, self.label_smoothing = cfg, label_smoothing

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm statistics never change
        return self

    def forward(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        return distillation_loss(logits, teacher_logits, labels, self.cfg, self.label_smoothing)
