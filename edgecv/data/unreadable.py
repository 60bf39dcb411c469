"""Image files a loader could not read: the (path, reason) it reports, and that reason in one line.

Shared by the CPU loaders (edgecv.data.imagefolder) and GPU decoding (edgecv.data.gpu_decode)."""

from __future__ import annotations

Skipped = tuple[str, str]  # (path, reason)


def reason(exc: BaseException) -> str:
    """A short, one-line reason: torchvision's C++ errors end in the message after the source location."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.rsplit(", ", 1)[-1] if ".cpp:" in text else text
