"""Real image files on disk for data tests: ImageNet-layout folders of JPEGs (written with PIL), truncated
files, and ImageNet's flat validation layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_jpeg(path: Path, value: int, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """A JPEG of `size` (h, w) around grey level `value`, with seeded noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.full((*size, 3), value, dtype=np.int16)
    noise = rng.integers(-20, 20, size=base.shape)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def make_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6, val_per_class: int | None = None,
                      size: tuple[int, int] = (40, 48)) -> Path:
    """`root/train/<class>/*.JPEG` and `root/val/<class>/*.JPEG`, class i around grey level 60 * i + 30."""
    for split, n in (("train", per_class), ("val", val_per_class or per_class)):
        for i, cls in enumerate(classes):
            for j in range(n):
                write_jpeg(root / split / cls / f"{cls}_{j}.JPEG", 60 * i + 30, size, seed=1000 * i + j + (500 if split == "val" else 0))
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to `keep` of its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
