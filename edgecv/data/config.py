"""The recipe's `data` section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgecv.config import Strict, registry_choice
from edgecv.data.bundle import DATASETS
from edgecv.registry import Registry


def dataset_registry() -> Registry:
    """The dataset registry, filled by edgecv.data.datasets (which the package's __init__ imports)."""
    return DATASETS


class DataConfig(Strict):
    dataset: registry_choice(dataset_registry) = "fashion-mnist"  # type: ignore[valid-type]
    root: str | None = Field(None, description="dataset folder; --data or $EDGECV_DATA override it")
    image_size: int = Field(28, ge=8, le=1024)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    workers: int | None = Field(None, ge=0, description="imagefolder: DataLoader worker processes per rank (default 0)")
    augment: bool = True
    limit_train: int | None = Field(None, ge=1, description="use only the first N training images")
    limit_val: int | None = Field(None, ge=1, description="use only the first N validation images")
    # options of one dataset only (None: that dataset's default; see DATASET_OPTIONS)
    num_classes: int | None = Field(None, ge=2, description="synthetic: number of classes (default 10)")
    channels: int | None = Field(None, ge=1, le=4, description="synthetic: image channels (default 3)")
    train_size: int | None = Field(None, ge=1, description="synthetic: training images (default 512)")
    val_size: int | None = Field(None, ge=1, description="synthetic: validation images (default 256)")
    # imagefolder: loader settings
    pin_memory: bool | None = Field(None, description="imagefolder: page-locked batches (default: on CUDA)")
    persistent_workers: bool | None = Field(None, description="imagefolder: keep workers between epochs "
                                                                  "(default: when workers > 0)")
    prefetch_factor: int | None = Field(None, ge=1, description="imagefolder: batches each worker loads ahead "
                                                                 "(default: torch's, 2)")
    gpu_decode: bool | None = Field(None, description="imagefolder: decode JPEGs on the GPU (nvJPEG via "
                                                      "torchvision.io.decode_jpeg); on a CPU device, decode there")
    # imagefolder: preprocessing (filled from model.weights when the recipe starts from torchvision weights)
    resize_size: int | None = Field(None, ge=8, description="imagefolder: validation images are resized to this, "
                                                           "then center-cropped to image_size (default "
                                                           "image_size / 0.875)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None, description="imagefolder: resize interpolation (default bilinear)")
    mean: tuple[float, float, float] | None = Field(None, description="imagefolder: per-channel mean of pixel "
                                                                      "values in [0, 1] (default ImageNet's)")
    std: tuple[float, float, float] | None = Field(None, description="imagefolder: per-channel std (default ImageNet's)")
    auto_augment: Literal["imagenet", "randaugment", "trivialaugment"] | None = Field(
        None, description="imagefolder: an automatic augmentation policy after crop and flip (default none)")
    random_erase: float | None = Field(None, ge=0.0, le=1.0, description="imagefolder: probability of "
                                                                          "random erasing (default 0)")

    @model_validator(mode="after")
    def _options_of_the_dataset(self) -> DataConfig:
        """An option that the chosen dataset does not take is a mistake, not something to ignore."""
        factory = dataset_registry().get(self.dataset)
        takes = set(getattr(factory, "options", ()))
        for name in DATASET_OPTIONS:
            if getattr(self, name) is not None and name not in takes:
                raise ValueError(
                    f"data.{name}: the {self.dataset!r} dataset does not take it"
                    + (f" (it takes: {', '.join(sorted(takes))})" if takes else "")
                )
        if not self.workers:
            for name in ("prefetch_factor", "persistent_workers"):
                if getattr(self, name):
                    raise ValueError(f"data.{name}: needs worker processes (data.workers > 0)")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"data.std: every value must be positive, got {list(self.std)}")
        for name, value in DATASET_DEFAULTS.get(self.dataset, {}).items():
            if getattr(self, name) is None and (name != "prefetch_factor" or self.workers):
                self.__dict__[name] = value  # the dataset's default, written out (recipes show --resolved)
        return self


# Keys that only some datasets take; each dataset factory lists the ones it takes in `.options`.
SYNTHETIC_OPTIONS = ("num_classes", "channels", "train_size", "val_size")
IMAGEFOLDER_OPTIONS = ("workers", "pin_memory", "persistent_workers", "prefetch_factor", "gpu_decode", "resize_size",
                       "interpolation", "mean", "std", "auto_augment", "random_erase")
DATASET_OPTIONS = SYNTHETIC_OPTIONS + IMAGEFOLDER_OPTIONS
# The defaults of the dataset-specific keys that have a fixed one, filled in for the dataset that takes them
# (None stays where the default depends on something else: pin_memory on the device, resize_size on
# image_size, interpolation / mean / std on model.weights, persistent_workers on workers).
DATASET_DEFAULTS = {
    "synthetic": {"num_classes": 10, "channels": 3, "train_size": 512, "val_size": 256},
    "imagefolder": {"workers": 0, "prefetch_factor": 2, "gpu_decode": False, "random_erase": 0.0},
}


def option(value: int | None, default: int) -> int:
    """A dataset option's value, or the dataset's default when the recipe left it out."""
    return default if value is None else value
