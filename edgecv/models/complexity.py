"""How much a model computes: multiply-accumulates and parameters for one input."""

from __future__ import annotations

import torch
from torch import nn


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of `model` on `example_input`, counted by torch-pruning's op counter."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    model.train(was_training)
    return int(macs), int(params)
