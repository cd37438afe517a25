"""graph.subgraph.graph_after: the cut model replays exactly what the full model computes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _graph_helpers import load
from vis_service.errors import InvalidArgument
from vis_service.graph.expose import expose_tensors
from vis_service.graph.loading import prepare_model
from vis_service.graph.subgraph import graph_after


def _run(model: onnx.ModelProto, feeds: dict) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _residual_model() -> onnx.ModelProto:
    """x -> conv a -> relu r -> conv b; out = Gemm(GAP(b + x)) (a skip connection bypasses r)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, .5, (2, 2, 3, 3)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(0, .5, (2, 2, 3, 3)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, .5, (3, 2)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wb"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["b", "x"], ["s"]),
             helper.make_node("GlobalAveragePool", ["s"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=inits)
    return prepare_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))


def test_cut_after_a_separating_tensor():
    m = _residual_model()
    x = np.random.default_rng(1).normal(size=(2, 2, 6, 6)).astype(np.float32)
    full = _run(expose_tensors(m, ["s", "y"]), {"x": x})
    cut = graph_after(m, "s")
    assert cut.separates and cut.extra_inputs == () and cut.node_count == 3
    onnx.checker.check_model(cut.model)
    assert [i.name for i in cut.model.graph.input] == ["s"]
    np.testing.assert_allclose(_run(cut.model, {"s": full["s"]})["y"], full["y"], rtol=1e-6)
    # a perturbed activation goes through the head only
    s2 = full["s"].copy()
    s2[:, 0] = 0
    y2 = _run(cut.model, {"s": s2})["y"]
    fc = numpy_helper.to_array(m.graph.initializer[2])
    np.testing.assert_allclose(y2, s2.mean(axis=(2, 3)) @ fc.T, rtol=1e-5, atol=1e-6)


def test_cut_inside_a_residual_block_keeps_the_bypassing_input():
    m = _residual_model()
    x = np.random.default_rng(2).normal(size=(2, 2, 6, 6)).astype(np.float32)
    full = _run(expose_tensors(m, ["r", "y"]), {"x": x})
    cut = graph_after(m, "r")
    assert not cut.separates and cut.extra_inputs == ("x",)
    np.testing.assert_allclose(_run(cut.model, {"r": full["r"], "x": x})["y"], full["y"], rtol=1e-5)
    # zeroing r leaves only the skip path: y = GAP(x) @ fc.T
    y0 = _run(cut.model, {"r": np.zeros_like(full["r"]), "x": x})["y"]
    fc = numpy_helper.to_array(m.graph.initializer[2])
    np.testing.assert_allclose(y0, x.mean(axis=(2, 3)) @ fc.T, rtol=1e-5, atol=1e-6)


def test_tensor_that_no_output_needs():
    m = _residual_model()
    with pytest.raises(InvalidArgument, match="depends on"):
        graph_after(m, "a", ["x"])  # the input does not depend on a


@pytest.mark.parametrize("tensor,separates", [("/layer3/layer3.2/Relu_1_output_0", True),
                                              ("/layer3/layer3.2/Relu_output_0", False)])
def test_resnet20(tensor, separates):
    m = load("shared:resnet20")
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    inp = m.graph.input[0].name
    out = m.graph.output[0].name
    full = _run(expose_tensors(m, [tensor, out]), {inp: x})
    cut = graph_after(m, tensor)
    assert cut.separates == separates
    feeds = {tensor: full[tensor]}
    if not separates:
        assert cut.extra_inputs == (inp,)
        feeds[inp] = x
    np.testing.assert_allclose(_run(cut.model, feeds)[out], full[out], rtol=1e-4, atol=1e-4)
