"""Top-1 / top-5 accuracy of any runner over (images, labels) batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from edgecv.errors import EdgecvError


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have their label among the k highest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def evaluate(
    runner: Callable[[Any], Any],
    batches: Iterable[tuple[Any, Any]],
    progress: Callable[[int], None] | None = None,
) -> dict:
    """{"top1": %, "top5": %, "n": images}: the one accuracy measure, for every backend and for validation
    during training. `runner(images)` gets each batch as the loader gives it (numpy or torch) and returns
    logits (numpy, or anything np.asarray takes). Top-5 uses min(5, classes): with 5 classes or fewer top-5
    is 100 %. `progress(1)` is called after each batch."""
    n = correct1 = correct5 = 0
    for images, labels in batches:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        logits = np.asarray(runner(images))
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise EdgecvError(
                f"runner returned logits of shape {logits.shape} for {labels.shape[0]} labels; "
                "expected (batch, classes)"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise EdgecvError(
                f"label {int(labels.max())} is outside the model's {logits.shape[1]} classes "
                "(does the dataset match the model's num_classes?)"
            )
        correct1 += topk_correct(logits, labels, 1)
        correct5 += topk_correct(logits, labels, 5)
        n += labels.shape[0]
        if progress is not None:
            progress(1)
    if n == 0:
        raise EdgecvError("no images to evaluate: the dataset split is empty")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n}
