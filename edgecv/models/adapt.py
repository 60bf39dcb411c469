"""Adapt a classification net to a dataset: class count (whatever the head), input channels, a small-image
stem, and pooling that ONNX can export at the dataset's image size."""

from __future__ import annotations

import torch
from torch import nn

from edgecv.models.layers import FixedAdaptiveAvgPool2d

WEIGHTED = (nn.Conv2d, nn.Linear)
# torchvision's auxiliary classifiers (GoogLeNet, Inception v3): attributes and the switch that enables them
AUX_HEADS = ("aux1", "aux2", "AuxLogits")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return (*_parent(model, name), module)
    return None


def find_classifier(model: nn.Module) -> tuple[str, nn.Conv2d | nn.Linear] | None:
    """The layer that produces the class scores, by module order: the last Linear or Conv2d, whether it is
    a Linear (ResNet), inside a Sequential (MobileNet, VGG) or a 1x1 convolution (SqueezeNet)."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED) and name:
            found = (name, module)
    return found


def executed_classifier(model: nn.Module, example_input: torch.Tensor) -> tuple[str, nn.Module] | None:
    """The last Conv2d/Linear that runs in `model(example_input)` (eval mode): the layer whose outputs are
    the class scores, found by running the model rather than by module order."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, WEIGHTED) and n}
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod)) for m in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return (names[order[-1]], order[-1]) if order else None


def _new_head(layer: nn.Conv2d | nn.Linear, num_classes: int) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    return nn.Conv2d(
        layer.in_channels, num_classes, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, bias=layer.bias is not None,
    )  # fmt: skip


def _out_count(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def adapt_head(model: nn.Module, num_classes: int) -> None:
    """Give the classifier `num_classes` outputs, and drop torchvision's auxiliary heads: they return a
    tuple in training mode, which edgecv's one-output training loop, pruning and export do not take
    (torchvision drops them the same way when pretrained weights are loaded without them)."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in AUX_HEADS:
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)
    head = find_classifier(model)
    if head is not None and _out_count(head[1]) != num_classes:
        parent, attr = _parent(model, head[0])
        setattr(parent, attr, _new_head(head[1], num_classes))
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes  # SqueezeNet keeps its class count here too


def replace_classifier(model: nn.Module) -> None:
    """A fresh, untrained classifier of the same shape in place of the current one (`model.head: new`)."""
    head = find_classifier(model)
    if head is not None:
        parent, attr = _parent(model, head[0])
        setattr(parent, attr, _new_head(head[1], _out_count(head[1])))


def _pair(size) -> tuple[int | None, int | None]:
    return (size, size) if isinstance(size, int) or size is None else tuple(size)


def make_pools_exportable(model: nn.Module, in_channels: int, image_size: int) -> list[str]:
    """Replace each AdaptiveAvgPool2d whose output size does not divide its input size at `image_size`
    (VGG and AlexNet below 224 px) with the same pooling written in exportable ops; returns their names.
    Costs one forward pass, and only for models that have such a pool."""
    pools = {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) != (1, 1)
    }  # fmt: skip
    if not pools:
        return []
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            sizes.setdefault(name, tuple(args[0].shape[-2:]))

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in pools.items()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, image_size, image_size))
    except Exception:  # noqa: BLE001 - a model that does not run at this size is reported by the caller's checks
        return []
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    replaced = []
    for name, (h, w) in sizes.items():
        oh, ow = _pair(pools[name].output_size)
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            parent, attr = _parent(model, name)
            setattr(parent, attr, FixedAdaptiveAvgPool2d((h, w), (oh, ow)))
            replaced.append(name)
    return replaced


def adapt_stem(model: nn.Module, in_channels: int, image_size: int, small_input_stem: bool | None) -> None:
    """The first conv reads `in_channels`; on images under 64 px (or when asked) the stem gets stride 1 and
    no max-pool, as CIFAR nets do."""
    if in_channels != 3 and getattr(model, "transform_input", False):
        model.transform_input = False  # GoogLeNet / Inception re-normalize exactly three channels
    stem = _first_conv(model)
    if stem is None:
        return
    parent, attr, conv = stem
    small = image_size < 64 if small_input_stem is None else small_input_stem
    if conv.in_channels != in_channels or small:
        new = nn.Conv2d(
            in_channels,
            conv.out_channels,
            kernel_size=3 if small else conv.kernel_size,
            stride=1 if small else conv.stride,
            padding=1 if small else conv.padding,
            bias=conv.bias is not None,
        )
        if not small and conv.in_channels == 3 and in_channels == 1:
            with torch.no_grad():  # keep pretrained filters: grey = sum of the RGB filters
                new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        setattr(parent, attr, new)
    if small and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()


def adapt_model(
    model: nn.Module,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    small_input_stem: bool | None = None,
) -> nn.Module:
    """Adapt `model` for `num_classes` classes of `in_channels` x `image_size`^2 images (see adapt_head,
    adapt_stem and make_pools_exportable)."""
    adapt_head(model, num_classes)
    adapt_stem(model, in_channels, image_size, small_input_stem)
    make_pools_exportable(model, in_channels, image_size)
    return model
