"""Calibration: gather activation statistics once, then set every quantizer's range with a calibrator.

Statistics (min, max, |x| max and a histogram with fixed-width bins that grows as needed) are collected in
one pass and shared by all calibrators, so comparing `max`, `percentile`, `mse` and `entropy` costs one
forward pass over the calibration set, for PTQ and QAT alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgecv.compress.quantize.fakequant import (
    FakeQuantize,
    QuantConv2d,
    activation_quantizers,
    bn_factor,
    fake_quantizers,
)
from edgecv.errors import EdgecvError
from edgecv.registry import Registry

_FIRST_BINS = 1024  # bins on the wider side of zero after the first batch
_MAX_BINS = 8192  # past this the bins are merged pairwise (twice as wide)


@dataclass
class TensorStats:
    """Running statistics of one activation quantizer's input. The histogram covers
    [-n_neg * bin_width, n_pos * bin_width] with `counts` of length n_neg + n_pos."""

    min: float = float("inf")
    max: float = float("-inf")
    bin_width: float = 0.0
    n_neg: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.bin_width == 0.0:
            self.bin_width = max(abs(lo), abs(hi), 1e-8) / _FIRST_BINS
        need_neg = int(np.ceil(max(-lo, 0.0) / self.bin_width)) + 1
        need_pos = int(np.ceil(max(hi, 0.0) / self.bin_width)) + 1
        n_pos = len(self.counts) - self.n_neg
        if need_neg > self.n_neg or need_pos > n_pos:
            new_neg, new_pos = max(need_neg, self.n_neg), max(need_pos, n_pos)
            self.counts = np.concatenate(
                [np.zeros(new_neg - self.n_neg), self.counts, np.zeros(new_pos - n_pos)]
            )
            self.n_neg = new_neg
            while len(self.counts) > _MAX_BINS:
                self._merge_pairs()
        n_pos = len(self.counts) - self.n_neg
        hist = torch.histc(
            x, bins=len(self.counts), min=-self.n_neg * self.bin_width, max=n_pos * self.bin_width
        )
        self.counts += hist.double().numpy()

    def _merge_pairs(self) -> None:
        n_pos = len(self.counts) - self.n_neg
        neg = np.concatenate([np.zeros(self.n_neg % 2), self.counts[: self.n_neg]])
        pos = np.concatenate([self.counts[self.n_neg :], np.zeros(n_pos % 2)])
        self.counts = np.concatenate([neg.reshape(-1, 2).sum(1), pos.reshape(-1, 2).sum(1)])
        self.n_neg = len(neg) // 2
        self.bin_width *= 2

    def centers(self) -> np.ndarray:
        return (np.arange(len(self.counts)) - self.n_neg + 0.5) * self.bin_width

    def abs_hist(self) -> np.ndarray:
        """Histogram of |x| with the same bin width, bin k covering [k, k+1) * bin_width."""
        n_pos = len(self.counts) - self.n_neg
        n = max(self.n_neg, n_pos)
        out = np.zeros(n)
        out[:n_pos] += self.counts[self.n_neg :]
        out[: self.n_neg] += self.counts[: self.n_neg][::-1]
        return out


@dataclass
class CalibStats:
    """Per activation quantizer (module name) statistics from one pass over the calibration batches."""

    tensors: dict[str, TensorStats]
    num_batches: int = 0


def collect_stats(qmodel: nn.Module, batches: Iterable[torch.Tensor]) -> CalibStats:
    """One forward pass over `batches` in eval mode with fake quant disabled, recording what each
    activation quantizer sees. The model's mode and quantizer switches are restored afterwards."""
    quantizers = activation_quantizers(qmodel)
    stats = {name: TensorStats() for name, _ in quantizers}
    saved = {name: bool(q.enabled) for name, q in fake_quantizers(qmodel)}
    was_training = qmodel.training
    handles = []
    for name, q in quantizers:
        handles.append(q.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.update(args[0])))
    set_fake_quant(qmodel, False)
    device = next((p.device for p in qmodel.parameters()), torch.device("cpu"))
    n = 0
    try:
        qmodel.eval()
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                qmodel(x.to(device))
                n += 1
    finally:
        for h in handles:
            h.remove()
        for name, q in fake_quantizers(qmodel):
            q.enabled.fill_(saved[name])
        qmodel.train(was_training)
    if n == 0:
        raise EdgecvError("calibration: no batches were given")
    return CalibStats(stats, n)


def set_fake_quant(qmodel: nn.Module, enabled: bool) -> None:
    for _, q in fake_quantizers(qmodel):
        q.enabled.fill_(enabled)


# ---- calibrators: (stats, symmetric, **options) -> (lo, hi) -----------------------------------------

# The percentile calibrator's option: the share of values kept inside the range, in percent.
PERCENTILE_BOUNDS = (50.0, 100.0)  # exclusive on both sides
DEFAULT_PERCENTILE = 99.99


@dataclass(frozen=True)
class Calibrator:
    """A range rule: `compute(stats, symmetric, **options) -> (lo, hi)`; `options` names the keyword
    arguments it takes (with their defaults), so an option given to a calibrator that ignores it is refused."""

    compute: Callable[..., tuple[float, float]]
    options: dict[str, float] = field(default_factory=dict)

    def __call__(self, stats: TensorStats, symmetric: bool, **options: float) -> tuple[float, float]:
        return self.compute(stats, symmetric, **{**self.options, **options})


CALIBRATORS: Registry[Calibrator] = Registry("calibrator")


def calibrator(name: str, **options: float) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        CALIBRATORS.register(name, Calibrator(fn, options))
        return fn

    return register


def check_calibrator_options(method: str, options: dict[str, float]) -> None:
    """Refuse an option that calibrator `method` does not take, and a percentile out of bounds."""
    taken = CALIBRATORS.get(method).options
    for key, value in options.items():
        if key not in taken:
            raise EdgecvError(
                f"calibrator {method!r} takes no option {key!r}"
                + (f" (it takes: {', '.join(taken)})" if taken else "")
            )
        if key == "percentile" and not PERCENTILE_BOUNDS[0] < value < PERCENTILE_BOUNDS[1]:
            raise EdgecvError(
                f"percentile must be between {PERCENTILE_BOUNDS[0]:g} and {PERCENTILE_BOUNDS[1]:g}, got {value}"
            )


@calibrator("max")
def calibrate_max(s: TensorStats, symmetric: bool) -> tuple[float, float]:
    return (-s.absmax, s.absmax) if symmetric else (s.min, s.max)


def _quantile(counts: np.ndarray, edges_lo: np.ndarray, width: float, q: float) -> float:
    """Value below which a fraction q of the histogram mass lies (linear inside a bin)."""
    cdf = np.cumsum(counts)
    total = cdf[-1]
    if total <= 0:
        return 0.0
    target = q * total
    i = int(np.searchsorted(cdf, target))
    i = min(i, len(counts) - 1)
    before = cdf[i - 1] if i > 0 else 0.0
    frac = (target - before) / counts[i] if counts[i] > 0 else 0.0
    return float(edges_lo[i] + frac * width)


@calibrator("percentile", percentile=DEFAULT_PERCENTILE)
def calibrate_percentile(s: TensorStats, symmetric: bool, percentile: float) -> tuple[float, float]:
    q = percentile / 100.0
    w = s.bin_width
    if symmetric:
        hist = s.abs_hist()
        amax = min(_quantile(hist, np.arange(len(hist)) * w, w, q), s.absmax)
        return -amax, amax
    edges = (np.arange(len(s.counts)) - s.n_neg) * w
    lo = max(_quantile(s.counts, edges, w, 1.0 - q), s.min) if s.min < 0 else s.min
    hi = min(_quantile(s.counts, edges, w, q), s.max)
    return lo, hi


def _grid_mse(centers: np.ndarray, counts: np.ndarray, lo: float, hi: float, symmetric: bool) -> float:
    if symmetric:
        scale = max(hi, 1e-12) / 127.0
        q = np.clip(np.round(centers / scale), -128, 127) * scale
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max(hi - lo, 1e-12) / 255.0
        zp = np.clip(np.round(-lo / scale), 0, 255)
        q = (np.clip(np.round(centers / scale) + zp, 0, 255) - zp) * scale
    return float(np.sum(counts * (centers - q) ** 2))


@calibrator("mse")
def calibrate_mse(s: TensorStats, symmetric: bool) -> tuple[float, float]:
    """The range (the max range shrunk by a factor in [0.05, 1]) with the least quantization MSE."""
    centers, counts = s.centers(), s.counts
    nz = counts > 0
    centers, counts = centers[nz], counts[nz]
    best, best_err = calibrate_max(s, symmetric), float("inf")
    lo0, hi0 = best
    for a in np.linspace(0.05, 1.0, 96):
        err = _grid_mse(centers, counts, lo0 * a, hi0 * a, symmetric)
        if err < best_err:
            best, best_err = (lo0 * a, hi0 * a), err
    return best


def _entropy_amax(hist: np.ndarray, width: float, levels: int, stride: int = 8) -> float:
    """TensorRT's entropy calibration: the |x| threshold whose `levels`-level quantized distribution has the
    least KL divergence from the reference distribution (clipped mass folded into the last bin)."""
    if len(hist) > 2048:  # coarser bins keep the search fast; 2048 is what TensorRT uses
        k = -(-len(hist) // 2048)
        hist = np.concatenate([hist, np.zeros((-len(hist)) % k)]).reshape(-1, k).sum(1)
        width *= k
    nbins = len(hist)
    last = int(np.max(np.nonzero(hist))) + 1 if hist.any() else nbins
    if last <= levels:
        return last * width
    best_i, best_kl = last, float("inf")
    for i in range(levels, last + 1, stride):
        ref = hist[:i].astype(np.float64).copy()
        ref[i - 1] += hist[i:].sum()
        nonzero = hist[:i] != 0
        # merge i bins into `levels` quantized bins, then expand back over the nonzero bins
        idx = (np.arange(i) * levels) // i
        qsum = np.bincount(idx, weights=hist[:i], minlength=levels)
        qcnt = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=levels)
        expanded = np.where(nonzero, qsum[idx] / np.maximum(qcnt[idx], 1), 0.0)
        p = ref / ref.sum()
        qd = expanded / max(expanded.sum(), 1e-30)
        mask = p > 0
        qd = np.where(mask & (qd == 0), 1e-12, qd)
        kl = float(np.sum(p[mask] * np.log(p[mask] / qd[mask])))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * width


@calibrator("entropy")
def calibrate_entropy(s: TensorStats, symmetric: bool) -> tuple[float, float]:
    if not symmetric and s.min >= 0:  # unsigned, one-sided (after ReLU): all 256 levels on [0, max]
        amax = _entropy_amax(s.counts[s.n_neg :], s.bin_width, 256)
        return 0.0, min(amax, s.max)
    amax = min(_entropy_amax(s.abs_hist(), s.bin_width, 128), s.absmax)
    return (-amax, amax) if symmetric else (max(s.min, -amax), min(s.max, amax))


def apply_calibrator(qmodel: nn.Module, stats: CalibStats, method: str = "max", **options: float) -> None:
    """Set every activation quantizer's range from `stats` with calibrator `method` (and the options it
    takes, e.g. percentile=99.99), weight quantizers to their per-channel max, and enable fake quant."""
    check_calibrator_options(method, options)
    rule = CALIBRATORS.get(method)
    for name, q in fake_quantizers(qmodel):
        if q.is_weight:
            continue  # set below from the weight it quantizes
        s = stats.tensors.get(name)
        if s is not None and s.counts.size:
            lo, hi = rule(s, q.symmetric, **options)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise EdgecvError(f"calibration: {method} gave a non-finite range for {name}")
            q.set_range(lo, hi)
        q.enabled.fill_(True)
    for module in qmodel.modules():
        if hasattr(module, "weight_quant") and isinstance(module.weight_quant, FakeQuantize):
            weight = module.weight
            if isinstance(module, QuantConv2d) and module.bn is not None:
                weight = weight * bn_factor(module.bn).reshape(-1, 1, 1, 1)
            with torch.no_grad():
                module.weight_quant.set_range(0.0, module.weight_quant.channel_amax(weight))
            module.weight_quant.enabled.fill_(True)


def set_learnable_ranges(qmodel: nn.Module, learnable: bool) -> None:
    """QAT: learn the quantization ranges (LSQ-style gradients through straight-through rounding) or freeze
    them. Once learned, weight ranges are stored values (no longer the live per-channel max)."""
    for _, q in fake_quantizers(qmodel):
        if learnable and q.is_weight and bool(q.dynamic):
            q.dynamic.fill_(False)  # apply_calibrator already stored the per-channel max in amax
        for p in q.range_parameters():
            p.requires_grad_(learnable)


def freeze_bn_stats(qmodel: nn.Module) -> None:
    """Stop updating BatchNorm statistics in convs prepared with freeze_bn=False (late QAT)."""
    for m in qmodel.modules():
        if isinstance(m, QuantConv2d) and m.bn is not None:
            m.bn_frozen = True
            m.bn.eval()
