"""Pretrained torchvision weights in torch's hub cache: downloaded where the machine is online, a
one-line error naming the file and the cache where it is not (e.g. a training node without internet)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from edgecv.errors import EdgecvError


def cached_weights_file(builder: str, weights: str) -> Path:
    """Where torch's hub cache keeps torchvision `builder`'s `weights` (present or not)."""
    import torch
    from torchvision.models import get_model_weights

    url = get_model_weights(builder)[weights].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def ensure_cached(builder: str, weights: str) -> Path:
    """The cached weights file, downloaded first if missing (quietly: no progress output)."""
    import torch
    from torchvision.models import get_model_weights

    path = cached_weights_file(builder, weights)
    if path.is_file():
        return path
    url = get_model_weights(builder)[weights].url
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except (OSError, ValueError, RuntimeError) as exc:  # URLError is an OSError: no network, proxy, DNS
        why = str(getattr(exc, "reason", exc)).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgecvError(
            f"model.weights {weights!r} of torchvision:{builder}: {path} is not in the torch hub cache and "
            f"the download failed ({why}); copy {os.path.basename(path)} from {url} there, or set model.weights: null"
        ) from None
    return path
