"""ONNX export with the TorchScript exporter (dynamo=False: the dynamo exporter fails on fake-quant with a dynamic batch), Q/DQ post-processing, and a
parity check against torch with a real onnxruntime session.

A fake-quant model (from prepare_qat) exports to QuantizeLinear/DequantizeLinear. The graph is then made
what the backend expects: constant subgraphs (range -> scale / zero point) are folded, each weight is stored
as an int8 initializer feeding its DequantizeLinear (~4x smaller file), and for the onnxruntime target each
Conv/Gemm bias becomes int32 + DequantizeLinear with scale = input scale * weight scale, as
onnxruntime.quantization.quantize_static writes it, so ORT fuses DQ -> Conv -> Q into QLinearConv; a
dequantized tensor times a positive constant becomes one DequantizeLinear with the scale multiplied (so the
op reading it still fuses), and Shape reads the integer tensor rather than dequantizing it.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from edgecv.compress.quantize import (
    PROFILES,
    FakeQuantize,
    QuantConv2d,
    QuantLinear,
    is_quantized,
    quant_spec,
)
from edgecv.errors import EdgecvError


def export_onnx(
    model: nn.Module,
    path: Path,
    example_input: torch.Tensor,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Export `model` to `path` atomically (temporary file in the same folder, checked, then renamed).
    Input "input", output "logits", batch axis dynamic. Fake-quant models get an integer Q/DQ graph for
    their prepare_qat target (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    quantized = is_quantized(model)
    export_model = for_export(model) if quantized else model
    if quantized:
        opset = max(opset, 13)  # per-channel QuantizeLinear
    was_training = model.training
    export_model.eval()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
            try:
                torch.onnx.export(
                    export_model,
                    (example_input,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
                    do_constant_folding=True,
                )
            except torch.onnx.errors.OnnxExporterError as exc:
                raise EdgecvError(_export_failure(export_model, example_input, exc)) from None
        proto = onnx.load(str(tmp))
        if quantized:
            int32_bias = PROFILES.get(quant_spec(model).target).int32_bias
            proto = finalize_qdq(proto, int32_bias=int32_bias)
        else:  # initializers the exporter shared through Identity nodes confuse quantize_static
            _fold_constants(proto.graph)
            _drop_unused_initializers(proto.graph)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return path


def _adaptive_pool_sizes(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, tuple, tuple]]:
    """(name, input size, output size) of each AdaptiveAvgPool2d that runs on `example_input`."""
    found: list[tuple[str, tuple, tuple]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.AdaptiveAvgPool2d):

            def hook(mod, args, out, name=name) -> None:
                found.append((name, tuple(args[0].shape[-2:]), tuple(out.shape[-2:])))

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    except Exception:  # noqa: BLE001 - only an explanation is at stake here
        pass
    finally:
        for h in hooks:
            h.remove()
    return found


def _export_failure(model: nn.Module, example_input: torch.Tensor, exc: Exception) -> str:
    """One line for an ONNX export the TorchScript exporter refused, naming the layer when it is a pooling
    size that ONNX cannot express."""
    what = f"export: torch cannot export {type(model).__name__} to ONNX at {tuple(example_input.shape[-2:])} px"
    first = (str(exc).splitlines() or [""])[0]
    if "adaptive_avg_pool2d" in first:
        for name, size_in, size_out in _adaptive_pool_sizes(model, example_input):
            if any(i % o for i, o in zip(size_in, size_out, strict=True)):
                return (
                    f"{what}: layer {name!r} pools {size_in[0]}x{size_in[1]} to {size_out[0]}x{size_out[1]}, and ONNX "
                    "needs the output size to divide the input size; choose an image size where it does"
                )
        return f"{what}: an adaptive average pool's output size does not divide its input size"
    return f"{what}: {first.split(' [Caused by')[0][:200]}"


class FrozenQuantize(nn.Module):
    """A FakeQuantize with its scale and zero point computed once, as constants. It computes the same values
    in eval mode and exports to the same QuantizeLinear/DequantizeLinear, without the range arithmetic the
    exporter would otherwise trace, optimize and fold for every quantizer (most of the export time)."""

    def __init__(self, quantizer: FakeQuantize, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        with torch.no_grad():
            scale, zero_point = quantizer.qparams(weight)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())
        self.enabled = bool(quantizer.enabled)
        self.per_channel = quantizer.channels is not None
        self.axis, self.quant_min, self.quant_max = quantizer.axis, quantizer.quant_min, quantizer.quant_max
        self.narrow_range = bool(quantizer.narrow_range and quantizer.symmetric)  # TensorRT: never -128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.narrow_range:  # as FakeQuantize does: clip to +-127 steps, so the int8 file has no -128
            shape = [1] * x.dim()
            if self.per_channel:
                shape[self.axis] = -1
            bound = (127.0 * self.scale).reshape(shape)
            x = torch.clamp(x, -bound, bound)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min, self.quant_max)


def for_export(qmodel: nn.Module) -> nn.Module:
    """A copy of a fake-quant model for export: simulated BatchNorm folding (freeze_bn=False) made real, and
    every quantizer frozen to its constant scale and zero point."""
    qmodel = copy.deepcopy(qmodel).eval()
    for name, m in list(qmodel.named_modules()):
        if isinstance(m, QuantConv2d) and m.bn is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(qmodel.get_submodule(parent_name) if parent_name else qmodel, attr, m.folded().eval())
    for name, m in list(qmodel.named_modules()):
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.weight_quant = FrozenQuantize(m.weight_quant, m.weight)
        elif isinstance(m, FakeQuantize) and not m.is_weight:
            parent_name, _, attr = name.rpartition(".")
            setattr(qmodel.get_submodule(parent_name) if parent_name else qmodel, attr, FrozenQuantize(m))
    return qmodel


# ---- Q/DQ graph post-processing ------------------------------------------------------------------


def _fold_constants(graph: onnx.GraphProto) -> None:
    """Evaluate every node whose inputs are all constants (Constant, scale/zero-point arithmetic, and
    QuantizeLinear of a weight, which yields the int8 weight), except DequantizeLinear."""
    from onnx.reference import ReferenceEvaluator

    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    kept = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        foldable = node.op_type != "DequantizeLinear" and all(i in consts for i in inputs)
        if not foldable:
            kept.append(node)
            continue
        if node.op_type == "Constant":
            outputs = (
                [numpy_helper.to_array(node.attribute[0].t)] if node.attribute[0].name == "value" else None
            )
            if outputs is None:
                outputs = ReferenceEvaluator(node).run(None, {})
        else:
            outputs = ReferenceEvaluator(node).run(None, {i: consts[i] for i in inputs})
        for name, value in zip(node.output, outputs, strict=True):
            consts[name] = np.asarray(value)
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    del graph.node[:]
    graph.node.extend(kept)


def _quantize_biases(graph: onnx.GraphProto) -> None:
    """Conv/Gemm float bias -> int32 initializer + DequantizeLinear(scale = s_input * s_weight, zp 0)."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    new_nodes = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) == 3 and node.input[2] in inits:
            dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
            if (
                dq_x is not None
                and dq_w is not None
                and dq_x.op_type == dq_w.op_type == "DequantizeLinear"
                and dq_x.input[1] in inits
                and dq_w.input[1] in inits
                and dq_w.input[0] in inits
            ):
                bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                s_x = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float64).reshape(())
                s_w = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64)
                scale = np.broadcast_to(s_x * s_w, bias.shape).astype(np.float32)
                q64 = np.round(bias / scale.astype(np.float64))
                if np.any(np.abs(q64) > 2**31 - 1):  # tiny input / weight scales: int32 would overflow
                    new_nodes.extend(_float_bias_after(node, bias, graph))
                    continue
                q = q64.astype(np.int32)
                base = node.input[2]
                graph.initializer.extend(
                    [
                        numpy_helper.from_array(q, f"{base}_quantized"),
                        numpy_helper.from_array(scale, f"{base}_quantized_scale"),
                        numpy_helper.from_array(np.zeros_like(q), f"{base}_quantized_zero_point"),
                    ]
                )
                new_nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{base}_quantized", f"{base}_quantized_scale", f"{base}_quantized_zero_point"],
                        [f"{base}_dequantized"],
                        name=f"{node.name}_bias_DequantizeLinear",
                        axis=0,
                    )
                )
                node.input[2] = f"{base}_dequantized"
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)


def _float_bias_after(node: onnx.NodeProto, bias: np.ndarray, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """`node` without its bias, then a float Add of it. ONNX Runtime fuses DQ -> Conv/Gemm -> Q even with a
    float bias and then drops the bias; an Add in between keeps the layer (correctly) in float."""
    shape = (-1, 1, 1) if node.op_type == "Conv" else (-1,)
    name = f"{node.input[2]}_float"
    graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32).reshape(shape), name))
    output = node.output[0]
    del node.input[2]
    node.output[0] = f"{output}_without_bias"
    return [node, helper.make_node("Add", [node.output[0], name], [output], name=f"{node.name}_bias_Add")]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name in used or i.name == "input"]
    del graph.input[:]
    graph.input.extend(inputs)


def _transpose_quantized_weights(graph: onnx.GraphProto) -> None:
    """int8 weight -> DequantizeLinear -> Transpose (a Linear on a >2-D input exports MatMul(x, W^T)) becomes
    the transposed int8 weight -> DequantizeLinear, so the weight reaches MatMul straight from its DQ."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    kept = []
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or dq.input[0] not in inits
            or users[dq.output[0]] != 1
        ):
            kept.append(node)
            continue
        weight = numpy_helper.to_array(inits[dq.input[0]])
        perm = next(
            (list(a.ints) for a in node.attribute if a.name == "perm"), list(range(weight.ndim))[::-1]
        )
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % weight.ndim
        name = f"{dq.input[0]}_transposed"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name))
        dq.input[0] = name
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", perm.index(axis)))
        dq.output[0] = node.output[0]
    del graph.node[:]
    graph.node.extend(kept)


def _fold_scales_into_dequantize(graph: onnx.GraphProto) -> None:
    """DequantizeLinear(q, s, zp) -> Mul by a positive scalar constant c (or Div by one) becomes
    DequantizeLinear(q, s * c, zp): the same values, and the op that reads them reads a DQ, so ONNX Runtime
    fuses it (hard-sigmoid's 1/6 before QLinearMul)."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    kept, folded = [], False
    for node in graph.node:
        factor = _scalar_factor(node, inits)
        dq = producer.get(node.input[0]) if factor is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            kept.append(node)
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.ndim != 0:
            kept.append(node)
            continue
        name = f"{dq.input[1]}_times_{len(graph.initializer)}"
        graph.initializer.append(numpy_helper.from_array((scale * np.float32(factor)).astype(scale.dtype), name))
        inputs = [dq.input[0], name, *dq.input[2:]]
        kept.append(helper.make_node("DequantizeLinear", inputs, [node.output[0]], name=f"{node.name}_scale"))
        folded = True
    if folded:
        read = {i for n in kept for i in n.input} | {o.name for o in graph.output}
        kept = [n for n in kept if n.op_type != "DequantizeLinear" or any(o in read for o in n.output)]
        del graph.node[:]
        graph.node.extend(kept)


def _shapes_from_integer_tensors(graph: onnx.GraphProto) -> None:
    """Shape(DequantizeLinear(q)) reads Shape(q): the same shape, without dequantizing the whole tensor only
    to read its shape (`x.size()` in a channel shuffle)."""
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Shape" else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            node.input[0] = dq.input[0]
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in graph.node if n.op_type != "DequantizeLinear" or any(o in read for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)


def _scalar_factor(node: onnx.NodeProto, inits: dict) -> float | None:
    """c when `node` is Mul(x, c), Mul(c, x) or Div(x, 1/c) with a positive scalar initializer; else None."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    const = [i for i in node.input if i in inits]
    if len(const) != 1 or (node.op_type == "Div" and node.input[1] != const[0]):
        return None
    value = numpy_helper.to_array(inits[const[0]])
    if value.size != 1 or not np.issubdtype(value.dtype, np.floating) or float(value.reshape(())) <= 0:
        return None
    if node.input[0] == const[0]:
        node.input[0], node.input[1] = node.input[1], node.input[0]  # Mul(c, x): the tensor first
    c = float(value.reshape(()))
    return c if node.op_type == "Mul" else 1.0 / c


def finalize_qdq(proto: onnx.ModelProto, int32_bias: bool) -> onnx.ModelProto:
    """Make an exported fake-quant graph an integer Q/DQ graph (see the module docstring)."""
    graph = proto.graph
    _fold_constants(graph)
    if int32_bias:  # ONNX Runtime's integer graph (the TensorRT target's graph is left as its placement made it)
        _fold_scales_into_dequantize(graph)
        _shapes_from_integer_tensors(graph)
    _transpose_quantized_weights(graph)
    if int32_bias:
        _quantize_biases(graph)
    _drop_unused_initializers(graph)
    return proto


# ---- parity and size ------------------------------------------------------------------------------


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own types for unreadable files
        raise EdgecvError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None


# An INT8 file passes when every class's logits keep this signal-to-noise ratio against the fake-quant
# torch model (a broken scale or two swapped class outputs give 5 dB or less, a faithful INT8 graph 15-40 dB),
# and the samples whose top-1 margin exceeds the noise keep their top-1 class.
INT8_MIN_SQNR_DB = 10.0
INT8_MIN_AGREEMENT = 0.99
NOISE_QUANTILE = 0.99  # the quantization noise: what this share of the logits differ by at most
SQNR_CAP_DB = 99.0  # identical logits


def _sqnr_db(signal: np.ndarray, noise: np.ndarray, axis=None) -> np.ndarray:
    power, error = np.sum(signal**2, axis=axis), np.sum(noise**2, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(power / error)
    return np.where(error == 0, SQNR_CAP_DB, np.where(power == 0, -SQNR_CAP_DB, np.minimum(db, SQNR_CAP_DB)))


def _worst_column(error: np.ndarray) -> np.ndarray:
    return error[:, int(np.argmax(np.sum(error**2, axis=0)))]


def logit_agreement(expected: np.ndarray, got: np.ndarray) -> dict:
    """How closely `got` logits follow `expected` (n samples x classes), by measures that near-ties do not
    sway: SQNR of the logits centred per sample (overall, and of the class that strays most), and top-1
    agreement over the samples whose expected top-1 margin is more than twice the quantization noise; the
    raw top-1 agreement is reported beside them."""
    expected, got = expected.astype(np.float64), got.astype(np.float64)
    signal = expected - expected.mean(axis=1, keepdims=True)
    error = signal - (got - got.mean(axis=1, keepdims=True))
    noise = float(np.quantile(np.abs(error), NOISE_QUANTILE))
    top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((len(expected), 2))
    decided = (top2[:, 1] - top2[:, 0]) > 2.0 * noise
    same = expected.argmax(1) == got.argmax(1)
    return {
        "sqnr_db": round(float(_sqnr_db(signal, error)), 2),
        # the class whose logit strays most, against the average class's signal (a class whose logit sits
        # near the sample mean has little centred signal of its own and must not count as noisy)
        "worst_class_sqnr_db": round(float(_sqnr_db(signal / np.sqrt(signal.shape[1]), _worst_column(error))), 2),
        "noise": noise,
        "top1_agreement": float(np.mean(same)),
        "decided": int(decided.sum()),
        "decided_agreement": float(np.mean(same[decided])) if decided.any() else None,
    }


def int8_parity_ok(parity: dict) -> bool:
    """The INT8 gate on a logit_agreement result."""
    decided = parity["decided_agreement"]
    return parity["worst_class_sqnr_db"] >= INT8_MIN_SQNR_DB and (decided is None or decided >= INT8_MIN_AGREEMENT)


def check_parity(model: nn.Module, onnx_path: Path, inputs: torch.Tensor, int8: bool) -> dict:
    """Run torch and a real onnxruntime session on `inputs`. Float models pass when the largest difference
    is within 1e-4 of the logit range; INT8 models (compared with their fake-quant torch model) by
    int8_parity_ok, which near-tied logits of a random or freshly pruned model do not fail."""
    session = ort_session(Path(onnx_path))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(inputs).float().cpu().numpy()
    model.train(was_training)
    try:
        got = session.run(["logits"], {"input": inputs.cpu().numpy().astype(np.float32)})[0]
    except Exception as exc:  # ORT raises its own types, e.g. a kernel refusing its quantization parameters
        raise EdgecvError(f"{Path(onnx_path).name}: onnxruntime cannot run it ({_ort_message(exc)})") from None
    if got.shape != expected.shape:
        raise EdgecvError(
            f"{Path(onnx_path).name}: its logits have shape {tuple(got.shape)}, the torch model's {tuple(expected.shape)}"
        )
    max_abs_diff = float(np.max(np.abs(expected - got)))
    logit_range = float(expected.max() - expected.min())
    agreement = logit_agreement(expected, got)
    ok = int8_parity_ok(agreement) if int8 else max_abs_diff <= 1e-4 * max(logit_range, 1e-12)
    return {"ok": bool(ok), "max_abs_diff": max_abs_diff, "logit_range": logit_range, **agreement,
            "n": int(inputs.shape[0])}  # fmt: skip


def _ort_message(exc: Exception) -> str:
    """The part of an onnxruntime error that says what went wrong (its first line, without the code)."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text.split(" : ")[-1][:240]


def model_size_bytes(path: Path | str) -> int:
    """Bytes on disk of an ONNX file plus its external-data files, if any."""
    path = Path(path)
    total = path.stat().st_size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum(
        (path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).exists()
    )
