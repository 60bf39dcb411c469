"""Knowledge distillation: logit KD (Hinton et al. 2015) and feature KD (FitNets, Romero et al. 2015: MSE
between chosen layers' outputs, through a learned 1x1 adapter where the pruned student has fewer channels).

The teacher is the trained baseline, another stage's model, a checkpoint path, or torchvision weights by
name (`torchvision:resnet18:IMAGENET1K_V1`), read from the local torch hub cache only: never downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgecv.config import Strict
from edgecv.errors import EdgecvError


class DistillConfig(Strict):
    teacher: str = Field(
        "baseline",
        description="'baseline', 'parent', a stage name, a checkpoint path, or 'torchvision:<builder>:<WEIGHTS>'",
    )
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="weight of the logit distillation loss")
    temperature: float = Field(4.0, gt=0.0)
    features: list[str] = Field(
        default_factory=list, description="layers (module names in both nets) whose outputs the student matches"
    )
    feature_weight: float = Field(1.0, ge=0.0, description="weight of the feature MSE, added to the loss")


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


def torchvision_teacher(name: str) -> nn.Module:
    """`torchvision:<builder>:<WEIGHTS>` with its weights from the local torch hub cache; a weights file
    that is not cached is one line saying where it is expected (edgecv never downloads a teacher)."""
    import torchvision

    _, builder, weights_name = (name.split(":") + ["", ""])[:3]
    if not builder or not weights_name:
        raise EdgecvError(f"distill.teacher {name!r}: write 'torchvision:<builder>:<WEIGHTS>', e.g. "
                          "'torchvision:resnet18:IMAGENET1K_V1'")
    try:
        enum = torchvision.models.get_model_weights(builder)
    except (ValueError, KeyError):
        raise EdgecvError(f"distill.teacher {name!r}: torchvision has no model {builder!r}") from None
    weights = getattr(enum, weights_name, None) if weights_name != "DEFAULT" else enum.DEFAULT
    if weights is None:
        choices = ", ".join(w.name for w in enum)
        raise EdgecvError(f"distill.teacher {name!r}: {builder} has no weights {weights_name!r} ({choices})")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.exists():
        raise EdgecvError(f"distill.teacher {name!r}: weights not in the torch hub cache ({cached}); "
                          "edgecv does not download them: copy the file there first")
    model = torchvision.models.get_model(builder)
    model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
    return model


class _Taps:
    """Forward hooks keeping the latest output of named layers of a model."""

    def __init__(self, model: nn.Module, names: list[str], who: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise EdgecvError(f"distill.features: the {who} has no layer {missing[0]!r}")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(_module, _inputs, output) -> None:
            self.out[name] = output

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.out.clear()


class DistillationLoss(nn.Module):
    """A training loss `(logits, images, labels) -> loss` that runs a frozen `teacher` on the same images.
    With `cfg.features`, the `student`'s outputs at those layers (seen by hooks while it ran) are matched to
    the teacher's by MSE; a 1x1 convolution adapter, trained with the student, maps a pruned layer's
    channels to the teacher's. Call `close()` after training to remove the hooks."""

    def __init__(self, teacher: nn.Module, cfg: DistillConfig, label_smoothing: float = 0.0,
                 student: nn.Module | None = None, example_input: torch.Tensor | None = None) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg, self.label_smoothing = cfg, label_smoothing
        self.adapters = nn.ModuleDict()
        self.student_taps = self.teacher_taps = None
        if cfg.features:
            if student is None or example_input is None:
                raise EdgecvError("distill.features needs the student model and an example input")
            self._build_adapters(student, example_input)

    def _build_adapters(self, student: nn.Module, example_input: torch.Tensor) -> None:
        self.student_taps = _Taps(student, self.cfg.features, "student")
        self.teacher_taps = _Taps(self.teacher, self.cfg.features, "teacher")
        was_training = student.training
        with torch.no_grad():
            student.eval()(example_input[:1])
            self.teacher(example_input[:1])
        student.train(was_training)
        for name in self.cfg.features:
            s, t = self.student_taps.out[name], self.teacher_taps.out[name]
            if s.ndim != t.ndim or s.ndim not in (2, 4):
                raise EdgecvError(f"distill.features {name!r}: student output {tuple(s.shape)} and teacher "
                                  f"output {tuple(t.shape)} cannot be matched")
            key = name.replace(".", "/")
            if s.shape[1] == t.shape[1]:
                self.adapters[key] = nn.Identity()
            elif s.ndim == 4:
                self.adapters[key] = nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
            else:
                self.adapters[key] = nn.Linear(s.shape[1], t.shape[1], bias=False)
        self.student_taps.out.clear()
        self.teacher_taps.out.clear()

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm statistics never change
        return self

    def feature_loss(self) -> torch.Tensor:
        """Mean over the chosen layers of MSE(adapter(student output), teacher output)."""
        losses = []
        for name in self.cfg.features:
            s = self.adapters[name.replace(".", "/")](self.student_taps.out[name].float())
            t = self.teacher_taps.out[name].float()
            if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            losses.append(F.mse_loss(s, t))
        return torch.stack(losses).mean()

    def forward(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        if teacher_logits.shape[1:] != logits.shape[1:]:
            raise EdgecvError(f"distill.teacher {self.cfg.teacher!r} has {teacher_logits.shape[1]} class outputs, "
                              f"the student {logits.shape[1]}")
        loss = distillation_loss(logits, teacher_logits, labels, self.cfg, self.label_smoothing)
        if self.cfg.features and self.cfg.feature_weight > 0:
            loss = loss + self.cfg.feature_weight * self.feature_loss()
        return loss

    def close(self) -> None:
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.close()
