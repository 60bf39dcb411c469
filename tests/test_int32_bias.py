"""One int32-bias writer for every exported Conv/Gemm (the Q/DQ post-processing and the frame-input rewrite):
int32 + DequantizeLinear where the bias fits, a float Add after the layer where it would overflow."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecv.export.qdq import write_bias


def _conv_with_bias(bias: np.ndarray, scale: np.ndarray) -> onnx.ModelProto:
    weight = np.arange(2 * 3, dtype=np.float32).reshape(2, 3, 1, 1) / 10
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        [numpy_helper.from_array(weight, "w")],
    )
    conv = graph.node[0]
    before, after = write_bias(graph, conv, bias, scale, "b")
    nodes = [*before, conv, *after]
    del graph.node[:]
    graph.node.extend(nodes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("scale, overflows", [(1e-3, False), (1e-12, True)])
def test_a_bias_is_int32_where_it_fits_and_a_float_add_where_it_would_overflow(scale, overflows):
    bias, scales = np.array([0.5, -0.25]), np.full(2, scale)
    model = _conv_with_bias(bias, scales)
    ops = [n.op_type for n in model.graph.node]
    int32 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT32]
    assert ops == (["Conv", "Add"] if overflows else ["DequantizeLinear", "Conv"]), ops
    assert bool(int32) != overflows
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 2)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    weight = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
    expected = np.einsum("oc,nchw->nohw", weight, x) + bias.reshape(1, -1, 1, 1)  # the bias, kept exactly
    np.testing.assert_allclose(got, expected, atol=1e-5)
