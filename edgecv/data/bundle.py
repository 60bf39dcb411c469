"""What a dataset gives the pipeline (`DataBundle`), and the registry of dataset factories.

Kept apart from the factories (edgecv.data.datasets) so that the recipe's `data` section
(edgecv.data.config) can list the dataset names without importing the factories that read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgecv.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass
class DataBundle:
    """Everything the pipeline needs from a dataset: loaders and the input geometry."""

    name: str
    train: Iterable
    val: Iterable
    num_classes: int
    channels: int
    image_size: int
    class_names: list[str] = field(default_factory=list)
    calib: Iterable | None = None  # un-augmented training batches, for calibration
    source: str = ""
    mean: tuple[float, ...] = ()  # per-channel normalization of pixel values in [0, 1]
    std: tuple[float, ...] = ()
    val_shard: Iterable | None = None  # this rank's part of `val` (distributed evaluation); None: all of it

    @property
    def eval_part(self) -> Iterable:
        """What this rank evaluates when the ranks share the validation set (all of it for one process)."""
        return self.val_shard if self.val_shard is not None else self.val

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        import torch

        return torch.zeros(batch, *self.input_shape)

    def calibration_batches(self, n: int) -> list[torch.Tensor]:
        out = []
        for x, _ in self.calib if self.calib is not None else self.train:
            out.append(x)
            if len(out) >= n:
                break
        return out

    def val_samples(self, n: int) -> torch.Tensor:
        import torch

        xs, seen = [], 0
        for x, _ in self.val:
            xs.append(x)
            seen += len(x)
            if seen >= n:
                break
        return torch.cat(xs)[:n]


DatasetFactory = Callable[..., DataBundle]
DATASETS: Registry[DatasetFactory] = Registry("dataset")


def dataset(name: str, options: tuple[str, ...] = ()) -> Callable[[DatasetFactory], DatasetFactory]:
    """Register a dataset factory; `options` are the dataset-specific `data` keys it takes."""

    def register(factory: DatasetFactory) -> DatasetFactory:
        factory.options = options  # type: ignore[attr-defined]
        return DATASETS.register(name, factory)

    return register
