"""Model registry: `torchvision:<builder>`, `edgecv:<name>`, or `package.module:factory`.

`build_model` returns a float nn.Module adapted to the dataset: input channels, number of classes,
and (for torchvision nets on images smaller than 64 px) a CIFAR-style stem.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from edgecv.errors import EdgecvError
from edgecv.models.adapt import adapt_model
from edgecv.models.small import resnet8, resnet20
from edgecv.models.weights import ensure_cached
from edgecv.registry import Registry

EDGECV_MODELS: Registry[Callable[..., nn.Module]] = Registry("edgecv model")
EDGECV_MODELS.register("resnet8", resnet8)
EDGECV_MODELS.register("resnet20", resnet20)


def list_models(source: str = "edgecv") -> list[str]:
    if source == "edgecv":
        return [f"edgecv:{n}" for n in EDGECV_MODELS.names()]
    import torchvision

    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    weights: str | None = None,
    width: int | None = None,
    small_input_stem: bool | None = None,
    stem_stride: int | None = None,
) -> nn.Module:
    """Build `name` for `num_classes` classes of `in_channels` x `image_size`^2 images."""
    source, sep, rest = name.partition(":")
    if not sep or not rest:
        raise EdgecvError(
            f"model.name {name!r} must be 'torchvision:<builder>', 'edgecv:<name>' or 'package.module:factory'"
        )
    if source == "edgecv":
        factory = EDGECV_MODELS.get(rest)
        if weights:
            raise EdgecvError("model.weights is only supported for torchvision models")
        kwargs = {"num_classes": num_classes, "in_channels": in_channels}
        if width is not None:
            kwargs["width"] = width
        if stem_stride is not None:
            kwargs["stem_stride"] = stem_stride
        return factory(**kwargs)
    if width is not None or stem_stride is not None:
        raise EdgecvError(f"model.width and model.stem_stride apply to edgecv nets only, not {name!r}")
    if source == "torchvision":
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if rest not in available:
            import difflib

            close = difflib.get_close_matches(rest, available, n=1)
            hint = f" (did you mean 'torchvision:{close[0]}'?)" if close else ""
            raise EdgecvError(f"model.name: torchvision has no classification model {rest!r}{hint}")
        try:
            if weights:
                ensure_cached(rest, weights)  # downloaded, or one line naming the file the cache lacks
            model = torchvision.models.get_model(rest, weights=weights)
        except (ValueError, KeyError) as exc:
            raise EdgecvError(f"model.weights {weights!r} is not valid for {rest}: {exc}") from None
        except (OSError, RuntimeError) as exc:  # weights not cached and no network
            raise EdgecvError(f"model.weights {weights!r}: could not load ({exc})") from None
        return adapt_model(model, num_classes, in_channels, image_size, small_input_stem)
    # package.module:factory
    try:
        module = importlib.import_module(source)
    except ImportError as exc:
        raise EdgecvError(f"model.name {name!r}: cannot import {source!r} ({exc})") from None
    factory = getattr(module, rest, None)
    if not callable(factory):
        raise EdgecvError(f"model.name {name!r}: {source!r} has no callable {rest!r}")
    model = factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise EdgecvError(f"model.name {name!r}: factory returned {type(model).__name__}, not a torch module")
    return adapt_model(model, num_classes, in_channels, image_size, small_input_stem)
