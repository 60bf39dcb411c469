"""ONNX export with the TorchScript exporter (dynamo=False: the dynamo exporter fails on fake-quant with a
dynamic batch), and a parity check against torch with a real onnxruntime session.

A fake-quant model (from prepare_qat) exports to QuantizeLinear/DequantizeLinear, with every quantizer
frozen to its constant scale and zero point (`for_export`); `edgecv.export.qdq` then makes the graph the
integer Q/DQ graph the target's backend expects. Parity is judged by `edgecv.export.parity`.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
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
from edgecv.export.parity import int8_parity_ok, logit_agreement
from edgecv.export.qdq import drop_unused_initializers, finalize_qdq, fold_constants


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
            fold_constants(proto.graph)
            drop_unused_initializers(proto.graph)
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


def for_export(qmodel: nn.Module) -> nn.Module:
    """A copy of a fake-quant model for export: simulated BatchNorm folding (freeze_bn=False) made real, and
    every quantizer frozen to its constant scale and zero point."""
    qmodel = copy.deepcopy(qmodel).eval()
    for name, m in list(qmodel.named_modules()):
        if isinstance(m, QuantConv2d) and m.bn is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(qmodel.get_submodule(parent_name) if parent_name else qmodel, attr, m.folded().eval())
    for m in list(qmodel.modules()):
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.weight_quant.freeze(m.weight)
    for m in list(qmodel.modules()):
        if isinstance(m, FakeQuantize) and not m.is_weight:
            m.freeze()
    return qmodel


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
