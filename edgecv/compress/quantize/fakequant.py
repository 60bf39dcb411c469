"""Fake-quant modules: a quantizer that exports to QuantizeLinear/DequantizeLinear, and Conv/Linear with
quantized weights. Ranges live in parameters and buffers, so a state_dict holds everything needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The smallest uint8 activation scale. Without a floor, a nearly dead tensor (a range of 1e-8) gets a scale of
# 4e-11: ONNX Runtime then refuses pools whose input and output scales differ by more than 2^32, and int32
# biases (bias / (input scale x weight scale)) overflow. A steady floor, not a jump to scale 1 below some width,
# keeps two connected quantizers from landing on either side of the jump.
MIN_ACTIVATION_SCALE = 1e-6


# A symmetric range at or below this is dead (a channel of zeros, a tensor that never fires).
DEAD_RANGE = 1e-8


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return (x.round() - x).detach() + x


def symmetric_scale(amax: torch.Tensor) -> torch.Tensor:
    """The int8 symmetric scale |amax| / 127, the one rule for weights and activations, in training,
    calibration and export. A dead range (|amax| <= DEAD_RANGE) gets scale 1, as ONNX Runtime's quantizer
    does: its values quantize to 0 either way, and an int32 bias (bias / (input scale x weight scale))
    cannot overflow. Differentiable in `amax` where the range is live."""
    amax = amax.abs()
    return torch.where(amax > DEAD_RANGE, amax / 127.0, torch.ones_like(amax))


def bn_factor(bn: nn.BatchNorm2d) -> torch.Tensor:
    """gamma / sqrt(running var + eps): what folding an eval-mode BatchNorm multiplies each channel by."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


class FakeQuantize(nn.Module):
    """Per-tensor or per-channel fake quantizer that owns its range and its scale bounds.

    `symmetric=True`: int8 in [-128, 127] with zero point 0 and scale `symmetric_scale(amax)`, so values stay
    in [-127, 127] (TensorRT; weights). `symmetric=False`: uint8 in [0, 255], asymmetric over [lo, hi]
    (ONNX Runtime activations), with the scale kept inside its bounds: at least MIN_ACTIVATION_SCALE and a
    floor tied to another quantizer (`set_scale_floor`), at most a ceiling tied to another
    (`set_scale_ceiling`). One computation (`_qparams`) serves calibration, the learnable QAT path (LSQ-style,
    straight-through rounding) and export (torch's fake-quantize ops, which the TorchScript exporter turns
    into QuantizeLinear/DequantizeLinear), so what QAT trains is what runs. `freeze` fixes the scale and zero
    point as constants for export.
    """

    def __init__(
        self,
        symmetric: bool,
        channels: int | None = None,
        axis: int = 0,
        max_range: float | None = None,
        dynamic: bool = False,
        narrow_range: bool = False,
    ) -> None:
        super().__init__()
        self.symmetric = symmetric
        # narrow_range (symmetric only): values clamp to [-127, 127] x scale, never -128, as TensorRT and
        # ModelOpt store int8 weights; it matters once ranges are learned and a value can exceed amax
        self.narrow_range = narrow_range
        self.channels = channels
        self.axis = axis
        self.max_range = max_range  # e.g. 6.0 after ReLU6: the range is kept inside [0, 6]
        self.quant_min, self.quant_max = (-128, 127) if symmetric else (0, 255)
        shape = (channels,) if channels is not None else ()
        if symmetric:
            self.amax = nn.Parameter(torch.ones(shape), requires_grad=False)
        else:
            self.lo = nn.Parameter(torch.zeros(shape), requires_grad=False)
            self.hi = nn.Parameter(torch.ones(shape), requires_grad=False)
        # tuples: the other quantizer is referenced, not registered as a submodule twice
        self._scale_floor: tuple[FakeQuantize, float] | None = None
        self._scale_ceiling: tuple[FakeQuantize] | None = None
        self.frozen: tuple[bool] | None = None  # (enabled,) once `freeze` made scale and zero point constants
        self.register_buffer("enabled", torch.tensor(False))
        # dynamic: the range is the current per-channel max of the input (weights), not a stored value
        self.register_buffer("dynamic", torch.tensor(dynamic))

    @property
    def is_weight(self) -> bool:
        return self.channels is not None

    def extra_repr(self) -> str:
        kind = "int8 symmetric" if self.symmetric else "uint8 asymmetric"
        where = f"per-channel axis {self.axis}" if self.channels is not None else "per-tensor"
        narrow = ", narrow range" if self.narrow_range else ""
        return f"{kind}, {where}{narrow}, enabled={bool(self.enabled)}"

    def channel_amax(self, x: torch.Tensor) -> torch.Tensor:
        """max |x| over every dimension but the channel axis (a weight's per-output-channel range)."""
        dims = [d for d in range(x.dim()) if d != self.axis]
        return x.detach().abs().amax(dim=dims)

    def set_scale_floor(self, other: FakeQuantize, factor: float) -> None:
        """Keep this quantizer's scale at least `factor` x `other`'s (asymmetric only), e.g. a global average
        pool's output against its input: ONNX Runtime's QLinearGlobalAveragePool refuses to run ("parameter
        out of computation range") when input scale / (output scale x pixels) reaches 256."""
        self._check_asymmetric(other, "set_scale_floor")
        self._scale_floor = (other, float(factor))

    def set_scale_ceiling(self, other: FakeQuantize) -> None:
        """Keep this quantizer's scale at most `other`'s (asymmetric only): where it would be wider, `other`'s
        scale and zero point are used. An average pool's output against its input: an average never leaves
        its input's range, and QLinearGlobalAveragePool refuses input / output scale ratios below 2^-32,
        which a pooled range that collapsed to zero (scale 1) next to a tiny live input range would give."""
        self._check_asymmetric(other, "set_scale_ceiling")
        self._scale_ceiling = (other,)

    def _check_asymmetric(self, other: FakeQuantize, what: str) -> None:
        if self.symmetric or other.symmetric:
            raise ValueError(f"{what}: asymmetric (uint8) quantizers only")

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The asymmetric range [lo, hi], always holding 0; after a clamp to [0, max_range] (ReLU, ReLU6) it
        stays inside it even while QAT learns it, so that ONNX Runtime can drop the clamp into the integer op
        before it (its Relu/Clip + QuantizeLinear fusion needs the quantized range inside the clamp's)."""
        lo, hi = self.lo.clamp(max=0.0), self.hi.clamp(min=0.0)
        if self.max_range is not None:
            lo, hi = lo.clamp(min=0.0), hi.clamp(max=self.max_range)
        return lo, hi

    def _qparams(self, x: torch.Tensor | None, learnable: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point as a float tensor) from the range, inside the scale bounds; `learnable`: the
        zero point rounds straight-through, so both are differentiable in the range."""
        if self.symmetric:
            amax = self.channel_amax(x) if (x is not None and bool(self.dynamic)) else self.amax
            scale = symmetric_scale(amax)
            return scale, torch.zeros_like(scale)
        lo, hi = self._bounds()
        scale = ((hi - lo) / 255.0).clamp(min=MIN_ACTIVATION_SCALE)
        if self._scale_floor is not None:
            other, factor = self._scale_floor
            scale = torch.maximum(scale, other._qparams(None, learnable)[0] * factor)
        zero_point = (_round_ste if learnable else torch.round)(-lo / scale).clamp(0, 255)
        if self._scale_ceiling is not None and bool(self._scale_ceiling[0].enabled):
            top_scale, top_zero_point = self._scale_ceiling[0]._qparams(None, learnable)
            wider = scale > top_scale
            scale = torch.where(wider, top_scale, scale)
            zero_point = torch.where(wider, top_zero_point, zero_point)
        return scale, zero_point

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point int32) from the current range (`x`: the weight, for a dynamic range)."""
        if self.frozen is not None:
            return self.frozen_scale, self.frozen_zero_point
        scale, zero_point = self._qparams(x, learnable=False)
        return scale.detach(), zero_point.detach().to(torch.int32)

    @torch.no_grad()
    def freeze(self, x: torch.Tensor | None = None) -> FakeQuantize:
        """Fix scale and zero point as constants (from `x`, the weight, for a dynamic range): the same values,
        exported without the range arithmetic the exporter would otherwise trace and fold for every
        quantizer (most of the export time). For an export copy: the range no longer counts."""
        scale, zero_point = self.qparams(x)
        self.register_buffer("frozen_scale", scale.clone())
        self.register_buffer("frozen_zero_point", zero_point.clone())
        self.frozen = (bool(self.enabled),)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.frozen[0] if self.frozen is not None else bool(self.enabled)):
            return x
        if self.frozen is None and self.training and any(p.requires_grad for p in self.range_parameters()):
            scale, zero_point = self._qparams(x, learnable=True)
            return self._fake_quant_learnable(x, scale, zero_point)
        scale, zero_point = self.qparams(x)
        if self.narrow_range and self.symmetric:  # clip to +-127 steps: the int8 file holds no -128
            bound = (127.0 * scale).reshape(self._broadcast_shape(x))
            x = torch.clamp(x, -bound, bound)
        if self.channels is not None:
            return torch.fake_quantize_per_channel_affine(
                x, scale, zero_point, self.axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, self.quant_min, self.quant_max)

    def _broadcast_shape(self, x: torch.Tensor) -> list[int]:
        shape = [1] * x.dim()
        if self.channels is not None:
            shape[self.axis] = -1
        return shape

    def _fake_quant_learnable(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """Fake quantization differentiable in x (straight-through) and in the range (through scale)."""
        shape = self._broadcast_shape(x)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        q_min = -self.quant_max if (self.narrow_range and self.symmetric) else self.quant_min
        # x * (1 / scale), not x / scale: torch's fake-quantize kernels (the export path) multiply by the
        # inverse, and an exact tie (a pool whose scale is capped at its input's) must round the same way
        q = torch.clamp(_round_ste(x * (1.0 / scale)) + zero_point, q_min, self.quant_max)
        return (q - zero_point) * scale

    @torch.no_grad()
    def set_range(self, lo: float | torch.Tensor, hi: float | torch.Tensor) -> None:
        """Set the range from calibration; symmetric quantizers use max(|lo|, |hi|)."""
        lo_t = torch.as_tensor(lo, dtype=torch.float32)
        hi_t = torch.as_tensor(hi, dtype=torch.float32)
        if self.max_range is not None:
            lo_t, hi_t = lo_t.clamp(min=0.0), hi_t.clamp(max=self.max_range)
        if self.symmetric:
            self.amax.copy_(torch.maximum(lo_t.abs(), hi_t.abs()).clamp(min=DEAD_RANGE).expand_as(self.amax))
        else:
            self.lo.copy_(lo_t.clamp(max=0.0).expand_as(self.lo))
            self.hi.copy_(hi_t.clamp(min=0.0).expand_as(self.hi))

    def range_parameters(self) -> list[nn.Parameter]:
        return [self.amax] if self.symmetric else [self.lo, self.hi]


class QuantConstant(nn.Module):
    """A scalar constant that an integer op reads (the 3 of hard-sigmoid's `x + 3`), as ONNX Runtime's
    `quantize_static` stores one: uint8 over [min(v, 0), max(v, 0)], so the value sits exactly on the end of
    its range. It exports as a uint8 initializer -> DequantizeLinear, and `x + 3` fuses into QLinearAdd."""

    def __init__(self, value: float) -> None:
        super().__init__()
        if value == 0.0:
            raise ValueError("QuantConstant: a zero constant needs no quantized op")
        # a stored buffer: the exporter inlines a non-persistent one and folds its Q/DQ away
        self.register_buffer("value", torch.tensor(float(value)))
        self.scale = abs(float(value)) / 255.0
        self.zero_point = 0 if value > 0 else 255

    def extra_repr(self) -> str:
        return f"value={float(self.value):g}, uint8"

    def forward(self) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(self.value, self.scale, self.zero_point, 0, 255)


INT32_MAX = 2**31 - 1


class _WeightQuantMixin:
    """Shared by QuantConv2d and QuantLinear: `weight_quant` (int8 symmetric per output channel), and the bias
    quantized as ONNX Runtime runs it once `input_quant` is linked (see `link_input_quantizer`)."""

    weight: nn.Parameter
    bias: nn.Parameter
    weight_quant: FakeQuantize
    _input_quant: tuple[FakeQuantize] | None = None

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def link_input_quantizer(self, quantizer: FakeQuantize) -> None:
        """Simulate the int32 bias of QLinearConv / QGemm: round(bias / (input scale x weight scale)), as
        export writes it for ONNX Runtime; without it the fake-quant output differs from ORT's by one LSB here
        and there, and the flips grow layer by layer (42 dB logit SQNR on MobileNetV3 and EfficientNet)."""
        self._input_quant = (quantizer,)  # a tuple: the quantizer is not registered as a submodule twice

    def quantized_bias(self, weight: torch.Tensor) -> torch.Tensor:
        """The bias that runs: int32 at scale input scale x weight scale when the input and weights are
        quantized (straight-through rounding); float at export (export quantizes it) and otherwise."""
        x_quant = self._input_quant[0] if self._input_quant else None
        if (
            x_quant is None
            or not (bool(x_quant.enabled) and bool(self.weight_quant.enabled))
            or torch.onnx.is_in_onnx_export()
        ):
            return self.bias
        scale = (x_quant.qparams()[0] * self.weight_quant.qparams(weight)[0]).clamp(min=1e-30)
        q = self.bias / scale
        if bool((q.detach().abs() > INT32_MAX).any()):  # export leaves such a bias in float
            return self.bias
        return _round_ste(q) * scale


class QuantConv2d(nn.Conv2d, _WeightQuantMixin):
    """Conv2d with fake-quantized weights. With `bn` set (prepare_qat(freeze_bn=False)) BatchNorm stays a
    separate module and folding is simulated: the weight is scaled by gamma / running std before it is
    quantized, and the output scaled back before BN runs with batch statistics (Jacob et al. 2018)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = FakeQuantize(symmetric=True, channels=self.out_channels, axis=0, dynamic=True)
        self.bn: nn.BatchNorm2d | None = None
        self.bn_frozen = False

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, fold: bool = True) -> QuantConv2d:
        """A quantized copy of `conv`; `bn` is folded into it (fold=True) or kept for simulated folding."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=True,
            padding_mode=conv.padding_mode,
        ).to(conv.weight.device)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            new.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
        if bn is not None:
            if fold:
                weight, bias = fold_bn_into(new.weight, new.bias, bn)
                with torch.no_grad():
                    new.weight.copy_(weight)
                    new.bias.copy_(bias)
            else:
                new.bn = bn
        return new

    def train(self, mode: bool = True) -> QuantConv2d:
        super().train(mode)
        if self.bn is not None and self.bn_frozen:
            self.bn.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            return self._conv_forward(x, self.quantized_weight(), self.quantized_bias(self.weight))
        bn = self.bn
        factor = bn_factor(bn)
        weight = self.weight_quant(self.weight * factor.reshape(-1, 1, 1, 1))
        y = self._conv_forward(x, weight, None) / factor.reshape(1, -1, 1, 1)
        return bn(y + self.bias.reshape(1, -1, 1, 1))

    def folded(self) -> QuantConv2d:
        """A copy with BatchNorm folded in (for export): the same eval-mode outputs."""
        new = QuantConv2d.from_float(self, None)
        new.weight_quant.load_state_dict(self.weight_quant.state_dict())
        new.weight_quant.narrow_range = self.weight_quant.narrow_range
        new._input_quant = self._input_quant
        if self.bn is not None:
            weight, bias = fold_bn_into(self.weight, self.bias, self.bn)
            with torch.no_grad():
                new.weight.copy_(weight)
                new.bias.copy_(bias)
        return new.train(self.training)


class QuantLinear(nn.Linear, _WeightQuantMixin):
    """Linear with fake-quantized weights (int8 symmetric per output channel)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = FakeQuantize(symmetric=True, channels=self.out_features, axis=0, dynamic=True)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> QuantLinear:
        new = cls(linear.in_features, linear.out_features, bias=True).to(linear.weight.device)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            new.bias.copy_(linear.bias if linear.bias is not None else torch.zeros(linear.out_features))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.quantized_bias(self.weight))


def fold_bn_into(
    weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in."""
    with torch.no_grad():
        factor = bn_factor(bn)
        new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bias)
        new_bias = (bias - bn.running_mean) * factor + beta
    return new_weight.detach(), new_bias.detach()


def fake_quantizers(model: nn.Module) -> list[tuple[str, FakeQuantize]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantize)]


def activation_quantizers(model: nn.Module) -> list[tuple[str, FakeQuantize]]:
    return [(n, m) for n, m in fake_quantizers(model) if not m.is_weight]
