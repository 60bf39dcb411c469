"""ImageNet-style preprocessing: the standard training and validation transforms, and the preprocessing
torchvision weights were trained with (their `transforms()` preset), as `data` keys.

train: RandomResizedCrop(image_size) + horizontal flip [+ an auto-augment policy] -> normalize [-> erase]
val:   resize the shorter side to resize_size (default image_size / 0.875, i.e. 256 for 224) -> center crop

torchvision is imported inside the functions: this module loads without torch.
"""

from __future__ import annotations

from typing import Any

from edgecv.data.config import DataConfig
from edgecv.data.timm_preset import timm_preprocessing
from edgecv.errors import EdgecvError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # 224 / 256: the center crop's share of the resized validation image


def resize_size(cfg: DataConfig) -> int:
    """The validation resize: `data.resize_size`, else image_size / 0.875."""
    return cfg.resize_size or int(round(cfg.image_size / CROP_FRACTION))


def normalization(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD)


def interpolation_mode(cfg: DataConfig):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode((cfg.interpolation or "bilinear").lower())


def auto_augment_policy(name: str, interpolation):
    from torchvision import transforms as T

    if name == "imagenet":
        return T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=interpolation)
    if name == "randaugment":
        return T.RandAugment(num_ops=2, magnitude=9, interpolation=interpolation)
    return T.TrivialAugmentWide(interpolation=interpolation)


def train_transform(cfg: DataConfig, to_tensor: bool = True):
    """The training transform of a PIL image (or of a uint8 CHW tensor with `to_tensor=False`):
    random resized crop and flip with `data.augment`, else the validation transform."""
    from torchvision import transforms as T

    if not cfg.augment:
        return val_transform(cfg, to_tensor)
    interpolation = interpolation_mode(cfg)
    steps: list[Any] = [T.RandomResizedCrop(cfg.image_size, interpolation=interpolation, antialias=True),
                        T.RandomHorizontalFlip()]
    if cfg.auto_augment:
        steps.append(auto_augment_policy(cfg.auto_augment, interpolation))
    steps += _to_normalized(cfg, to_tensor)
    if cfg.random_erase:
        steps.append(T.RandomErasing(p=cfg.random_erase))
    return T.Compose(steps)


def val_transform(cfg: DataConfig, to_tensor: bool = True):
    """Resize the shorter side to `resize_size(cfg)`, center-crop `image_size`, normalize."""
    from torchvision import transforms as T

    steps = [T.Resize(resize_size(cfg), interpolation=interpolation_mode(cfg), antialias=True),
             T.CenterCrop(cfg.image_size), *_to_normalized(cfg, to_tensor)]
    return T.Compose(steps)


def _to_normalized(cfg: DataConfig, to_tensor: bool) -> list:
    import torch
    from torchvision import transforms as T

    mean, std = normalization(cfg)
    first = T.ToTensor() if to_tensor else T.ConvertImageDtype(torch.float32)
    return [first, T.Normalize(mean, std)]


def weights_preprocessing(builder: str, weights: str, image_size: int) -> dict[str, Any]:
    """The `data` keys that reproduce torchvision weights' own preprocessing (`Weights.transforms()`)
    at `image_size`: interpolation, mean, std, and the validation resize scaled by image_size / crop
    (equal to the preset's resize_size when image_size is its crop size, e.g. 256 for 224)."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(builder)
        preset = enum[weights].transforms()
    except (ValueError, KeyError):
        try:
            choices = ", ".join(w.name for w in get_model_weights(builder))
        except ValueError:
            choices = "none"
        raise EdgecvError(f"model.weights {weights!r} is neither a file nor one of torchvision {builder}'s weights "
                          f"({choices})") from None
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    return {
        "resize_size": int(round(image_size * resize / crop)),
        "interpolation": preset.interpolation.value,
        "mean": tuple(float(v) for v in preset.mean),
        "std": tuple(float(v) for v in preset.std),
    }


def with_weights_preprocessing(cfg: DataConfig, model_name: str, weights: str | None) -> DataConfig:
    """`cfg` with the preprocessing of the torchvision weights the model starts from, or of a timm model's
    pretrained_cfg (image size included), for the keys the recipe left unset (a key the recipe sets wins).
    Other datasets and models are returned unchanged."""
    source, _, builder = model_name.partition(":")
    if cfg.dataset != "imagefolder":
        return cfg
    if source == "timm":  # a timm model declares its preprocessing, weights or not
        preset = timm_preprocessing(builder, cfg.image_size if "image_size" in cfg.model_fields_set else None)
        return cfg.model_copy(update={k: v for k, v in preset.items() if k == "image_size" or getattr(cfg, k) is None})
    if not weights or source != "torchvision":
        return cfg
    preset = weights_preprocessing(builder, weights, cfg.image_size)
    return cfg.model_copy(update={k: v for k, v in preset.items() if getattr(cfg, k) is None})
