"""`timm:<name>`: a timm model built as timm builds it, for the data's class count and channels.

Never a download: `pretrained=True` is never passed; trained weights come from `model.weights: PATH`
(a timm `train.py` checkpoint's `state_dict_ema` included, see models/user_weights.py). Nothing is adapted
behind the user's back: no small-input stem swap, no pooling change.
"""

from __future__ import annotations

from torch import nn

from edgecv.data.timm_preset import check_timm_name, require_timm
from edgecv.errors import EdgecvError


def build_timm(builder: str, num_classes: int, in_channels: int = 3, small_input_stem: bool | None = None) -> nn.Module:
    """timm.create_model(builder, pretrained=False, num_classes=..., in_chans=...)."""
    timm = require_timm(f"timm:{builder}")
    check_timm_name(timm, builder)
    if small_input_stem:
        raise EdgecvError(f"model.small_input_stem applies to torchvision nets only; timm:{builder} is built as "
                          "timm builds it (set model.small_input_stem: null)")
    try:
        return timm.create_model(builder, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except (RuntimeError, ValueError, TypeError) as exc:  # a tag the architecture lacks, an option it refuses
        raise EdgecvError(f"model.name 'timm:{builder}': timm cannot build it ({exc})") from None


def hub_weights_refused(builder: str, weights: str) -> EdgecvError:
    """The error for timm's own named weights: edgecv downloads none; a local file goes in model.weights."""
    return EdgecvError(
        f"model.weights {weights!r}: timm's hub weights are not loaded by name (edgecv downloads nothing); give "
        f"the path of a weights file, e.g. the model.safetensors of timm/{builder} in your Hugging Face cache "
        f"(~/.cache/huggingface/hub/models--timm--{builder}.<tag>/snapshots/*/model.safetensors)")
