"""The one signal-to-quantization-noise ratio: how far a computation strays from its reference, in dB.
Used by the INT8 export gates (edgecv.export.parity) and the per-layer sensitivity ranking alike; numpy only,
so the device side and the compression side share it without importing each other."""

from __future__ import annotations

import numpy as np

SQNR_CAP_DB = 99.0  # identical outputs (a finite number: reports are JSON)


def ratio_db(signal: np.ndarray, noise: np.ndarray) -> float:
    """10 log10(power of `signal` / power of `noise`), within +-SQNR_CAP_DB."""
    power = float(np.sum(np.square(np.asarray(signal, np.float64))))
    error = float(np.sum(np.square(np.asarray(noise, np.float64))))
    if error == 0.0:
        return SQNR_CAP_DB
    if power == 0.0:
        return -SQNR_CAP_DB
    return float(min(10.0 * np.log10(power / error), SQNR_CAP_DB))


def sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    """SQNR of `got` against `reference`, in dB, within +-SQNR_CAP_DB."""
    reference = np.asarray(reference, np.float64)
    return ratio_db(reference, reference - np.asarray(got, np.float64))
