"""Rebuild a fake-quant model for another target with the same calibrated or trained ranges.

A recipe quantizes for one target (its ptq/qat `target`); an engine needs TensorRT's placement (symmetric
INT8 on the inputs of weighted layers and residual Adds). Every tensor TensorRT quantizes is one the
source placement quantized too (ONNX Runtime's placement quantizes each tensor a quantized op reads), so
the new model takes the source's weights and, per quantized tensor, the source's range: symmetric,
amax = max(|lo|, |hi|). No recalibration and no retraining. Weights that a learned (QAT) weight range
clips are clamped to that range, so their int8 values stay in [-127, 127] as TensorRT wants (the source's
fake quantizer rounded them to -128 at most: one step).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from edgecv.compress.quantize.build import META_KEY, build_quantized
from edgecv.compress.quantize.fakequant import FakeQuantize, QuantConv2d, QuantLinear, bn_factor
from edgecv.compress.quantize.graph import node_kind
from edgecv.errors import EdgecvError

_PASS_THROUGH = ("transparent", "shape")  # nodes whose output is their input's quantized value


def _quantizer_of(node: fx.Node, modules: dict[str, nn.Module]) -> FakeQuantize | None:
    """The activation quantizer the source model applies to `node`'s value: one of its users, or the node
    itself, or (through dropout / identity / flatten) the quantizer of its input."""
    while node is not None:
        if node.op == "call_module" and isinstance(modules.get(node.target), FakeQuantize):
            return modules[node.target]  # type: ignore[return-value]
        for user in node.users:
            if user.op == "call_module" and isinstance(modules.get(user.target), FakeQuantize):
                return modules[user.target]  # type: ignore[return-value]
        if node_kind(node, modules) not in _PASS_THROUGH or not node.args:
            return None
        node = node.args[0] if isinstance(node.args[0], fx.Node) else None
    return None


def _amax(q: FakeQuantize) -> torch.Tensor:
    if q.symmetric:
        return q.amax.detach().abs()
    lo, hi = q.lo.detach().clamp(max=0.0), q.hi.detach().clamp(min=0.0)
    return torch.maximum(-lo, hi)


@torch.no_grad()
def clamp_weights_to_ranges(model: nn.Module) -> None:
    """Clamp each weight to its stored per-channel range (learned in QAT), so that symmetric quantization
    gives int8 values in [-127, 127], never -128. Weights with a live per-channel max are untouched."""
    for m in model.modules():
        if not isinstance(m, (QuantConv2d, QuantLinear)) or bool(m.weight_quant.dynamic):
            continue
        amax = m.weight_quant.amax.detach().abs()
        if isinstance(m, QuantConv2d) and m.bn is not None:  # the range applies to the BN-scaled weight
            amax = amax / bn_factor(m.bn).abs().clamp(min=1e-12)
        bound = amax.reshape(-1, *([1] * (m.weight.dim() - 1)))
        m.weight.copy_(torch.maximum(torch.minimum(m.weight, bound), -bound))


def retarget(qmodel: fx.GraphModule, target: str, float_model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """`qmodel` (made by prepare_qat for some target) rebuilt for `target`: `float_model` gives the structure
    (its weights are not used), `qmodel` the weights and every activation range."""
    spec = qmodel.meta[META_KEY]
    if spec.target == target:
        return qmodel
    new = build_quantized(float_model, dataclasses.replace(spec, target=target), example_input)
    source_modules = dict(qmodel.named_modules())
    new_modules = dict(new.named_modules())
    quantizers = {name for name, m in new_modules.items() if isinstance(m, FakeQuantize) and not m.is_weight}
    source_state = qmodel.state_dict()
    state = {k: v for k, v in new.state_dict().items()
             if k.rpartition(".")[0] not in quantizers and k in source_state}
    new.load_state_dict({**new.state_dict(), **{k: source_state[k] for k in state}})
    source_nodes = {n.name: n for n in qmodel.graph.nodes}
    for node in new.graph.nodes:
        if node.target not in quantizers or node.op != "call_module":
            continue
        producer = node.args[0]
        source = source_nodes.get(producer.name) if isinstance(producer, fx.Node) else None
        q = _quantizer_of(source, source_modules) if source is not None else None
        if q is None:
            raise EdgecvError(
                f"export: cannot rebuild the INT8 model for {target}: the {spec.target} model has no range "
                f"for tensor {getattr(producer, 'name', producer)!r}; quantize with target: {target} instead"
            )
        amax = _amax(q)
        new_modules[node.target].set_range(-amax, amax)
        new_modules[node.target].enabled.fill_(bool(q.enabled))
    clamp_weights_to_ranges(new)
    return new.train(qmodel.training)
