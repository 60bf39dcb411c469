"""The frame-input graph rewrite: a uint8 NHWC input, with the preprocessing folded into the first convolution.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edgecv.compress.quantize.fakequant import symmetric_scale
from edgecv.errors import EdgecvError
from edgecv.export.normalization import (
    META_INPUT,
    META_MEAN,
    META_STD,
    UINT8_NHWC,
    ZERO_POINT_PAD_TOLERANCE,
    Normalization,
)
from edgecv.export.qdq import write_bias

if TYPE_CHECKING:
    import onnx


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


def _weight_scale(weight: np.ndarray) -> np.ndarray:
    """The per-output-channel int8 scale of `weight` (float64), by the weight quantizer's rule."""
    amax = torch.from_numpy(np.abs(weight).reshape(weight.shape[0], -1).max(axis=1))
    return symmetric_scale(amax).double().numpy()


def _quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric per output channel, as edgecv's weight quantizer does: scale = max|w| / 127."""
    scale = _weight_scale(weight).astype(np.float32)
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
        step = _weight_scale(first.weight).reshape(-1, 1, 1, 1)
    if np.any(np.abs(float_weight - first.weight) > 0.5 * step * (1 + 1e-4) + 1e-12):
        raise EdgecvError("frame input: the float weights given are not the first convolution's")


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
    scale = np.float32(symmetric_scale(torch.tensor(float(np.max(np.maximum(m, 255.0 - m))))))
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
    _set_int32_bias(graph, conv, bias, w_scale.astype(np.float64))  # input scale is 1
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
    _insert_before(graph, conv, nodes)
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


def _set_int32_bias(graph, conv, bias: np.ndarray, scale: np.ndarray) -> None:
    """The conv's bias as int32 + DequantizeLinear with `scale` (input scale x weight scale, per channel), or
    a float Add after it where int32 overflows (see `write_bias`)."""
    before, after = write_bias(graph, conv, bias, scale, f"{conv.name}_frame_bias")
    _insert_before(graph, conv, before)
    if after:
        at = list(graph.node).index(conv) + 1
        for offset, node in enumerate(after):
            graph.node.insert(at + offset, node)
