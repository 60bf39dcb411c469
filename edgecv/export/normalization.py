"""What an exported model's input is (float NCHW, or uint8 NHWC camera frames) and the normalization a
frame-input file folds in: `Normalization`, and the metadata_props that record it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecv.errors import EdgecvError
from edgecv.registry import Registry

FLOAT_NCHW = "float-nchw"
UINT8_NHWC = "uint8-nhwc"
# What an exported model's input is: name -> what the caller feeds it.
INPUT_KINDS: Registry[str] = Registry("model input")
INPUT_KINDS.register(FLOAT_NCHW, "float32 N x C x H x W, normalized with the model's mean and std")
INPUT_KINDS.register(UINT8_NHWC, "uint8 N x H x W x C camera frames (RGB order), normalization folded in")

# metadata_props of a frame-input ONNX file: what it takes and the normalization folded into it
META_INPUT, META_MEAN, META_STD = "edgecv.input", "edgecv.mean", "edgecv.std"
# Padding with the zero point is used when it is within this many pixel levels of every channel's mean pixel.
ZERO_POINT_PAD_TOLERANCE = 0.5


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of pixel values scaled to [0, 1]: x = (p / 255 - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.mean or len(self.mean) != len(self.std):
            raise EdgecvError(f"normalization: mean {self.mean} and std {self.std} need one value per channel")
        if any(s <= 0 for s in self.std):
            raise EdgecvError(f"normalization: std {self.std} must be positive")

    @classmethod
    def of(cls, spec: Any) -> Normalization:
        """The normalization of a ModelSpec; a model without one cannot take frames."""
        if not spec.mean or not spec.std:
            raise EdgecvError(
                f"model {spec.name!r} records no input normalization (mean/std), so its frame input cannot be "
                "folded; export it from a run whose data section normalizes"
            )
        return cls(tuple(float(v) for v in spec.mean), tuple(float(v) for v in spec.std))

    @classmethod
    def neutral(cls, channels: int) -> Normalization:
        """Mean 0.5, std 0.25: for timing the preprocessing of a model whose normalization is unknown
        (the numpy work is the same whatever the values)."""
        return cls((0.5,) * channels, (0.25,) * channels)

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def mean_pixel(self) -> np.ndarray:
        """m_c = 255 * mean_c: the pixel value that normalizes to zero."""
        return 255.0 * np.asarray(self.mean, dtype=np.float64)

    def preprocess(self, frames: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C frames -> float32 N x C x H x W normalized: what a float-input model needs, in
        numpy as a user writes it (to float, / 255, - mean, / std, HWC -> CHW)."""
        x = frames.astype(np.float32) / np.float32(255.0)
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def to_frames(self, batch: Any) -> np.ndarray:
        """The inverse: a normalized float N x C x H x W batch (e.g. from a validation loader) -> uint8 frames.
        Exact for images that were uint8 before normalization (every dataset edgecv loads)."""
        x = np.asarray(batch, dtype=np.float64)
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise EdgecvError(f"expected a normalized N x {self.channels} x H x W batch, got shape {x.shape}")
        c = (1, self.channels, 1, 1)
        p = (x * np.asarray(self.std).reshape(c) + np.asarray(self.mean).reshape(c)) * 255.0
        return np.ascontiguousarray(np.clip(np.rint(p), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


def normalization_in(props: dict[str, str], where: object = "the model") -> Normalization | None:
    """The normalization recorded in an ONNX file's metadata_props (None when it records none)."""
    if META_MEAN not in props or META_STD not in props:
        return None
    try:
        return Normalization(tuple(json.loads(props[META_MEAN])), tuple(json.loads(props[META_STD])))
    except (ValueError, TypeError):
        raise EdgecvError(f"{where}: its {META_MEAN}/{META_STD} metadata is not a list of numbers") from None
