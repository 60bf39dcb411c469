"""Small nets for tests, used as `model.name: nets:<factory>` (tests/ is on the path)."""

from __future__ import annotations

from torch import nn


def no_batchnorm(num_classes: int = 10) -> nn.Module:
    """A CNN without BatchNorm: its training does not depend on how a batch is split over processes
    (BatchNorm on CPU normalizes each process's part on its own; SyncBatchNorm is CUDA-only)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
