"""One training loop for baseline, fine-tuning, distillation and QAT."""

from edgecv.train.loop import evaluate_model, fit

__all__ = ["evaluate_model", "fit"]
