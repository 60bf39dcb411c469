"""Models that eat camera frames: a uint8 NHWC input, with the preprocessing folded into the first convolution.

A float-input model wants `((frame / 255 - mean) / std)` in CHW order: a pass over every image in numpy, and
(INT8) a QuantizeLinear that turns the result back into 8 bits. A frame-input file takes the uint8 frame as
the camera gives it (N, H, W, C) and folds the preprocessing into the first convolution: with
m_c = 255 * mean_c, conv((p / 255 - mean) / std) = conv'(p - m) where conv' has the weights divided by
255 * std_c along the input channels. How the rest is done depends on what runs the graph:

- INT8 for ONNX Runtime: the frame feeds the first conv's DequantizeLinear directly (scale 1, zero point z),
  the weights are re-quantized per output channel (from the torch model's float weights when it is given,
  so they are rounded once) and the int32 bias absorbs sum(W' * (z - m_c)). ONNX
  Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv and its NHWC transformer
  cancels the input Transpose: no Cast, no QuantizeLinear, no Transpose is left. QLinearConv pads with the
  zero point, i.e. with the pixel z; zero padding of the normalized input means the mean pixel m. When every
  channel's mean pixel is within half a level of one integer z, z is that integer (error at the border
  <= half a pixel level, the rounding of a uint8 frame itself); otherwise (ImageNet means 124/116/104) the
  frame is padded explicitly with the rounded mean pixel (Pad + Max on the uint8 frame) and the conv
  pads nothing.
- INT8 for TensorRT (int8 symmetric Q/DQ, zero point 0): the network casts the frame to float, subtracts
  the mean pixel and quantizes with a per-tensor scale that covers every pixel value; padding is exact.
  The weights are folded and re-quantized the same way.
- float: cast, subtract the mean pixel, transpose; 1 / (255 * std) is folded into the conv's weights.

Resizing stays outside the model: frames come at the model's size, or the caller resizes them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecv.errors import EdgecvError
from edgecv.registry import Registry

if TYPE_CHECKING:
    import onnx

FLOAT_NCHW = "float-nchw"
UINT8_NHWC = "uint8-nhwc"
# What an exported model's input is: name -> what the caller feeds it.
INPUT_KINDS: Registry[str] = Registry("model input")
INPUT_KINDS.register(FLOAT_NCHW, "float32 N x C x H x W, normalized with the model's mean and std")
INPUT_KINDS.register(UINT8_NHWC, "uint8 N x H x W x C camera frames (RGB order), normalization folded in")

# metadata_props of a frame-input ONNX file: what it takes and the normalization folded into it
META_INPUT, META_MEAN, META_STD = "edgecv.input", "edgecv.mean", "edgecv.std"
# Padding with the zero point is used when it is within this many pixel levels of every channel's mean pixel.
ZERO_POINT_PAD_TOLERANCE = 0.5
# An INT8 frame file whose top-1 agreement is lowered by near ties still passes at this logit SQNR.
INT8_MIN_SQNR_DB = 30.0


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of pixel values scaled to [0, 1]: x = (p / 255 - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.mean or len(self.mean) != len(self.std):
            raise EdgecvError(f"normalization: mean {self.mean} and std {self.std} need one value per channel")
        if any(s <= 0 for s in self.std):
            raise EdgecvError(f"normalization: std {self.std} must be positive")

    @classmethod
    def of(cls, spec: Any) -> Normalization:
        """The normalization of a ModelSpec; a model without one cannot take frames."""
        if not spec.mean or not spec.std:
            raise EdgecvError(
                f"model {spec.name!r} records no input normalization (mean/std), so its frame input cannot be "
                "folded; export it from a run whose data section normalizes"
            )
        return cls(tuple(float(v) for v in spec.mean), tuple(float(v) for v in spec.std))

    @classmethod
    def neutral(cls, channels: int) -> Normalization:
        """Mean 0.5, std 0.25: for timing the preprocessing of a model whose normalization is unknown
        (the numpy work is the same whatever the values)."""
        return cls((0.5,) * channels, (0.25,) * channels)

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def mean_pixel(self) -> np.ndarray:
        """m_c = 255 * mean_c: the pixel value that normalizes to zero."""
        return 255.0 * np.asarray(self.mean, dtype=np.float64)

    def preprocess(self, frames: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C frames -> float32 N x C x H x W normalized: what a float-input model needs, in
        numpy as a user writes it (to float, / 255, - mean, / std, HWC -> CHW)."""
        x = frames.astype(np.float32) / np.float32(255.0)
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def to_frames(self, batch: Any) -> np.ndarray:
        """The inverse: a normalized float N x C x H x W batch (e.g. from a validation loader) -> uint8 frames.
        Exact for images that were uint8 before normalization (every dataset edgecv loads)."""
        x = np.asarray(batch, dtype=np.float64)
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise EdgecvError(f"expected a normalized N x {self.channels} x H x W batch, got shape {x.shape}")
        c = (1, self.channels, 1, 1)
        p = (x * np.asarray(self.std).reshape(c) + np.asarray(self.mean).reshape(c)) * 255.0
        return np.ascontiguousarray(np.clip(np.rint(p), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


def normalization_in(props: dict[str, str], where: object = "the model") -> Normalization | None:
    """The normalization recorded in an ONNX file's metadata_props (None when it records none)."""
    if META_MEAN not in props or META_STD not in props:
        return None
    try:
        return Normalization(tuple(json.loads(props[META_MEAN])), tuple(json.loads(props[META_STD])))
    except (ValueError, TypeError):
        raise EdgecvError(f"{where}: its {META_MEAN}/{META_STD} metadata is not a list of numbers") from None


# ---- the graph rewrite ------------------------------------------------------------------------------


@dataclass
class _FirstConv:
    """The first convolution and what feeds it: the graph input, directly (float) or through Q -> DQ."""

    conv: Any  # onnx.NodeProto
    quantize: Any | None  # QuantizeLinear of the input (INT8 graphs)
    dequantize: Any | None
    weight: np.ndarray  # float, dequantized
    weight_dq: Any | None  # DequantizeLinear of the int8 weight
    bias: np.ndarray  # float, dequantized (zeros when the conv has none)
    bias_dq: Any | None  # DequantizeLinear of an int32 bias (onnxruntime target)


def _consumers(graph, name: str) -> list:
    return [n for n in graph.node if name in n.input]


def _only(graph, name: str, what: str) -> Any:
    users = _consumers(graph, name)
    if len(users) != 1:
        ops = ", ".join(n.op_type for n in users) or "nothing"
        raise EdgecvError(f"frame input: {what} feeds {ops}; a frame input needs one first convolution")
    return users[0]


def _const(inits: dict, name: str, what: str) -> np.ndarray:
    from onnx import numpy_helper

    if name not in inits:
        raise EdgecvError(f"frame input: the first convolution's {what} is not a constant")
    return numpy_helper.to_array(inits[name])


def _dequantized(inits: dict, dq) -> np.ndarray:
    q = _const(inits, dq.input[0], "quantized weight").astype(np.float64)
    scale = _const(inits, dq.input[1], "weight scale").astype(np.float64)
    zp = _const(inits, dq.input[2], "zero point").astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if np.ndim(scale) == 1:
        shape[axis] = -1
    return (q - np.reshape(zp, shape if np.ndim(zp) == 1 else ())) * np.reshape(scale, shape if np.ndim(scale) == 1 else ())


def _find_first_conv(graph, input_name: str) -> _FirstConv:
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    first = _only(graph, input_name, "the input")
    quantize = dequantize = None
    if first.op_type == "QuantizeLinear":
        quantize, dequantize = first, _only(graph, first.output[0], "the input's QuantizeLinear")
        if dequantize.op_type != "DequantizeLinear":
            raise EdgecvError(f"frame input: the input's QuantizeLinear feeds {dequantize.op_type}, not DequantizeLinear")
        first = _only(graph, dequantize.output[0], "the quantized input")
    conv = first
    if conv.op_type != "Conv" or conv.input[0] != (dequantize.output[0] if dequantize else input_name):
        raise EdgecvError(f"frame input: the model's first layer is {conv.op_type}, not a convolution")
    if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
        raise EdgecvError("frame input: the first convolution uses auto_pad; export it with explicit pads")
    weight_dq = producer.get(conv.input[1])
    if weight_dq is not None and weight_dq.op_type == "DequantizeLinear":
        weight = _dequantized(inits, weight_dq)
    else:
        weight_dq, weight = None, _const(inits, conv.input[1], "weight").astype(np.float64)
    bias_dq, bias = None, np.zeros(weight.shape[0])
    if len(conv.input) > 2 and conv.input[2]:
        node = producer.get(conv.input[2])
        if node is not None and node.op_type == "DequantizeLinear":
            bias_dq, bias = node, _dequantized(inits, node)
        else:
            bias = _const(inits, conv.input[2], "bias").astype(np.float64)
    return _FirstConv(conv, quantize, dequantize, weight, weight_dq, bias.reshape(-1), bias_dq)


def _input_channel_of_weight(weight: np.ndarray, group: int) -> np.ndarray:
    """For each (out, in-of-group) weight slice, the input channel of the frame it reads."""
    out_ch, in_per_group = weight.shape[:2]
    per_group_out = out_ch // group
    return (np.arange(out_ch)[:, None] // per_group_out) * in_per_group + np.arange(in_per_group)[None, :]


def _quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric per output channel, as edgecv's weight quantizer does: scale = max|w| / 127."""
    amax = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    scale = np.where(amax > 1e-8, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale.astype(np.float64).reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    return q, scale


def _attr(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _set_pads(conv, pads: list[int]) -> None:
    from onnx import helper

    kept = [a for a in conv.attribute if a.name != "pads"]
    del conv.attribute[:]
    conv.attribute.extend([*kept, helper.make_attribute("pads", pads)])


@dataclass
class FramePlan:
    """How a frame input was folded; written to metadata.json and asserted by the tests."""

    kind: str  # "onnxruntime-int8" | "tensorrt-int8" | "float"
    padding: str  # "zero point" | "explicit" | "exact (mean subtracted in float)" | "none needed"
    zero_point: int | None
    border_error_levels: float  # largest |padded pixel - mean pixel| the border sees, in pixel levels
    first_conv: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def fold_frame_input(proto: onnx.ModelProto, norm: Normalization, float_weight: np.ndarray | None = None
                     ) -> tuple[onnx.ModelProto, FramePlan]:
    """A copy of `proto` (float, or INT8 Q/DQ for either target) whose input is a uint8 N x H x W x C frame,
    with `norm` folded into the first convolution (see the module docstring). The input keeps its name.

    `float_weight`: the first conv's float weights before quantization (`first_conv_float_weight` of the
    torch model). INT8 graphs then re-quantize the folded weights from them, rounding once; without them the
    int8 weights are dequantized, folded and rounded again (measured on an RGB net: logit SQNR against the
    float model 31.0 dB rounding once, 23.9 dB rounding twice, 28.8 dB for the float-input INT8 file)."""
    from onnx import TensorProto, helper

    proto = copy.deepcopy(proto)
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EdgecvError(f"frame input: expected one image input, the model has {len(inputs)}")
    source = inputs[0]
    if source.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise EdgecvError("frame input: the model's input is not float (is it a frame-input file already?)")
    dims = source.type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.dim_value for d in dims[1:]):
        raise EdgecvError("frame input: expected an N x C x H x W input with fixed C, H and W")
    batch_dim, (c, h, w) = dims[0], (d.dim_value for d in dims[1:])
    if c != norm.channels:
        raise EdgecvError(f"frame input: the model takes {c} channels, the normalization has {norm.channels}")
    first = _find_first_conv(graph, source.name)
    group = int(_attr(first.conv, "group", 1))
    channel = _input_channel_of_weight(first.weight, group)
    std = np.asarray(norm.std, dtype=np.float64)
    if float_weight is not None:
        _check_float_weight(first, np.asarray(float_weight, dtype=np.float64))
    weight = (first.weight if float_weight is None else np.asarray(float_weight, np.float64)) / (
        255.0 * std[channel])[:, :, None, None]
    frame = helper.make_tensor_value_info(source.name, TensorProto.UINT8, [None, h, w, c])
    frame.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    rewrite = _rewrite_int8_onnxruntime if first.quantize is not None and _is_uint8(graph, first.quantize) else (
        _rewrite_int8_tensorrt if first.quantize is not None else _rewrite_float)
    plan = rewrite(graph, first, weight, channel, norm, source.name, (h, w))
    graph.input.remove(source)
    graph.input.insert(0, frame)
    _drop_dead(graph)
    ours = {META_INPUT: UINT8_NHWC, META_MEAN: json.dumps(list(norm.mean)), META_STD: json.dumps(list(norm.std))}
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in ours]
    del proto.metadata_props[:]
    for key, value in [*kept, *ours.items()]:
        proto.metadata_props.add(key=key, value=value)
    return proto, plan


def _check_float_weight(first: _FirstConv, float_weight: np.ndarray) -> None:
    """The float weights must be the ones the graph's first conv quantized (within half a step)."""
    if float_weight.shape != first.weight.shape:
        raise EdgecvError(f"frame input: float weights of shape {float_weight.shape} do not match the first "
                          f"convolution's {first.weight.shape}")
    if first.weight_dq is None:
        step = 1e-6 * max(float(np.abs(first.weight).max()), 1e-12)
    else:
        step = (np.abs(first.weight).reshape(len(first.weight), -1).max(1) / 127.0).reshape(-1, 1, 1, 1)
    if np.any(np.abs(float_weight - first.weight) > 0.5 * step * (1 + 1e-4) + 1e-12):
        raise EdgecvError("frame input: the float weights given are not the first convolution's")


def first_conv_float_weight(model: Any) -> np.ndarray | None:
    """The float weights (BatchNorm folded) of the conv a fake-quant torch.fx model applies first to its
    input, before weight quantization; None for a model that is not one (its ONNX weights are float)."""
    from torch import fx

    from edgecv.compress.quantize import FakeQuantize, QuantConv2d
    from edgecv.export.onnx import FrozenQuantize, for_export

    if not isinstance(model, fx.GraphModule):
        return None
    model = for_export(model)
    reached = {n for n in model.graph.nodes if n.op == "placeholder"}
    for node in model.graph.nodes:
        if node.op != "call_module" or not node.args or node.args[0] not in reached:
            continue
        module = model.get_submodule(node.target)
        if isinstance(module, QuantConv2d):
            return module.weight.detach().double().cpu().numpy()
        if not isinstance(module, FakeQuantize | FrozenQuantize):  # for_export froze the input quantizer
            return None
        reached.add(node)
    return None


def _is_uint8(graph, quantize) -> bool:
    from onnx import TensorProto

    zp = next((i for i in graph.initializer if len(quantize.input) > 2 and i.name == quantize.input[2]), None)
    return zp is None or zp.data_type == TensorProto.UINT8


def _add_init(graph, name: str, value: np.ndarray) -> str:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _insert_before(graph, anchor, nodes: list) -> None:
    """Insert `nodes` in front of `anchor`, keeping the node list in topological order."""
    at = list(graph.node).index(anchor)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)


def _rewrite_float(graph, first: _FirstConv, weight, channel, norm, name, hw) -> FramePlan:
    """uint8 frame -> Cast -> Sub(mean pixel) -> Transpose -> Conv(weight / (255 std)). Padding is exact."""
    from onnx import TensorProto, helper

    conv = first.conv
    mean = _add_init(graph, "frame_mean_pixel", norm.mean_pixel.astype(np.float32))
    conv.input[1] = _add_init(graph, f"{conv.name}_frame_weight", weight.astype(np.float32))
    nodes = [
        helper.make_node("Cast", [name], ["frame_float"], name="frame_Cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", ["frame_float", mean], ["frame_centered"], name="frame_Sub"),
        helper.make_node("Transpose", ["frame_centered"], ["frame_nchw"], name="frame_Transpose", perm=[0, 3, 1, 2]),
    ]
    _insert_before(graph, conv, nodes)
    conv.input[0] = "frame_nchw"
    return FramePlan("float", "exact (mean subtracted in float)", None, 0.0, conv.name)


def _rewrite_int8_tensorrt(graph, first: _FirstConv, weight, channel, norm, name, hw) -> FramePlan:
    """uint8 frame -> Cast -> Sub(mean pixel) -> Transpose -> Q/DQ (int8, zero point 0, a scale that covers
    every pixel) -> Conv(re-quantized folded weights, same bias). Padding is exact."""
    from onnx import TensorProto, helper

    conv, m = first.conv, norm.mean_pixel
    scale = np.float32(np.max(np.maximum(m, 255.0 - m)) / 127.0)
    zero = _add_init(graph, "frame_zero_point", np.int8(0))
    s = _add_init(graph, "frame_scale", scale)
    mean = _add_init(graph, "frame_mean_pixel", m.astype(np.float32))
    _, w_scale = _replace_weight(graph, first, weight)
    if first.bias_dq is not None:  # an int32 bias is in units of input scale x weight scale: both changed
        _set_int32_bias(graph, first.conv, first.bias, float(scale) * w_scale.astype(np.float64))
    nodes = [
        helper.make_node("Cast", [name], ["frame_float"], name="frame_Cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", ["frame_float", mean], ["frame_centered"], name="frame_Sub"),
        helper.make_node("Transpose", ["frame_centered"], ["frame_nchw"], name="frame_Transpose", perm=[0, 3, 1, 2]),
        helper.make_node("QuantizeLinear", ["frame_nchw", s, zero], ["frame_q"], name="frame_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["frame_q", s, zero], ["frame_dq"], name="frame_DequantizeLinear"),
    ]
    _insert_before(graph, conv, nodes)
    conv.input[0] = "frame_dq"
    return FramePlan("tensorrt-int8", "exact (mean subtracted in float)", 0, 0.0, conv.name)


def _rewrite_int8_onnxruntime(graph, first: _FirstConv, weight, channel, norm, name, hw) -> FramePlan:
    """uint8 frame [-> Pad -> Max] -> Transpose -> DequantizeLinear(scale 1, zero point z) -> Conv with
    re-quantized folded weights and an int32 bias that absorbs sum(W' (z - m))."""
    from onnx import helper

    conv, m = first.conv, norm.mean_pixel
    pads = list(_attr(conv, "pads", [0, 0, 0, 0]))
    z = int(np.clip(np.rint((m.min() + m.max()) / 2), 0, 255))
    explicit = any(pads) and float(np.max(np.abs(m - z))) > ZERO_POINT_PAD_TOLERANCE + 1e-9
    w_eff, w_scale = _replace_weight(graph, first, weight)
    bias = first.bias + (w_eff * (z - m[channel])[:, :, None, None]).sum(axis=(1, 2, 3))
    bias_node = _set_int32_bias(graph, conv, bias, w_scale.astype(np.float64))  # input scale is 1
    one = _add_init(graph, "frame_scale", np.float32(1.0))
    zp = _add_init(graph, "frame_zero_point", np.uint8(z))
    nodes, source = [], name
    if explicit:
        source = _explicit_pad(graph, nodes, name, pads, hw, np.clip(np.rint(m), 0, 255).astype(np.uint8))
        _set_pads(conv, [0, 0, 0, 0])
    nodes += [
        helper.make_node("Transpose", [source], ["frame_nchw"], name="frame_Transpose", perm=[0, 3, 1, 2]),
        helper.make_node("DequantizeLinear", ["frame_nchw", one, zp], ["frame_dq"], name="frame_DequantizeLinear"),
    ]
    _insert_before(graph, bias_node, nodes)
    conv.input[0] = "frame_dq"
    if not any(pads):
        return FramePlan("onnxruntime-int8", "none needed", z, 0.0, conv.name)
    if explicit:
        err = float(np.max(np.abs(np.rint(m) - m)))
        return FramePlan("onnxruntime-int8", "explicit", z, err, conv.name)
    return FramePlan("onnxruntime-int8", "zero point", z, float(np.max(np.abs(m - z))), conv.name)


def _explicit_pad(graph, nodes: list, name: str, pads: list[int], hw: tuple[int, int], pixel: np.ndarray) -> str:
    """Pad the uint8 NHWC frame with the (rounded) mean pixel of each channel: Pad with 0, then Max with a
    constant that holds the mean pixel on the border and 0 inside. Returns the padded tensor's name.
    (Max against a full-size constant is one pass at memory speed in ONNX Runtime 1.32; Where on a mask, or
    Max against row and column constants, broadcast element by element and ran over ten times slower.)"""
    from onnx import helper

    top, left, bottom, right = pads
    h, w = hw
    border = np.broadcast_to(pixel, (1, h + top + bottom, w + left + right, len(pixel))).copy()
    border[:, top : top + h, left : left + w, :] = 0
    p = _add_init(graph, "frame_pads", np.array([0, top, left, 0, 0, bottom, right, 0], dtype=np.int64))
    b = _add_init(graph, "frame_border", border)
    nodes += [
        helper.make_node("Pad", [name, p], ["frame_zero_padded"], name="frame_Pad", mode="constant"),
        helper.make_node("Max", ["frame_zero_padded", b], ["frame_padded"], name="frame_PadWithMeanPixel"),
    ]
    return "frame_padded"


def _replace_weight(graph, first: _FirstConv, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give the first conv's weight DequantizeLinear the folded weights, re-quantized per output channel;
    returns (the weights it now dequantizes to, their per-channel scale)."""
    if first.weight_dq is None:
        raise EdgecvError("frame input: the first convolution of this INT8 graph has float weights")
    q, scale = _quantize_per_channel(weight)
    dq, name = first.weight_dq, first.conv.name
    dq.input[0] = _add_init(graph, f"{name}_frame_weight_quantized", q)
    dq.input[1] = _add_init(graph, f"{name}_frame_weight_scale", scale)
    zero = _add_init(graph, f"{name}_frame_weight_zero_point", np.zeros(len(scale), np.int8))
    if len(dq.input) > 2:
        dq.input[2] = zero
    else:
        dq.input.append(zero)
    return q.astype(np.float64) * scale.astype(np.float64).reshape(-1, 1, 1, 1), scale


def _drop_dead(graph) -> None:
    """Remove nodes whose outputs nobody reads (the old input Q/DQ), then unused initializers and value_info."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for item in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(item)
    produced = {o for n in graph.node for o in n.output}
    for item in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(item)


def _set_int32_bias(graph, conv, bias: np.ndarray, scale: np.ndarray):
    """The conv's bias as int32 + DequantizeLinear with `scale` (input scale x weight scale, per channel),
    as ONNX Runtime's QLinearConv fusion wants it. Returns the DequantizeLinear node (inserted before conv)."""
    from onnx import helper

    q = np.rint(bias / scale)
    if np.any(np.abs(q) > 2**31 - 1):
        raise EdgecvError("frame input: the first convolution's folded bias does not fit int32")
    b = _add_init(graph, f"{conv.name}_frame_bias", q.astype(np.int32))
    b_scale = _add_init(graph, f"{conv.name}_frame_bias_scale", scale.astype(np.float32))
    b_zero = _add_init(graph, f"{conv.name}_frame_bias_zero_point", np.zeros(len(q), np.int32))
    node = helper.make_node("DequantizeLinear", [b, b_scale, b_zero], [f"{conv.name}_frame_bias_dq"],
                            name=f"{conv.name}_frame_bias_DequantizeLinear", axis=0)
    _insert_before(graph, conv, [node])
    if len(conv.input) > 2:
        conv.input[2] = node.output[0]
    else:
        conv.input.append(node.output[0])
    return node


# ---- files, parity, and what ONNX Runtime runs ---------------------------------------------------------


def export_frame_onnx(source: Path, dest: Path, norm: Normalization, model: Any = None) -> FramePlan:
    """Write `dest`: the float-input ONNX file `source` with a frame input (see `fold_frame_input`),
    checked by onnx and written atomically. `model`: the torch model `source` was exported from, whose
    float first-conv weights let an INT8 graph round its folded weights once."""
    import onnx

    from edgecv.io import atomic_write_bytes

    float_weight = first_conv_float_weight(model) if model is not None else None
    proto, plan = fold_frame_input(onnx.load(str(source)), norm, float_weight)
    onnx.checker.check_model(proto)
    atomic_write_bytes(dest, proto.SerializeToString())
    return plan


def sqnr_db(expected: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `got` against `expected`, in dB (inf when equal)."""
    noise = float(np.sum((np.asarray(expected, np.float64) - got) ** 2))
    signal = float(np.sum(np.asarray(expected, np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)


def check_frame_parity(model: Any, path: Path, frames: np.ndarray, norm: Normalization, int8: bool) -> dict:
    """The torch `model` on preprocessed `frames` against a real onnxruntime session of the frame-input file
    on the frames themselves. Float passes within 1e-4 of the logit range (as a float-input file does);
    INT8 passes with top-1 agreement >= 99 % or, on a net whose logits are nearly tied (a one-epoch model
    flips 3 % of its top-1 when only its input rounding is removed), a logit SQNR >= 30 dB. Measured on
    such a net: the correct frame file 40.5 dB, the same file fed BGR frames or folded with a wrong mean
    11 dB, padding with black -6 dB, every pixel off by one level 32 dB.

    For INT8 the reference is the fake-quant model reading its input exactly (its input quantizer off):
    a frame file carries every pixel value exactly, so comparing it with a model that rounds its input
    would count the rounding the frame file removed as disagreement (measured: 97 % agreement on a
    one-epoch model whose float-input file agrees 100 %)."""
    import torch

    from edgecv.export.onnx import ort_session

    reference = without_input_quantizers(model) if int8 else model
    was_training = reference.training
    reference.eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(norm.preprocess(frames))).float().cpu().numpy()
    reference.train(was_training)
    got = ort_session(Path(path)).run(None, {ort_session_input(path): frames})[0]
    max_abs_diff = float(np.max(np.abs(expected - got)))
    logit_range = float(expected.max() - expected.min())
    agreement = float(np.mean(expected.argmax(1) == got.argmax(1)))
    sqnr = sqnr_db(expected, got)
    ok = (agreement >= 0.99 or sqnr >= INT8_MIN_SQNR_DB) if int8 else max_abs_diff <= 1e-4 * max(logit_range, 1e-12)
    return {"ok": bool(ok), "max_abs_diff": max_abs_diff, "logit_range": logit_range,
            "top1_agreement": agreement, "sqnr_db": round(sqnr, 2), "n": int(len(frames))}


def without_input_quantizers(qmodel: Any) -> Any:
    """A copy of a fake-quant (torch.fx) model whose quantizers that read the model's input are off."""
    from torch import fx

    from edgecv.compress.quantize import FakeQuantize

    if not isinstance(qmodel, fx.GraphModule):
        return qmodel
    copy_ = copy.deepcopy(qmodel)
    inputs = {n for n in copy_.graph.nodes if n.op == "placeholder"}
    for node in copy_.graph.nodes:
        if node.op == "call_module" and node.args and node.args[0] in inputs:
            module = copy_.get_submodule(node.target)
            if isinstance(module, FakeQuantize):
                module.enabled.fill_(False)
    return copy_


def ort_session_input(path: Path) -> str:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return next(i.name for i in proto.graph.input if i.name not in inits)


def ort_prologue(path: Path) -> list[str]:
    """The ops ONNX Runtime runs (all optimizations, NHWC layout included) before the first convolution:
    a frame-input INT8 file shows none, or Pad and Max where it pads explicitly."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # the "hardware-specific optimized model" warning is expected here
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    inits = {i.name for i in graph.initializer}
    reached = {i.name for i in graph.input if i.name not in inits}
    ops = []
    for node in graph.node:  # topological order: follow what the input feeds until the first convolution
        if not reached.intersection(node.input):
            continue
        if node.op_type in ("Conv", "QLinearConv", "FusedConv", "NchwcConv", "ConvInteger"):
            return ops
        ops.append(node.op_type)
        reached.update(node.output)
    return ops
