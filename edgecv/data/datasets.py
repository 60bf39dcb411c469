"""Datasets by name. A factory takes the recipe's `data` section and returns a `DataBundle`."""

from __future__ import annotations

import gzip
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgecv.data.bundle import DATASETS, DataBundle, dataset
from edgecv.data.config import DataConfig, option
from edgecv.errors import EdgecvError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: the device-side commands import this package
# (dataset names, Fashion-MNIST files) on machines without torch.

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def build_data(cfg: DataConfig, root: str | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
               device: str = "cpu") -> DataBundle:
    """Build the dataset named by `cfg.dataset`; `root` (from --data) overrides `cfg.root`. `rank` and
    `world_size` shard the training data; `device` is where training runs (pinned memory, GPU decoding)."""
    factory = DATASETS.get(cfg.dataset)
    extra = {"device": device} if "device" in inspect.signature(factory).parameters else {}
    return factory(cfg, root or cfg.root, seed=seed, rank=rank, world_size=world_size, **extra)


# --------------------------------------------------------------------------- fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array of a gzipped IDX file (Fashion-MNIST's format: images N x H x W, labels N)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise EdgecvError(f"{path}: not a readable gzip IDX file ({exc})") from None
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise EdgecvError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise EdgecvError(f"{path}: truncated IDX file")
    return arr.reshape(dims)


def _has_fashion_mnist(folder: Path) -> bool:
    return all((folder / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair)


def find_fashion_mnist(root: str | None) -> Path:
    """--data / recipe root if given (must hold the files); else the Debian package; else $EDGECV_DATA;
    else ./data/fashion-mnist, downloaded with torchvision where the machine is online."""
    if root:
        folder = Path(root).expanduser()
        for candidate in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
            if _has_fashion_mnist(candidate):
                return candidate
        if not folder.exists():
            raise EdgecvError(f"data folder {str(folder)!r} does not exist")
        raise EdgecvError(
            f"data folder {str(folder)!r} has no Fashion-MNIST files ({FASHION_MNIST_FILES['train'][0]}, ...)"
        )
    candidates = [FASHION_MNIST_DEBIAN]
    if os.environ.get("EDGECV_DATA"):
        env = Path(os.environ["EDGECV_DATA"]).expanduser()
        candidates += [env, env / "fashion-mnist"]
    local = Path("data") / "fashion-mnist"
    candidates.append(local)
    for c in candidates:
        if _has_fashion_mnist(c):
            return c
    return download_fashion_mnist(local)


def download_fashion_mnist(folder: Path) -> Path:
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(folder.parent / "_torchvision"), download=True)
    except Exception as exc:  # offline, blocked, ...
        raise EdgecvError(
            "Fashion-MNIST not found (looked in /usr/share/datasets/fashion-mnist, $EDGECV_DATA, ./data) and the "
            f"download failed ({type(exc).__name__}); install it with 'apt-get install dataset-fashion-mnist' "
            "or pass --data DIR"
        ) from None
    raw = folder.parent / "_torchvision" / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for pair in FASHION_MNIST_FILES.values():
        for f in pair:
            os.replace(raw / f, folder / f)
    return folder


def _subset(images: torch.Tensor, labels: torch.Tensor, limit: int | None):
    return (images[:limit], labels[:limit]) if limit else (images, labels)


@dataset("fashion-mnist")
def fashion_mnist(cfg: DataConfig, root: str | None, seed: int = 0, rank: int = 0, world_size: int = 1) -> DataBundle:
    import torch

    folder = find_fashion_mnist(root)
    arrays = {}
    for split, (img_f, lbl_f) in FASHION_MNIST_FILES.items():
        images = torch.from_numpy(read_idx(folder / img_f).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(folder / lbl_f).astype(np.int64))
        if cfg.image_size != 28:
            images = torch.nn.functional.interpolate(
                images.float(), size=cfg.image_size, mode="bilinear", align_corners=False
            ).round().clamp(0, 255).to(torch.uint8)
        arrays[split] = (images, labels)
    mean, std = (0.2860,), (0.3530,)
    return _tensor_bundle("fashion-mnist", cfg, arrays, mean, std, seed, rank, world_size,
                          FASHION_MNIST_CLASSES, source=str(folder))


def _tensor_bundle(name, cfg, arrays, mean, std, seed, rank, world_size, class_names, source="") -> DataBundle:
    from edgecv.data.loaders import TensorLoader

    tr_x, tr_y = _subset(*arrays["train"], cfg.limit_train)
    va_x, va_y = _subset(*arrays["val"], cfg.limit_val)
    train = TensorLoader(tr_x, tr_y, cfg.batch_size, mean, std, shuffle=True, augment=cfg.augment,
                         seed=seed, rank=rank, world_size=world_size,
                         drop_last=len(tr_y) // world_size > cfg.batch_size)
    calib = TensorLoader(tr_x, tr_y, cfg.batch_size, mean, std, shuffle=True, seed=seed + 1)
    val = TensorLoader(va_x, va_y, cfg.eval_batch_size, mean, std)
    val_shard = None if world_size == 1 else TensorLoader(va_x, va_y, cfg.eval_batch_size, mean, std, rank=rank,
                                                          world_size=world_size, equal_shards=False)
    return DataBundle(name, train, val, len(class_names), tr_x.shape[1], tr_x.shape[-1], class_names, calib, source,
                      tuple(mean), tuple(std), val_shard)


# --------------------------------------------------------------------------- synthetic


def synthetic_arrays(num_classes: int, channels: int, size: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic images: each class is a smooth random template; samples add noise and a shift.
    Learnable in a few epochs, so tests can check that training improves accuracy."""
    import torch

    g = torch.Generator().manual_seed(1234)  # templates are the same for train and val
    low = torch.rand(num_classes, channels, 3, 3, generator=g).round()  # high-contrast 3x3 patterns
    templates = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    gs = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=gs)]
    noise = torch.rand(n, channels, size, size, generator=gs)
    images = 0.75 * templates[labels] + 0.25 * noise
    return (images * 255).round().clamp(0, 255).to(torch.uint8), labels


@dataset("synthetic", options=("num_classes", "channels", "train_size", "val_size"))
def synthetic(cfg: DataConfig, root: str | None, seed: int = 0, rank: int = 0, world_size: int = 1) -> DataBundle:
    classes, channels = option(cfg.num_classes, 10), option(cfg.channels, 3)
    arrays = {
        "train": synthetic_arrays(classes, channels, cfg.image_size, option(cfg.train_size, 512), 1),
        "val": synthetic_arrays(classes, channels, cfg.image_size, option(cfg.val_size, 256), 2),
    }
    mean, std = (0.5,) * channels, (0.25,) * channels
    names = [f"class{i}" for i in range(classes)]
    return _tensor_bundle("synthetic", cfg, arrays, mean, std, seed, rank, world_size, names, source="generated")


# --------------------------------------------------------------------------- imagefolder


@dataset("imagefolder", options=("workers", "pin_memory", "persistent_workers", "prefetch_factor", "gpu_decode",
                                  "resize_size", "interpolation", "mean", "std", "auto_augment", "random_erase"))
def imagefolder(cfg: DataConfig, root: str | None, seed: int = 0, rank: int = 0, world_size: int = 1,
                device: str = "cpu") -> DataBundle:
    """ImageNet layout: `root/train/<class>/*.JPEG`, `root/val/<class>/*.JPEG` (see edgecv.data.imagefolder)."""
    from edgecv.data.imagefolder import build_imagefolder

    return build_imagefolder(cfg, root, seed, rank, world_size, device)


# DATASETS and DataBundle live in edgecv.data.bundle; LimitedLoader in edgecv.data.loaders (torch)
__all__ = ["DATASETS", "DataBundle", "build_data", "synthetic_arrays"]
