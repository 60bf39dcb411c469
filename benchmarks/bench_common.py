"""What the CPU benchmarks share: torchvision models with random weights and trained-looking BatchNorm, and
the JSON result printed and, with --out, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgecv.io import atomic_write_text


def random_model(name: str, seed: int) -> torch.nn.Module:
    """A torchvision model with random weights and BatchNorm statistics like a trained net's, so folding is
    not trivial."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def emit(result: dict, out: Path | None) -> None:
    """Print the result as JSON; with `out`, also write it there (atomically)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
