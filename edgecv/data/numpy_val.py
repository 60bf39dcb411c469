"""Validation batches as numpy arrays, without torch: what the device-side commands (`eval`, `bench`) read.

The values are the torch path's, computed the same way: Fashion-MNIST from its IDX files (resized like
`torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` when image_size != 28); ImageFolder
with torchvision's evaluation transform done in PIL (shorter side to image_size / 0.875, centre crop,
ImageNet mean / std), files listed in ImageFolder's order. The synthetic dataset is generated with torch
and has no numpy path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecv.data.config import DataConfig
from edgecv.errors import EdgecvError

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder lists
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class NumpyVal:
    """(images float32 NCHW, labels int64) batches of a validation split, `batch_size` images at a time."""

    name: str
    images: np.ndarray | None  # in-memory uint8 N x C x H x W (Fashion-MNIST), or None (files, read lazily)
    labels: np.ndarray
    batch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # ImageFolder: one path per label
    image_size: int = 0
    resize: int = 0  # ImageFolder: the shorter side before the centre crop (data.resize_size)
    interpolation: str = "bilinear"
    skipped: list[str] = field(default_factory=list)  # files PIL could not read (left out of the batches)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            if self.images is not None:
                images, labels = self.images[start:stop], self.labels[start:stop]
            else:
                images, labels = self._read_files(start, stop)
                if not len(labels):
                    continue
            x = images.astype(np.float32) / np.float32(255.0)
            yield (x - mean) / std, labels

    def _read_files(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        pixels, labels = [], []
        for path, label in zip(self.files[start:stop], self.labels[start:stop], strict=True):
            image = read_eval_image(path, self.image_size, self.resize, self.interpolation)
            if image is None:
                self.skipped.append(path)
                continue
            pixels.append(image)
            labels.append(label)
        if not pixels:
            return np.zeros((0, 3, self.image_size, self.image_size), np.uint8), np.zeros(0, np.int64)
        return np.stack(pixels), np.asarray(labels, dtype=np.int64)


def reads_like_torch(cfg: DataConfig) -> bool:
    """Whether the numpy reader gives exactly the torch path's batches for `cfg` (measured: ImageFolder,
    both PIL; Fashion-MNIST at its native 28 px, where nothing is resized)."""
    return cfg.dataset == "imagefolder" or (cfg.dataset == "fashion-mnist" and cfg.image_size == 28)


def numpy_val(cfg: DataConfig, root: str | None) -> NumpyVal:
    """The validation split of `cfg.dataset` read without torch; a dataset without a numpy reader (the
    synthetic one, generated with torch) is a one-line error."""
    if cfg.dataset == "fashion-mnist":
        return _fashion_mnist(cfg, root)
    if cfg.dataset == "imagefolder":
        return _imagefolder(cfg, root)
    raise EdgecvError(
        f"data.dataset {cfg.dataset!r} is generated with torch, which is not installed here: evaluate on a "
        "fashion-mnist or imagefolder dataset (--recipe), or bench with --no-accuracy"
    )


# ----------------------------------------------------------------------------------------- Fashion-MNIST
def _fashion_mnist(cfg: DataConfig, root: str | None) -> NumpyVal:
    from edgecv.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, find_fashion_mnist, read_idx

    folder = find_fashion_mnist(root)
    img_file, lbl_file = FASHION_MNIST_FILES["val"]
    images = read_idx(folder / img_file)[:, None]
    labels = read_idx(folder / lbl_file).astype(np.int64)
    if cfg.limit_val:
        images, labels = images[: cfg.limit_val], labels[: cfg.limit_val]
    if cfg.image_size != 28:
        images = resize_bilinear_uint8(images, cfg.image_size)
    return NumpyVal("fashion-mnist", images, labels, cfg.eval_batch_size, (0.2860,), (0.3530,),
                    list(FASHION_MNIST_CLASSES), image_size=cfg.image_size)


def _source_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source indices and weights along one axis (align_corners=False, half-pixel centres):
    src = in / out * (dst + 0.5) - 0.5, clamped at 0, in float32."""
    if in_size == out_size:
        idx = np.arange(out_size)
        return idx, idx, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    ratio = np.float32(in_size) / np.float32(out_size)
    src = ratio * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lambda1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (np.float32(1.0) - lambda1).astype(np.float32), lambda1


def resize_bilinear_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """N x C x H x W uint8 -> N x C x size x size, like `F.interpolate(x.float(), size, mode="bilinear",
    align_corners=False).round().clamp(0, 255).to(torch.uint8)`: the same pixels where the weights are
    exact in float32 (28 -> 14, 16, 20, 32, 56, 64, ... measured), otherwise a few pixels one grey level
    apart (torch's kernel rounds its weights differently: 32 of 162,450 pixels at 28 -> 57)."""
    x = images.astype(np.float32)
    h0, h1, hw0, hw1 = _source_indices(x.shape[2], size)
    w0, w1, ww0, ww1 = _source_indices(x.shape[3], size)
    # width first, then height: the order of the kernel's sums (float32 rounding follows it)
    top = x[:, :, h0][:, :, :, w0] * ww0 + x[:, :, h0][:, :, :, w1] * ww1
    bottom = x[:, :, h1][:, :, :, w0] * ww0 + x[:, :, h1][:, :, :, w1] * ww1
    out = top * hw0[:, None] + bottom * hw1[:, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- ImageFolder
def list_image_folder(folder: Path) -> tuple[list[str], list[str], list[int]]:
    """(classes, files, labels) in torchvision ImageFolder's order: class folders sorted, then each class's
    files (walked in sorted order, symlinks followed) sorted by name, image extensions only."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise EdgecvError(f"{folder}: no class folders (expected {folder.name}/<class>/*.JPEG)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(folder / name, followlinks=True)):
            for fname in sorted(names):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(dirpath, fname))
                    labels.append(label)
    if not files:
        raise EdgecvError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return classes, files, labels


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(short): the shorter side becomes `short`, the longer
    int(short * long / short_side)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def read_eval_image(path: str, image_size: int, resize: int = 0, interpolation: str = "bilinear") -> np.ndarray | None:
    """One image as torchvision's evaluation transform sees it before ToTensor (3 x size x size uint8):
    RGB, shorter side resized to `resize` (default round(image_size / 0.875)) with `interpolation`,
    centre crop. None if PIL cannot read the file."""
    from PIL import Image, UnidentifiedImageError

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[interpolation.lower()]

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    new_w, new_h = resized_size(img.width, img.height, resize or int(round(image_size / 0.875)))
    if (new_w, new_h) != (img.width, img.height):
        img = img.resize((new_w, new_h), resample)
    if img.width < image_size or img.height < image_size:  # torchvision pads a too-small image with zeros
        canvas = Image.new("RGB", (max(img.width, image_size), max(img.height, image_size)))
        canvas.paste(img, ((canvas.width - img.width) // 2, (canvas.height - img.height) // 2))
        img = canvas
    top = int(round((img.height - image_size) / 2.0))
    left = int(round((img.width - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _imagefolder(cfg: DataConfig, root: str | None) -> NumpyVal:
    from edgecv.data.transforms import normalization, resize_size

    if not root:
        raise EdgecvError("data.root: the imagefolder dataset needs a folder (set data.root or pass --data DIR)")
    folder = Path(root).expanduser() / "val"
    if not folder.is_dir():
        raise EdgecvError(f"data folder {str(folder.parent)!r} has no 'val/' subfolder (expected val/<class>/*.JPEG)")
    classes, files, labels = list_image_folder(folder)
    if cfg.limit_val:
        files, labels = files[: cfg.limit_val], labels[: cfg.limit_val]
    return NumpyVal("imagefolder", None, np.asarray(labels, dtype=np.int64), cfg.eval_batch_size,
                    *normalization(cfg), classes, files, cfg.image_size, resize=resize_size(cfg),
                    interpolation=cfg.interpolation or "bilinear")
