"""Models that eat camera frames: export a float-input ONNX file with a uint8 NHWC frame input (the graph
rewrite is `edgecv.export.frame_fold`, the normalization `edgecv.export.normalization`), check it against
the torch model in a real onnxruntime session, and show what ONNX Runtime runs before the first conv.
Resizing stays outside the model: frames come at the model's size, or the caller resizes them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from edgecv.export.frame_fold import FramePlan, fold_frame_input
from edgecv.export.normalization import (
    FLOAT_NCHW,
    INPUT_KINDS,
    META_INPUT,
    META_MEAN,
    META_STD,
    UINT8_NHWC,
    Normalization,
    normalization_in,
)
from edgecv.export.parity import frame_parity_ok, sqnr_db

__all__ = [
    "FLOAT_NCHW",
    "INPUT_KINDS",
    "META_INPUT",
    "META_MEAN",
    "META_STD",
    "UINT8_NHWC",
    "FramePlan",
    "Normalization",
    "check_frame_parity",
    "export_frame_onnx",
    "first_conv_float_weight",
    "fold_frame_input",
    "normalization_in",
    "ort_prologue",
    "ort_session_input",
    "without_input_quantizers",
]


def first_conv_float_weight(model: Any) -> np.ndarray | None:
    """The float weights (BatchNorm folded) of the conv a fake-quant torch.fx model applies first to its
    input, before weight quantization; None for a model that is not one (its ONNX weights are float)."""
    from torch import fx

    from edgecv.compress.quantize import FakeQuantize, QuantConv2d
    from edgecv.export.onnx import for_export

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
        if not isinstance(module, FakeQuantize):
            return None
        reached.add(node)
    return None


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


def check_frame_parity(model: Any, path: Path, frames: np.ndarray, norm: Normalization, int8: bool) -> dict:
    """The torch `model` on preprocessed `frames` against a real onnxruntime session of the frame-input file
    on the frames themselves. Float passes within 1e-4 of the logit range (as a float-input file does);
    INT8 passes by `frame_parity_ok`: top-1 agreement >= 99 % or, on a net whose logits are nearly tied (a
    one-epoch model flips 3 % of its top-1 when only its input rounding is removed), a logit SQNR >= 30 dB. Measured on
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
    ok = frame_parity_ok(agreement, sqnr) if int8 else max_abs_diff <= 1e-4 * max(logit_range, 1e-12)
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
