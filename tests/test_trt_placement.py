"""TensorRT Q/DQ placement held against NVIDIA's own quantizer (ModelOpt ONNX PTQ).

tests/data/trt_reference/<model>.json are written by tools/trt_reference_placement.py: where ModelOpt 0.47
quantized the float ONNX that edgecv exports, node by node (no weights). edgecv's TensorRT-target export of the
same model must quantize the same inputs of every residual Add, Mul and pool, and edgecv's TensorRT lint must
accept ModelOpt's graphs, rebuilt here from the files in both of ModelOpt's weight forms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgecv.compress.quantize import (
    apply_calibrator,
    collect_stats,
    prepare_qat,
    set_learnable_ranges,
)
from edgecv.export.lint import inspect_onnx
from edgecv.export.lint.pattern import qdq_pattern
from edgecv.export.lint.qdq_graph import WEIGHTED_OPS
from edgecv.export.onnx import check_parity, export_onnx
from edgecv.models import build_model

REFERENCE_DIR = Path(__file__).parent / "data" / "trt_reference"
REFERENCES = sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))
# exported in the default run (a few seconds each at 64 px); the other reference models run with -m slow
FAST = {"resnet18", "mobilenet_v2", "efficientnet_b0"}


def load_reference(stem: str) -> dict:
    return json.loads((REFERENCE_DIR / f"{stem}.json").read_text())


def test_reference_files_cover_the_named_families():
    assert {"resnet18", "mobilenet_v2", "efficientnet_b0"} <= set(REFERENCES)
    for stem in REFERENCES:
        ref = load_reference(stem)
        assert ref["modelopt_version"] == "0.47.0" and "--dq_only" in ref["command"]
        assert (REFERENCE_DIR / f"{stem}.json").stat().st_size < 200_000


def edgecv_tensorrt_pattern(ref: dict, tmp_path: Path) -> tuple[dict, Path]:
    size = ref["image_size"]
    torch.manual_seed(0)
    model = build_model(ref["model"], num_classes=10, in_channels=3, image_size=size).eval()
    x = torch.randn(4, 3, size, size)
    qmodel = prepare_qat(model, "tensorrt", x[:2])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    path = export_onnx(qmodel, tmp_path / "model.int8.onnx", x[:2])
    return qdq_pattern(onnx.load(str(path))), path


def placement_differences(ref: dict, ours: dict) -> list[str]:
    """Every op whose inputs are quantized differently from ModelOpt's graph. ModelOpt leaves the final
    classifier (a GEMV at batch 1) float where edgecv quantizes it: edges into it are not compared."""
    theirs = {row[0]: row for row in ref["graph"]}
    mine = {row[0]: row for row in ours["graph"]}
    if set(theirs) != set(mine):
        return [f"the graphs differ in ops: {sorted(set(theirs) ^ set(mine))[:10]}"]
    out = []
    for name, row in theirs.items():
        if sorted(i[0] for i in row[1]) != sorted(i[0] for i in mine[name][1]):
            out.append(f"{name} reads other ops: ModelOpt {row[1]}, edgecv {mine[name][1]}")
        elif name not in ref["counts"]["weighted_float"] and sorted(map(tuple, row[1])) != sorted(
            map(tuple, mine[name][1])
        ):
            out.append(f"{name} inputs [op, quantized]: ModelOpt {row[1]}, edgecv {mine[name][1]}")
    return out


@pytest.mark.parametrize(
    "stem", [s if s in FAST else pytest.param(s, marks=pytest.mark.slow) for s in REFERENCES]
)
def test_tensorrt_placement_matches_modelopt(stem, tmp_path):
    ref = load_reference(stem)
    ours, path = edgecv_tensorrt_pattern(ref, tmp_path)
    assert placement_differences(ref, ours) == []
    # the pattern records agree too: residual Adds read the skip input quantized and the conv output float
    theirs = {r["node"]: r for r in ref["nodes"]}
    for record in ours["nodes"]:
        expected = theirs[record["node"]]
        assert sorted(map(lambda i: (i["from"], i["quantized"]), record["inputs"])) == sorted(
            map(lambda i: (i["from"], i["quantized"]), expected["inputs"])
        ), record["node"]
        if not set(expected["consumers"]) <= set(ref["counts"]["weighted_float"]):
            assert record["output_quantized"] == expected["output_quantized"], record["node"]
    for key in ("residual_adds", "residual_adds_quantized_inputs_one", "silu_outputs_quantized", "muls"):
        assert ours["counts"].get(key, 0) == ref["counts"].get(key, 0), key
    assert inspect_onnx(path, "tensorrt")["violations"] == []


# ---- the lint on ModelOpt's graphs, rebuilt from the reference files ----------------------------------


def rebuild(ref: dict, weights: str = "int8") -> onnx.ModelProto:
    """ModelOpt's graph from its skeleton: the same ops, edges and Q/DQ pairs, with 1-channel weights stored
    as int8 + DQ (`weights="int8"`, ModelOpt's --dq_only) or float + Q -> DQ (`weights="float"`)."""
    nodes, inits = [], []
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zp")
    inits += [scale, zero]
    dequantized: dict[str, str] = {}

    def read(src: str, quantized: bool) -> str:
        if not quantized:
            return src
        if src not in dequantized:
            nodes.append(helper.make_node("QuantizeLinear", [src, "s", "zp"], [f"{src}_q"], name=f"{src}_Q"))
            nodes.append(
                helper.make_node("DequantizeLinear", [f"{src}_q", "s", "zp"], [f"{src}_dq"], name=f"{src}_DQ")
            )
            dequantized[src] = f"{src}_dq"
        return dequantized[src]

    for row in ref["graph"]:
        name, inputs = row[0], [read(src, q) for src, q in row[1]]
        op = name.split("#")[0]
        attrs = {"axis": 1} if op == "Concat" else {}
        if op in WEIGHTED_OPS:
            inputs.append(_weight(name, op, quantized=row[2], form=weights, nodes=nodes, inits=inits))
            attrs = {"transB": 1} if op == "Gemm" else {}
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
    graph = helper.make_graph(
        nodes, "reference",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info(ref["graph"][-1][0], TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _weight(name: str, op: str, quantized: bool, form: str, nodes: list, inits: list) -> str:
    shape = (1, 1, 1, 1) if op in ("Conv", "ConvTranspose") else (1, 1)
    w = f"{name}_w"
    inits.append(numpy_helper.from_array(np.array([0.02], np.float32), f"{w}_scale"))
    inits.append(numpy_helper.from_array(np.array([0], np.int8), f"{w}_zp"))
    if not quantized:
        inits.append(numpy_helper.from_array(np.full(shape, 0.5, np.float32), w))
        return w
    if form == "int8":
        inits.append(numpy_helper.from_array(np.full(shape, 25, np.int8), w))
        source = w
    else:
        inits.append(numpy_helper.from_array(np.full(shape, 0.5, np.float32), w))
        nodes.append(helper.make_node("QuantizeLinear", [w, f"{w}_scale", f"{w}_zp"], [f"{w}_q"], axis=0))
        source = f"{w}_q"
    nodes.append(helper.make_node("DequantizeLinear", [source, f"{w}_scale", f"{w}_zp"], [f"{w}_dq"], axis=0))
    return f"{w}_dq"


@pytest.mark.parametrize("weights", ["int8", "float"])
@pytest.mark.parametrize("stem", REFERENCES)
def test_lint_accepts_modelopt_graphs(stem, weights, tmp_path):
    """No violation, and the same integer / float op counts as the lint of ModelOpt's real file."""
    ref = load_reference(stem)
    path = tmp_path / "modelopt.onnx"
    onnx.save(rebuild(ref, weights), str(path))
    report = inspect_onnx(path, "tensorrt")
    stored = ref["lint"]["dq_only" if weights == "int8" else "float_weights"]
    assert stored["violations"] == [] and report["violations"] == []
    assert report["int_op_counts"] == stored["int_op_counts"]
    assert report["float_op_counts"] == stored["float_op_counts"]
    # operators, not Q/DQ nodes, are counted
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(report["int_op_counts"])
    assert report["qdq_counts"]["DequantizeLinear"] > 0
    if stem in ("resnet18", "mobilenet_v2", "efficientnet_b0"):  # every Add, Mul and pool runs in INT8
        assert set(report["float_op_counts"]) == {"Gemm"}  # the classifier, a GEMV ModelOpt leaves float
        assert report["int_op_counts"]["Add"] == ref["counts"]["residual_adds"]
        assert report["int_op_counts"]["GlobalAveragePool"] == ref["counts"]["pools"] - (stem == "resnet18")


def _first(ref: dict, prefix: str) -> list:
    return next(row for row in ref["graph"] if row[0].startswith(prefix))


def _quantize_conv_output_into_add(ref: dict) -> None:
    """edgecv's former placement: both inputs of every residual Add quantized."""
    for row in ref["graph"]:
        if row[0].startswith("Add#"):
            for edge in row[1]:
                edge[1] = True


def _unquantize_skip(ref: dict) -> None:
    for edge in _first(ref, "Add#")[1]:
        edge[1] = False


def _unquantize_conv_input(ref: dict) -> None:
    _first(ref, "Conv#1")[1][0][1] = False


MUTATIONS = {
    "conv output quantized into its Add": (_quantize_conv_output_into_add, "leave the conv's output float"),
    "skip input float": (_unquantize_skip, "skip input is not quantized"),
    "conv input float, weight quantized": (
        _unquantize_conv_input,
        "input does not come from DequantizeLinear",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_lint_flags_placements_tensorrt_cannot_fuse(mutation, tmp_path):
    ref = load_reference("resnet18")
    change, message = MUTATIONS[mutation]
    change(ref)
    path = tmp_path / "bad.onnx"
    onnx.save(rebuild(ref), str(path))
    violations = inspect_onnx(path, "tensorrt")["violations"]
    assert violations and all(message in v for v in violations), violations


def _set_init(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, init in enumerate(proto.graph.initializer):
        if init.name == name:
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: _set_init(p, "zp", np.array(0, np.uint8)), "is UINT8, not INT8"),
        (lambda p: _set_init(p, "zp", np.array(3, np.int8)), "zero point is not 0"),
        (lambda p: _set_init(p, "Conv#1_w_scale", np.array(0.02, np.float32)), "not per-channel on axis 0"),
        (lambda p: _set_init(p, "Conv#1_w", np.full((1, 1, 1, 1), 25, np.int32)), "not int8"),
    ],
)
def test_lint_flags_wrong_integer_types_and_scales(change, message, tmp_path):
    proto = rebuild(load_reference("resnet18"))
    change(proto)
    path = tmp_path / "bad.onnx"
    onnx.save(proto, str(path))
    assert any(message in v for v in inspect_onnx(path, "tensorrt")["violations"])


def test_cli_inspect_accepts_modelopt_graph(tmp_path):
    from conftest import run_cli

    path = tmp_path / "modelopt.onnx"
    onnx.save(rebuild(load_reference("efficientnet_b0"), "float"), str(path))
    proc = run_cli("inspect", str(path), "--target", "tensorrt", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["violations"] == [] and "violation" not in proc.stdout
    assert report["int_op_counts"]["GlobalAveragePool"] == 17 and report["int_op_counts"]["Mul"] == 65


# ---- QAT with the placement ----------------------------------------------------------------------------


def test_tensorrt_qat_trains_and_exports_the_placement(tmp_path):
    """A few QAT steps with learnable ranges lower the loss; the trained fake-quant model and the ORT run of
    its export agree; residual Adds read only their skip input quantized; the lint is clean."""
    torch.manual_seed(0)
    model = build_model("edgecv:resnet8", num_classes=4, in_channels=3, image_size=16)
    y = torch.arange(32) % 4
    x = torch.randn(32, 3, 16, 16) + torch.nn.functional.one_hot(y, 4)[:, :3, None, None]  # learnable classes
    qmodel = prepare_qat(model.eval(), "tensorrt", x[:2])
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    set_learnable_ranges(qmodel, True)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    qmodel.train()
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(qmodel(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is not None for n, p in qmodel.named_parameters() if n.endswith("_aq.amax"))
    path = export_onnx(qmodel.eval(), tmp_path / "qat.onnx", x[:2])
    parity = check_parity(qmodel, path, x, int8=True)
    assert parity["ok"], parity
    counts = qdq_pattern(onnx.load(str(path)))["counts"]
    assert counts["residual_adds"] == counts["residual_adds_quantized_inputs_one"] == 3
    assert inspect_onnx(path, "tensorrt")["violations"] == []
