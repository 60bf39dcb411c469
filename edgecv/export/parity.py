"""How closely an exported model's logits follow the torch model's: one SQNR, and one documented threshold
per use (the INT8 export gate, frame-input files, and the fake-quant simulation of the integer file)."""

from __future__ import annotations

import numpy as np

from edgecv.sqnr import ratio_db, sqnr_db

# The INT8 export gate: every class's logits keep this SQNR against the fake-quant torch model (a broken
# scale or two swapped class outputs give 5 dB or less, a faithful INT8 graph 15-40 dB), and the samples
# whose top-1 margin exceeds the noise keep their top-1 class.
INT8_MIN_SQNR_DB = 10.0
INT8_MIN_AGREEMENT = 0.99
NOISE_QUANTILE = 0.99  # the quantization noise: what this share of the logits differ by at most

# A frame-input INT8 file against its reference whose top-1 agreement is lowered by near ties still passes
# at this logit SQNR (measured on a one-epoch net: the right file 40.5 dB; BGR frames or a wrong mean 11 dB,
# padding with black -6 dB, every pixel off by one level 32 dB).
FRAME_MIN_SQNR_DB = 30.0

# Two computations of one integer model: a fake-quant model's QAT training path against its export path, or
# an onnxruntime-target fake-quant model (it simulates every integer op, int32 biases included) against its
# INT8 file in ONNX Runtime. Equal but for float rounding inside kernels (ORT's sigmoid approximation, the
# order of a multiply, a pool whose input and output scales are equal rounding its exact ties another way)
# that lands a value on the other side of a rounding boundary now and then. A missed quantization point (an
# int32 bias, a scale bound) gives 30-45 dB.
SIMULATION_MIN_SQNR_DB = 60.0


def logit_agreement(expected: np.ndarray, got: np.ndarray) -> dict:
    """How closely `got` logits follow `expected` (n samples x classes), by measures that near-ties do not
    sway: SQNR of the logits centred per sample (overall, and of the class that strays most), and top-1
    agreement over the samples whose expected top-1 margin is more than twice the quantization noise; the
    raw top-1 agreement is reported beside them."""
    expected, got = expected.astype(np.float64), got.astype(np.float64)
    signal = expected - expected.mean(axis=1, keepdims=True)
    centred = got - got.mean(axis=1, keepdims=True)
    error = signal - centred
    noise = float(np.quantile(np.abs(error), NOISE_QUANTILE))
    top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((len(expected), 2))
    decided = (top2[:, 1] - top2[:, 0]) > 2.0 * noise
    same = expected.argmax(1) == got.argmax(1)
    worst = error[:, int(np.argmax(np.sum(error**2, axis=0)))]
    return {
        "sqnr_db": round(sqnr_db(signal, centred), 2),
        # the class whose logit strays most, against the average class's signal (a class whose logit sits
        # near the sample mean has little centred signal of its own and must not count as noisy)
        "worst_class_sqnr_db": round(ratio_db(signal / np.sqrt(signal.shape[1]), worst), 2),
        "noise": noise,
        "top1_agreement": float(np.mean(same)),
        "decided": int(decided.sum()),
        "decided_agreement": float(np.mean(same[decided])) if decided.any() else None,
    }


def int8_parity_ok(parity: dict) -> bool:
    """The INT8 export gate on a logit_agreement result."""
    decided = parity["decided_agreement"]
    return parity["worst_class_sqnr_db"] >= INT8_MIN_SQNR_DB and (decided is None or decided >= INT8_MIN_AGREEMENT)


def frame_parity_ok(top1_agreement: float, sqnr: float) -> bool:
    """The INT8 frame-input gate: top-1 agreement >= INT8_MIN_AGREEMENT, or near ties and FRAME_MIN_SQNR_DB."""
    return top1_agreement >= INT8_MIN_AGREEMENT or sqnr >= FRAME_MIN_SQNR_DB
