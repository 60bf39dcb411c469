"""Peak memory while a function runs: process RSS growth on the CPU, allocator peak on CUDA."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1024 * 1024


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # no /proc (macOS): max RSS so far, so growth only shows past the old peak

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_by_sampling(fn: Callable[[], Any], interval_s: float) -> float:
    start = _rss_bytes()
    peak = start
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak = max(peak, _rss_bytes())
    return max(0.0, (peak - start) / MIB)


def release_free_memory() -> None:
    """Hand freed memory back to the OS (garbage-collect, then glibc's malloc_trim), so that the next
    measurement's resident-set growth is what it needs, not what earlier, freed objects left behind."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): growth may then be under-counted
        pass


def peak_memory_mb(fn: Callable[[], Any], *, device: str = "cpu", interval_s: float = 0.001) -> float:
    """Peak memory (MiB) that running `fn` adds. CPU: growth of the process's resident set over its level
    before `fn` (kernel VmHWM where it can be reset, else a sampling thread). CUDA: torch's peak allocated
    bytes during `fn` (memory held by TensorRT / ORT-CUDA allocators is not seen by torch)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0.0, (torch.cuda.max_memory_allocated() - before) / MIB)
    release_free_memory()
    before_kb = _status_kb("VmRSS")
    if before_kb is not None and _reset_hwm() and _status_kb("VmHWM") is not None:
        fn()
        peak_kb = _status_kb("VmHWM") or before_kb
        return max(0.0, (peak_kb - before_kb) / 1024)
    return _peak_by_sampling(fn, interval_s)
