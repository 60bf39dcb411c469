"""Model registry: `torchvision:<builder>`, `timm:<name>` (the timm extra), `edgecv:<name>`, or
`package.module:factory`.

`build_model` returns a float nn.Module adapted to the dataset: input channels, number of classes,
and (for torchvision nets on images smaller than 64 px) a CIFAR-style stem. `model.weights` is a torchvision
weights enum name (IMAGENET1K_V1) or a file of the user's own trained weights (`edgecv.models.user_weights`),
loaded into the builder's own architecture.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from edgecv.data.timm_preset import require_timm
from edgecv.errors import EdgecvError
from edgecv.models.adapt import adapt_model
from edgecv.models.small import resnet8, resnet20
from edgecv.models.timm_models import build_timm, hub_weights_refused
from edgecv.models.user_weights import WeightsLoad, is_weights_file, load_user_weights
from edgecv.models.weights import ensure_cached
from edgecv.registry import Registry

EDGECV_MODELS: Registry[Callable[..., nn.Module]] = Registry("edgecv model")
EDGECV_MODELS.register("resnet8", resnet8)
EDGECV_MODELS.register("resnet20", resnet20)


def list_models(source: str = "edgecv") -> list[str]:
    if source == "edgecv":
        return [f"edgecv:{n}" for n in EDGECV_MODELS.names()]
    if source == "timm":
        return [f"timm:{n}" for n in require_timm("timm:").list_models()]
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
    head: str = "keep",
) -> nn.Module:
    """Build `name` for `num_classes` classes of `in_channels` x `image_size`^2 images; `weights` is a
    torchvision weights enum name or a weights file (see `build_with_weights`)."""
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, "width": width,
              "small_input_stem": small_input_stem, "stem_stride": stem_stride}
    return build_with_weights(name, weights, head, **kwargs)[0]


def build_with_weights(name: str, weights: str | None, head: str = "keep",
                       **kwargs) -> tuple[nn.Module, WeightsLoad | None]:
    """(the model, what loading its weights file did or None). A weights file is loaded into the builder's
    own architecture (a small-input stem only where `small_input_stem` asks for it); only `head: new`
    leaves the classifier out of the load."""
    if is_weights_file(weights):
        if kwargs.get("small_input_stem") is None:
            kwargs["small_input_stem"] = False
        model = _build(name, None, **kwargs)
        return model, load_user_weights(model, weights, head, name)
    model = _build(name, weights, **kwargs)
    if head == "new" and weights:
        from edgecv.models.adapt import replace_classifier

        replace_classifier(model)
    return model, None


def _build(
    name: str,
    weights: str | None,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    width: int | None = None,
    small_input_stem: bool | None = None,
    stem_stride: int | None = None,
) -> nn.Module:
    source, sep, rest = name.partition(":")
    if not sep or not rest:
        raise EdgecvError(
            f"model.name {name!r} must be 'torchvision:<builder>', 'timm:<name>', 'edgecv:<name>' or "
            "'package.module:factory'"
        )
    if weights and source == "timm":
        raise hub_weights_refused(rest, weights)
    if weights and source != "torchvision":
        raise EdgecvError(f"model.weights {weights!r} is not a file, and only torchvision models have named "
                          f"weights: give the path of a state dict (.pt, .pth, .bin, .safetensors) for {name}")
    if source == "edgecv":
        factory = EDGECV_MODELS.get(rest)
        kwargs = {"num_classes": num_classes, "in_channels": in_channels}
        if width is not None:
            kwargs["width"] = width
        if stem_stride is not None:
            kwargs["stem_stride"] = stem_stride
        return factory(**kwargs)
    if width is not None or stem_stride is not None:
        raise EdgecvError(f"model.width and model.stem_stride apply to edgecv nets only, not {name!r}")
    if source == "timm":
        return build_timm(rest, num_classes, in_channels, small_input_stem)
    if source == "torchvision":
        model = _torchvision(rest, weights)
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


def _torchvision(builder: str, weights: str | None) -> nn.Module:
    """torchvision's `builder`, with the named weights `weights` (an enum name, not a file) if given."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if builder not in available:
        import difflib

        close = difflib.get_close_matches(builder, available, n=1)
        hint = f" (did you mean 'torchvision:{close[0]}'?)" if close else ""
        raise EdgecvError(f"model.name: torchvision has no classification model {builder!r}{hint}")
    try:
        if weights:
            ensure_cached(builder, weights)  # downloaded, or one line naming the file the cache lacks
        return torchvision.models.get_model(builder, weights=weights)
    except (ValueError, KeyError):
        try:
            names = ", ".join(w.name for w in torchvision.models.get_model_weights(builder))
        except ValueError:
            names = "it has none"
        raise EdgecvError(f"model.weights {weights!r} is neither a file nor one of torchvision {builder}'s "
                          f"weights names ({names})") from None
    except (OSError, RuntimeError) as exc:  # weights not cached and no network
        raise EdgecvError(f"model.weights {weights!r}: could not load ({exc})") from None
