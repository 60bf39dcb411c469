"""torch-pruning under a time limit (SIGALRM), and its failures as one line naming the model and the layer:
a channel shuffle it cannot follow, window attention whose analysis does not finish."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

import torch_pruning as tp
from torch import nn

from edgecv.errors import EdgecvError


class AnalysisTimeout(Exception):
    """torch-pruning's graph analysis ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise AnalysisTimeout in the main thread after `seconds` (torch-pruning's graph analysis is Python,
    so the alarm interrupts it); elsewhere, or without SIGALRM, run unlimited."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(_signum, _frame):
        raise AnalysisTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:  # give an enclosing timer back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))


def _named(model: nn.Module, value: object, names: dict[int, str]) -> str | None:
    """The model's name for a module, or for the layer nearest upstream of a torch-pruning graph node."""
    if isinstance(value, nn.Module):
        return names.get(id(value))
    if not isinstance(value, tp.dependency.Node):
        return None
    seen, queue = set(), [value]
    while queue and len(seen) < 200:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if names.get(id(node.module)):
            return names[id(node.module)]
        queue.extend(node.inputs)
    return None


def _blocking_layer(model: nn.Module, tb) -> str | None:
    """The layer torch-pruning was working on when it failed: from the innermost torch-pruning frame whose
    locals hold a graph node or one of the model's modules."""
    names = {id(m): n for n, m in model.named_modules() if n}
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        if "torch_pruning" not in frame.f_code.co_filename:
            continue
        for key in ("node", "reshape_node", "module", "m", "layer"):
            name = _named(model, frame.f_locals.get(key), names)
            if name:
                return name
    return None


def guarded(model: nn.Module, timeout: float, work: Callable[[], object]) -> object:
    """Run torch-pruning `work` on `model` with the time limit; failures become one EdgecvError line."""
    what = type(model).__name__
    try:
        with time_limit(timeout):
            return work()
    except EdgecvError:
        raise
    except AnalysisTimeout as exc:
        layer = _blocking_layer(model, exc.__traceback__)
        raise EdgecvError(
            f"prune: torch-pruning did not finish analysing {what} within prune.graph_timeout {timeout:g} s"
            + (f" (stuck at layer {layer!r})" if layer else "")
            + "; its dependency search does not end on some layers (window attention): remove the prune stage"
            " or raise prune.graph_timeout"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch-pruning raises anything from its graph code
        layer = _blocking_layer(model, exc.__traceback__)
        where = f" near layer {layer!r}" if layer else ""
        if isinstance(exc, ZeroDivisionError):
            reason = "it cannot follow a reshape that regroups channels (such as a channel shuffle)"
        else:
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        raise EdgecvError(f"prune: torch-pruning cannot prune {what}{where}: {reason}") from None

