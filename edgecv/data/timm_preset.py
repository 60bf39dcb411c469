"""timm, the optional model library (`pip install 'edgecv[timm]'`): its import, and the preprocessing a timm
model declares in its `pretrained_cfg` (mean, std, input size, crop fraction, interpolation) as `data` keys.

Kept in one module so timm is imported in one place (models/timm_models.py builds through `require_timm`).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from edgecv.errors import EdgecvError


def require_timm(model_name: str) -> ModuleType:
    """The timm package, or one line saying how to install it."""
    try:
        import timm
    except ImportError:
        raise EdgecvError(f"model.name {model_name!r} needs timm, which is not installed: "
                          "pip install 'edgecv[timm]'") from None
    return timm


def check_timm_name(timm: ModuleType, builder: str) -> None:
    """One line naming the closest timm model when `builder` is none of timm's."""
    if timm.is_model(builder):
        return
    import difflib

    close = difflib.get_close_matches(builder, timm.list_models(), n=1, cutoff=0.5)
    hint = f" (did you mean 'timm:{close[0]}'?)" if close else ""
    raise EdgecvError(f"model.name: timm has no model {builder!r}{hint}")


def timm_preprocessing(builder: str, image_size: int | None) -> dict[str, Any]:
    """The `data` keys of timm model `builder`'s pretrained_cfg: image_size (its input size, when
    `image_size` is None), mean, std, interpolation, and the validation resize as timm computes it
    (floor(image_size / crop_pct), e.g. 256 for 224 at 0.875)."""
    timm = require_timm(f"timm:{builder}")
    check_timm_name(timm, builder)
    try:
        cfg = timm.models.get_pretrained_cfg(builder)
    except RuntimeError as exc:  # a name.tag whose tag the architecture lacks
        raise EdgecvError(f"model.name 'timm:{builder}': {exc}") from None
    if cfg is None:
        return {}
    size = image_size or int(cfg.input_size[-1])
    out: dict[str, Any] = {"image_size": size, "mean": tuple(float(v) for v in cfg.mean),
                           "std": tuple(float(v) for v in cfg.std)}
    if cfg.crop_pct:
        out["resize_size"] = int(math.floor(size / cfg.crop_pct))
    if cfg.interpolation in ("bilinear", "bicubic", "nearest"):
        out["interpolation"] = cfg.interpolation
    return out
