"""The `imagefolder` dataset (ImageNet layout: `root/train/<class>/*.JPEG`, `root/val/<class>/*.JPEG`) and
loaders that survive bad files.

A file that cannot be read or decoded (an interrupted copy, a truncated JPEG) never stops an epoch: it is
skipped, counted, and named in a warning; the training loop writes it to the run log. In training the
next readable file takes its place, so every batch keeps its size and every rank its step count (DDP
needs both); in validation the sample is left out.

This module imports torch and PIL; `edgecv.data.datasets` imports it only when the dataset is built.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from edgecv.console import console
from edgecv.data.bundle import DataBundle
from edgecv.data.config import DataConfig, option
from edgecv.data.transforms import normalization, train_transform, val_transform
from edgecv.data.unreadable import Skipped, reason
from edgecv.device import is_cuda
from edgecv.errors import EdgecvError

# What PIL and torchvision raise for a file that is not a readable image.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, RuntimeError, struct.error, zlib.error,
                Image.DecompressionBombError)
MAX_SKIPS_IN_A_ROW = 32  # more unreadable files in a row than this is a broken dataset, not a bad file
SHOWN_NAMES = 8  # class names listed in the train/val mismatch message

class ImageFiles(Dataset):
    """(image, label, skipped) samples from (path, label) pairs. `replace`: an unreadable file is replaced
    by the next readable one; otherwise the sample's image is None and its batch drops it. `raw`: the
    image is the file's bytes and its path, for decoding on the GPU."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None, replace: bool,
                 raw: bool = False) -> None:
        self.samples, self.transform, self.replace, self.raw = samples, transform, replace, raw

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Any:
        with open(path, "rb") as f:
            if self.raw:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), path
            image = Image.open(f).convert("RGB")  # convert() decodes the whole file: truncation shows here
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, index: int) -> tuple[Any, int, tuple[Skipped, ...]]:
        skipped: list[Skipped] = []
        for step in range(min(MAX_SKIPS_IN_A_ROW, len(self.samples))):
            path, label = self.samples[(index + step) % len(self.samples)]
            try:
                return self._load(path), label, tuple(skipped)
            except IMAGE_ERRORS as exc:
                skipped.append((path, reason(exc)))
                if not self.replace:
                    return None, label, tuple(skipped)
        raise EdgecvError(f"{len(skipped)} unreadable images in a row from {self.samples[index][0]} "
                          f"(last: {skipped[-1][1]}); check the dataset folder")


def collate_skipping(batch: list, raw: bool = False) -> tuple[Any, torch.Tensor, list[Skipped]]:
    """Stack the readable samples of a batch (or list them, `raw`); pass on the skipped files."""
    kept = [(x, y) for x, y, _ in batch if x is not None]
    skipped = [s for _, _, sk in batch for s in sk]
    images: Any = [x for x, _ in kept] if raw else (torch.stack([x for x, _ in kept]) if kept else torch.empty(0))
    return images, torch.tensor([y for _, y in kept], dtype=torch.int64), skipped


class SkippingLoader:
    """Iterate (images, labels) from a DataLoader of `ImageFiles`, optionally decoding raw files with
    `decode(raws, labels) -> (images, labels, skipped)`. Skipped files are warned about once each and kept
    until `take_skipped()` (the training loop logs them per epoch)."""

    def __init__(self, loader: DataLoader, decode: Callable | None = None) -> None:
        self.loader, self.decode = loader, decode
        self.skipped: list[Skipped] = []
        self._warned: set[str] = set()

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    @property
    def sampler(self) -> Sampler:
        return self.loader.sampler

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for images, labels, skipped in self.loader:
                if self.decode is not None:
                    images, labels, more = self.decode(images, labels)
                    skipped = [*skipped, *more]
                self._note(skipped)
                if len(labels):
                    yield images, labels
        except EdgecvError as exc:  # from a worker: the message arrives wrapped in the worker's traceback
            raise EdgecvError(str(exc).strip().splitlines()[-1].split("EdgecvError: ")[-1]) from None

    def _note(self, skipped: list[Skipped]) -> None:
        for path, why in skipped:
            self.skipped.append((path, why))
            if path not in self._warned:
                self._warned.add(path)
                console.print(f"warning: skipped unreadable image {path} ({why})", markup=False, highlight=False)

    def take_skipped(self) -> list[Skipped]:
        """The files skipped since the last call (a file skipped twice is listed twice)."""
        out, self.skipped = self.skipped, []
        return out


class StridedSampler(Sampler[int]):
    """Rank `rank`'s share of `n` samples, in order and without padding (evaluation: every sample counted
    once over all ranks; the shares may differ by one, which evaluation does not mind)."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------- scanning the folder


def class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))


def check_same_classes(base: Path, train: list[str], val: list[str]) -> None:
    """train/ and val/ must hold the same classes (labels are class indices): one line naming both sides."""
    if train == val:
        return

    def names(items: list[str]) -> str:
        more = f" (+{len(items) - SHOWN_NAMES} more)" if len(items) > SHOWN_NAMES else ""
        return (", ".join(items[:SHOWN_NAMES]) or "none") + more

    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    raise EdgecvError(f"data folder {str(base)!r}: train/ and val/ have different classes: "
                      f"only in train/: {names(only_train)}; only in val/: {names(only_val)}")


def scan(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, class index) of every image file, as torchvision's ImageFolder finds them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    try:
        return make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as exc:
        raise EdgecvError(f"{folder}: {str(exc).splitlines()[0]}") from None


def split_folders(root: str | None) -> tuple[Path, list[str]]:
    """The dataset folder and its class names, checked before anything is read."""
    if not root:
        raise EdgecvError("data.root: the imagefolder dataset needs a folder (set data.root or pass --data DIR)")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise EdgecvError(f"data folder {str(base)!r} does not exist")
    found = {}
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise EdgecvError(f"data folder {str(base)!r} has no '{split}/' subfolder (expected {split}/<class>/*.JPEG)")
        found[split] = class_folders(base / split)
    check_same_classes(base, found["train"], found["val"])
    if not found["train"]:
        raise EdgecvError(f"data folder {str(base / 'train')!r} has no class folders")
    return base, found["train"]


# --------------------------------------------------------------------------- loaders


def loader_settings(cfg: DataConfig, device: str) -> dict[str, Any]:
    """DataLoader keyword arguments from the recipe: workers, pinned memory, persistence, prefetch."""
    workers = option(cfg.workers, 0)
    settings: dict[str, Any] = {"num_workers": workers, "pin_memory": option(cfg.pin_memory, is_cuda(device))}
    if workers:
        settings["persistent_workers"] = option(cfg.persistent_workers, True)
        if cfg.prefetch_factor:
            settings["prefetch_factor"] = cfg.prefetch_factor
    return settings


def _loader(dataset: ImageFiles, batch_size: int, sampler: Sampler, settings: dict, drop_last: bool = False,
            seed: int = 0, decode: Callable | None = None) -> SkippingLoader:
    loader = DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last,
                        collate_fn=partial(collate_skipping, raw=dataset.raw),
                        generator=torch.Generator().manual_seed(seed), **settings)
    return SkippingLoader(loader, decode)


def build_imagefolder(cfg: DataConfig, root: str | None, seed: int = 0, rank: int = 0, world_size: int = 1,
                      device: str = "cpu") -> DataBundle:
    """The `imagefolder` DataBundle: train (equal shards per rank), val (all of it), val_shard (this rank's
    part, for evaluation during distributed training) and calib (un-augmented training images)."""
    base, classes = split_folders(root)
    train_samples, val_samples = scan(base / "train", classes), scan(base / "val", classes)
    if cfg.limit_train:
        order = torch.randperm(len(train_samples), generator=torch.Generator().manual_seed(seed))[: cfg.limit_train]
        train_samples = [train_samples[i] for i in order.tolist()]
    if cfg.limit_val:
        val_samples = val_samples[: cfg.limit_val]
    raw = bool(cfg.gpu_decode)
    decode_train = decode_val = None
    if raw:
        from edgecv.data.gpu_decode import BatchDecoder

        decode_train, decode_val = BatchDecoder(cfg, True, device), BatchDecoder(cfg, False, device)
    train_ds = ImageFiles(train_samples, None if raw else train_transform(cfg), replace=True, raw=raw)
    val_ds = ImageFiles(val_samples, None if raw else val_transform(cfg), replace=False, raw=raw)
    calib_ds = ImageFiles(train_samples, val_transform(cfg), replace=True)
    settings = loader_settings(cfg, device)
    one_off = {k: v for k, v in settings.items() if k != "persistent_workers"}  # calibration: a few batches, once
    # equal, padded shards: every rank runs the same number of steps. One process uses the same sampler,
    # so its order is the one a group of ranks shares out (same global batches at any world size).
    sampler = DistributedSampler(train_ds, world_size, rank, shuffle=True, seed=seed)
    train = _loader(train_ds, cfg.batch_size, sampler, settings, len(sampler) > cfg.batch_size, seed + rank,
                    decode_train)
    val = _loader(val_ds, cfg.eval_batch_size, StridedSampler(len(val_ds), 0, 1), settings, decode=decode_val)
    val_shard = val if world_size == 1 else _loader(
        val_ds, cfg.eval_batch_size, StridedSampler(len(val_ds), rank, world_size), settings, decode=decode_val)
    calib_order = torch.Generator().manual_seed(seed + 1)
    calib = _loader(calib_ds, cfg.batch_size, torch.utils.data.RandomSampler(calib_ds, generator=calib_order), one_off)
    mean, std = normalization(cfg)
    return DataBundle("imagefolder", train, val, len(classes), 3, cfg.image_size, classes, calib, str(base),
                      mean, std, val_shard=val_shard)
