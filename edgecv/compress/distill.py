"""Knowledge distillation (Hinton et al. 2015): the loss and the teacher."""

from __future__ import annotations

import torch.nn.functional as F

from edgecv.recipe import DistillConfig


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
