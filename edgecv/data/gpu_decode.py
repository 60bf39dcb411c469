"""JPEG decoding on the GPU (`data.gpu_decode`): workers only read file bytes; the training process
decodes each batch with nvJPEG (`torchvision.io.decode_jpeg(..., device="cuda")`) and crops, flips and
normalizes it there, which frees the CPU cores that otherwise limit ImageNet throughput.

Files nvJPEG cannot take (CMYK or progressive JPEGs, PNGs named .JPEG, as ImageNet has a few of) are
decoded on the CPU; a file neither can decode is skipped like any unreadable image. On a CPU device the
same path decodes on the CPU, so it runs (and is tested) without a GPU.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from edgecv.data.config import DataConfig
from edgecv.data.transforms import auto_augment_policy, interpolation_mode, normalization, resize_size
from edgecv.data.unreadable import Skipped, reason
from edgecv.device import is_cuda


def _quietly(fn, *args, **kwargs):
    """torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def decode_images(raws: list[torch.Tensor], device: str) -> list[torch.Tensor | Exception]:
    """uint8 CHW RGB images on `device`, one per encoded file, or the error that file raised. On CUDA
    the whole batch goes to nvJPEG in one call; a failure retries file by file, then on the CPU."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    rgb = ImageReadMode.RGB
    if is_cuda(device) and raws:
        try:
            return list(_quietly(decode_jpeg, raws, mode=rgb, device=device))
        except RuntimeError:
            pass  # one file in the batch is not for nvJPEG: find it below
    out: list[torch.Tensor | Exception] = []
    for raw in raws:
        try:
            if is_cuda(device):
                try:
                    out.append(_quietly(decode_jpeg, raw, mode=rgb, device=device))
                    continue
                except RuntimeError:
                    pass
            out.append(_quietly(decode_image, raw, mode=rgb).to(device))
        except (RuntimeError, ValueError) as exc:
            out.append(exc)
    return out


class BatchDecoder:
    """`(raws, labels) -> (images, labels, skipped)` for one split: the training transform (random
    resized crop, flip, optional auto-augment and erasing) or the validation one (resize, center crop),
    applied on `device` to decoded uint8 tensors, then normalized as float32."""

    def __init__(self, cfg: DataConfig, train: bool, device: str) -> None:
        self.device = device if is_cuda(device) else "cpu"
        self.per_image, self.erase = _tensor_transforms(cfg, train and cfg.augment)
        mean, std = normalization(cfg)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, raws: list[tuple[torch.Tensor, str]], labels: torch.Tensor) -> tuple[Any, torch.Tensor, list[Skipped]]:
        decoded = decode_images([r for r, _ in raws], self.device)
        keep = [i for i, img in enumerate(decoded) if isinstance(img, torch.Tensor)]
        skipped = [(raws[i][1], reason(img)) for i, img in enumerate(decoded) if not isinstance(img, torch.Tensor)]
        if not keep:
            return torch.empty(0, device=self.device), labels[:0], skipped
        images = torch.stack([self.per_image(decoded[i]) for i in keep]).float().div_(255.0)
        images = (images - self.mean) / self.std
        if self.erase is not None:
            images = torch.stack([self.erase(img) for img in images])
        return images, labels[keep].to(self.device, non_blocking=True), skipped


def _tensor_transforms(cfg: DataConfig, train: bool):
    """(per-image uint8 transform, per-image erasing or None), with torchvision.transforms.v2 (tensors on
    any device)."""
    from torchvision.transforms import v2

    interpolation = interpolation_mode(cfg)
    if not train:
        return v2.Compose([v2.Resize(resize_size(cfg), interpolation=interpolation, antialias=True),
                           v2.CenterCrop(cfg.image_size)]), None
    steps = [v2.RandomResizedCrop(cfg.image_size, interpolation=interpolation, antialias=True),
             v2.RandomHorizontalFlip()]
    if cfg.auto_augment:
        steps.append(auto_augment_policy(cfg.auto_augment, interpolation))
    erase = v2.RandomErasing(p=cfg.random_erase) if cfg.random_erase else None
    return v2.Compose(steps), erase
