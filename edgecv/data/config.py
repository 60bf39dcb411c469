"""The recipe's `data` section."""

from __future__ import annotations

from pydantic import Field, model_validator

from edgecv.config import Strict, registry_choice


def _datasets():
    from edgecv.data.datasets import DATASETS

    return DATASETS


class DataConfig(Strict):
    dataset: registry_choice(_datasets) = "fashion-mnist"  # type: ignore[valid-type]
    root: str | None = Field(None, description="dataset folder; --data or $EDGECV_DATA override it")
    image_size: int = Field(28, ge=8, le=1024)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    workers: int | None = Field(None, ge=0, description="imagefolder: DataLoader worker processes (default 0)")
    augment: bool = True
    limit_train: int | None = Field(None, ge=1, description="use only the first N training images")
    limit_val: int | None = Field(None, ge=1, description="use only the first N validation images")
    # options of one dataset only (None: that dataset's default; see DATASET_OPTIONS)
    num_classes: int | None = Field(None, ge=2, description="synthetic: number of classes (default 10)")
    channels: int | None = Field(None, ge=1, le=4, description="synthetic: image channels (default 3)")
    train_size: int | None = Field(None, ge=1, description="synthetic: training images (default 512)")
    val_size: int | None = Field(None, ge=1, description="synthetic: validation images (default 256)")

    @model_validator(mode="after")
    def _options_of_the_dataset(self) -> DataConfig:
        """An option that the chosen dataset does not take is a mistake, not something to ignore."""
        factory = _datasets().get(self.dataset)
        takes = set(getattr(factory, "options", ()))
        for name in DATASET_OPTIONS:
            if getattr(self, name) is not None and name not in takes:
                raise ValueError(
                    f"data.{name}: the {self.dataset!r} dataset does not take it"
                    + (f" (it takes: {', '.join(sorted(takes))})" if takes else "")
                )
        return self


# Keys that only some datasets take; each dataset factory lists the ones it takes in `.options`.
DATASET_OPTIONS = ("num_classes", "channels", "train_size", "val_size", "workers")


def option(value: int | None, default: int) -> int:
    """A dataset option's value, or the dataset's default when the recipe left it out."""
    return default if value is None else value
