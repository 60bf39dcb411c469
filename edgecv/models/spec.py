"""What a model is built from (the recipe's `model` section) and what it takes as input (`ModelSpec`).

`ModelSpec` travels with every checkpoint, exported file and benchmark row, so a model file alone says
how to rebuild it and how to feed it: channels, image size, class count, and the normalization its
training data used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from edgecv.config import Strict
from edgecv.errors import EdgecvError

if TYPE_CHECKING:
    import torch


class ModelConfig(Strict):
    name: str = Field(..., description="torchvision:<builder> | timm:<name> | edgecv:<name> | package.module:factory")
    weights: str | None = Field(
        None, description="a file of your own trained weights (a state dict: .pt, .pth, .bin, .ckpt, "
        ".safetensors), or a torchvision weights enum name, e.g. IMAGENET1K_V1")
    head: Literal["keep", "new"] = Field(
        "keep", description="new: replace the classifier of model.weights with an untrained one (another class "
        "count, or classes of your own); keep: the weights' classifier, whose class count must match the data's")
    width: int | None = Field(None, ge=1, description="edgecv nets: width of the first stage")
    stem_stride: int | None = Field(None, ge=1, le=4, description="edgecv nets: stride of the first conv")
    small_input_stem: bool | None = Field(None, description="3x3 stride-1 stem; default: image_size < 64 "
                                          "(never with a weights file: the builder's own stem)")

    @model_validator(mode="after")
    def _head_needs_weights(self) -> ModelConfig:
        if self.head == "new" and not self.weights:
            raise ValueError("model.head: new replaces the classifier of model.weights; set model.weights too")
        return self


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and what it eats: `build_model(**spec.build_kwargs())`, inputs of
    `input_shape` normalized with `mean` / `std` (per channel, on pixel values scaled to [0, 1])."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    width: int | None = None
    stem_stride: int | None = None
    small_input_stem: bool | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None  # the classes of the outputs, in order

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return (self.in_channels, self.image_size, self.image_size)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A zero batch of the model's input shape (for tracing, export and MAC counting)."""
        import torch

        return torch.zeros(batch, *self.input_shape)

    def build_kwargs(self) -> dict[str, Any]:
        keys = ("num_classes", "in_channels", "image_size", "width", "stem_stride", "small_input_stem")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("mean", "std", "class_names"):
            out[key] = list(out[key]) if out[key] is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model spec") -> ModelSpec:
        """Read a spec written by `to_dict` (unknown keys from other versions are ignored)."""
        names = {f.name for f in fields(cls)}
        missing = [k for k in ("name", "num_classes", "in_channels", "image_size") if k not in data]
        if missing:
            raise EdgecvError(f"{source}: the model spec lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("mean", "std"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        if kwargs.get("class_names") is not None:
            kwargs["class_names"] = tuple(str(v) for v in kwargs["class_names"])
        return cls(**kwargs)
