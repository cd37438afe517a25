"""Backward rules on the edges an exploratory session found: Resize at opsets 11/12 (roi and
scales required there), empty resized axes, ties of max reductions, and pool / ConvTranspose
geometries whose output size onnxruntime and ONNX shape inference disagree on."""
from __future__ import annotations

import numpy as np
import pytest

from _engine_helpers import adjoint_check, one_node_model, run_gradient
from vis_service.engine import build_gradient_model
from vis_service.errors import Unimplemented


@pytest.mark.parametrize("opset", [11, 12])
@pytest.mark.parametrize("mode,scales,sizes", [
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, [1, 1, 2, 2], None),
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 2, 3], None),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [2, 3, 7, 5]),
    ({"mode": "cubic", "coordinate_transformation_mode": "half_pixel"}, None, [2, 3, 8, 8]),
], ids=["linear-scales", "nearest-scales", "linear-sizes", "cubic-sizes"])
def test_resize_opsets_11_and_12(opset, mode, scales, sizes):
    """What torch.onnx.export(opset_version=11) emits for F.interpolate: roi is a required input
    there (and scales, empty, beside sizes); the rule's per-axis measurement must give them too."""
    consts = {"roi": np.zeros(0, np.float32)}
    if scales is not None:
        consts["scales"] = np.array(scales, np.float32)
    else:
        consts["scales"] = np.zeros(0, np.float32)
        consts["sizes"] = np.array(sizes, np.int64)
    order = ["x"] + list(consts)
    model = one_node_model("Resize", {"x": (2, 3, 4, 4)}, consts, opset=opset, input_order=order, **mode)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    result = adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1.0)   # linear in x: exact differences
    assert result.relative_error < 1e-4, result


def test_resize_to_an_empty_axis_has_zero_gradient():
    model = one_node_model("Resize", {"x": (2, 3, 5, 2)}, {"scales": np.array([1, 1, 3, 0.4], np.float32)},
                           opset=13, input_order=["x", "", "scales"], mode="nearest")
    graph = build_gradient_model(model, ["y0"], ["x"])
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 2)).astype(np.float32)
    g = run_gradient(graph, {"x": x}, {"y0": np.zeros((2, 3, 15, 0), np.float32)})["x"]
    assert g.shape == x.shape and not g.any()


@pytest.mark.parametrize("op,attrs", [("GlobalMaxPool", {}), ("ReduceMax", {"keepdims": 1, "axes": [2, 3]}), ("ReduceMin", {"keepdims": 0})])
def test_tied_extrema_share_the_gradient(op, attrs):
    """A flat map: each of the k tied elements gets 1/k (a subgradient), not the whole gradient."""
    model = one_node_model(op, {"x": (1, 2, 4, 4)}, opset=17, **attrs)
    graph = build_gradient_model(model, ["y0"], ["x"])
    x = np.ones((1, 2, 4, 4), np.float32)
    x[0, 1, 2, 3] = 5.0 if op != "ReduceMin" else -5.0   # channel 1 has a single extremum
    out_shape = (1, 2, 1, 1) if op != "ReduceMin" else ()
    g = run_gradient(graph, {"x": x}, {"y0": np.ones(out_shape, np.float32)})["x"]
    if op == "ReduceMin":   # all axes reduced: one extremum among 32 elements
        expected = np.zeros_like(x)
        expected[0, 1, 2, 3] = 1.0
    else:
        expected = np.zeros_like(x)
        expected[0, 0] = 1.0 / 16
        expected[0, 1, 2, 3] = 1.0
    np.testing.assert_allclose(g, expected, rtol=1e-6)


def test_tied_inputs_of_max_share_the_gradient():
    model = one_node_model("Max", {"a": (4,), "b": (4,), "c": (4,)}, opset=17)
    graph = build_gradient_model(model, ["y0"], ["a", "b", "c"])
    a = np.array([1, 2, 3, 4], np.float32)
    b = np.array([1, 5, 3, 0], np.float32)
    c = np.array([0, 2, 3, 4], np.float32)
    g = run_gradient(graph, {"a": a, "b": b, "c": c}, {"y0": np.ones(4, np.float32)})
    np.testing.assert_allclose(g["a"], [1 / 2, 0, 1 / 3, 1 / 2])
    np.testing.assert_allclose(g["b"], [1 / 2, 1, 1 / 3, 0])
    np.testing.assert_allclose(g["c"], [0, 0, 1 / 3, 1 / 2])


@pytest.mark.parametrize("op,attrs,fragment", [
    ("AveragePool", {"kernel_shape": [3], "strides": [3], "pads": [2, 2], "ceil_mode": 1}, "ceil_mode with pads"),
    ("MaxPool", {"kernel_shape": [3], "strides": [3], "pads": [2, 2], "ceil_mode": 1}, "ceil_mode with pads"),
    ("MaxPool", {"kernel_shape": [3], "strides": [1], "dilations": [2], "auto_pad": "SAME_UPPER"}, "dilations with auto_pad SAME"),
])
def test_pool_geometry_onnxruntime_sizes_differently_is_unimplemented(op, attrs, fragment):
    """onnxruntime drops a ceil_mode window that starts in the end padding (ONNX inference keeps
    it): a clear UNIMPLEMENTED, not a shape error at run time."""
    model = one_node_model(op, {"x": (1, 2, 6)}, opset=17, **attrs)
    with pytest.raises(Unimplemented, match=fragment) as e:
        build_gradient_model(model, ["y0"], ["x"])
    assert "onnxruntime computes a [3]" in str(e.value) or "onnxruntime computes a [4]" in str(e.value)


def test_ceil_mode_pool_where_the_sizes_agree_still_differentiates():
    model = one_node_model("AveragePool", {"x": (2, 3, 7, 7)}, opset=17, kernel_shape=[3, 3], strides=[2, 2],
                           pads=[1, 1, 1, 1], ceil_mode=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 7)).astype(np.float32)
    result = adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1.0)
    assert result.relative_error < 1e-4, result


def test_conv_transpose_same_with_output_padding_sized_differently_is_unimplemented():
    w = np.random.default_rng(0).standard_normal((3, 2, 2)).astype(np.float32)
    model = one_node_model("ConvTranspose", {"x": (1, 3, 6)}, {"w": w}, opset=17, kernel_shape=[2], strides=[2],
                           auto_pad="SAME_UPPER", output_padding=[1])
    with pytest.raises(Unimplemented, match="auto_pad SAME with output_padding"):
        build_gradient_model(model, ["y0"], ["x"])
