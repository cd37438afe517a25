"""Adjoint (dot-product) tests of every backward rule on one-node models.

⟨J v, w⟩ from central differences of the forward op must equal ⟨v, Jᵀ w⟩ from the
gradient graph. Ops run in float64 where onnxruntime has a double kernel (tight
tolerance); otherwise in float32, with eps = 1 for piecewise-linear ops (exact
differences away from kinks) and well-separated inputs where an argmax could flip.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph as OrtInvalidGraph
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

from _engine_helpers import adjoint_check, one_node_model, run_gradient
from vis_service.engine import build_gradient_model
from vis_service.graph.loading import prepare_model

LINEAR = "linear"        # linear / piecewise linear: finite differences exact away from kinks
SMOOTH = "smooth"


def _values(shape, rng, how, dtype, index):
    if how == "separated":
        # distinct values 0.05 apart, none at 0 and none shared between inputs: no max/ReLU
        # switch moves under the float32 step below
        n = int(np.prod(shape))
        return np.asarray((rng.permutation(n) - n / 2 + 0.37 + 0.011 * index) * 0.05).reshape(shape).astype(dtype)
    if how == "positive":
        return np.asarray(rng.uniform(0.5, 2.0, shape)).astype(dtype)
    return np.asarray(rng.standard_normal(shape)).astype(dtype)


def check(op, inputs, consts=None, *, opset=17, wrt=None, kind=SMOOTH, values="normal", seed=0,
          input_order=None, n_outputs=1, objectives=None, **attrs):
    consts = consts or {}
    wrt = list(wrt or inputs)
    objectives = objectives or [f"y{i}" for i in range(n_outputs)]
    last_error = None
    for dtype in (np.float64, np.float32):
        # Resize's roi/scales stay float32 whatever the data type
        typed = {k: (v.astype(dtype) if np.asarray(v).dtype.kind == "f" and k not in ("roi", "scales") else v)
                 for k, v in consts.items()}
        try:
            model = one_node_model(op, inputs, typed, opset=opset, dtype=dtype, n_outputs=n_outputs,
                                   input_order=input_order, **attrs)
            rng = np.random.default_rng(seed)
            feeds = {k: _values(s, rng, values, dtype, i) for i, (k, s) in enumerate(inputs.items())}
            if dtype == np.float64:
                eps, tol = 1e-6, 1e-6
            else:
                eps, tol = (1e-3, 1e-4) if kind == LINEAR else (1e-2, 2e-3)
                if kind == LINEAR and values != "separated":
                    eps = 1.0
            result = adjoint_check(model, feeds, objectives, wrt, eps=eps, seed=seed + 1)
        # no double kernel, or a float-only op (Celu: its schema rejects double): retry in float32,
        # where a graph that is invalid for another reason fails again
        except (OrtNotImplemented, OrtInvalidGraph) as exc:
            last_error = exc
            continue
        assert result.relative_error < tol, (dtype.__name__, result)
        return
    raise AssertionError(f"onnxruntime ran the op in no float type: {last_error}")


rng = np.random.default_rng(1234)


def weights(*shape):
    return rng.standard_normal(shape)


# ---- convolution ---------------------------------------------------------------------------
CONV_CASES = [
    dict(),
    dict(strides=[2, 2]),
    dict(strides=[2, 3], pads=[0, 1, 1, 0]),
    dict(strides=[1, 1], pads=[2, 0, 0, 2], dilations=[2, 1]),
    dict(strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2]),
    dict(strides=[3, 2], pads=[1, 2, 2, 1]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER", strides=[2, 1]),
    dict(auto_pad="VALID", strides=[2, 2]),
    dict(auto_pad="SAME_UPPER"),
    dict(pads=[3, 3, 3, 3]),              # pads wider than the kernel: ConvTranspose path at stride 1
]


@pytest.mark.parametrize("attrs", CONV_CASES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()) or "plain")
@pytest.mark.parametrize("group", [1, 2])
def test_conv(attrs, group):
    check("Conv", {"x": (2, 4, 9, 8)}, {"w": weights(6, 4 // group, 3, 2)}, kind=LINEAR, group=group, **attrs)


@pytest.mark.parametrize("kernel,stride,pads,size", [
    (7, 2, [3, 3, 3, 3], (15, 14)),   # a ResNet stem, odd and even sizes
    (11, 4, [2, 2, 2, 2], (27, 30)),  # AlexNet's first layer
    (2, 2, [0, 0, 0, 0], (9, 8)),     # patches; the odd row is never read
    (4, 2, [1, 2, 2, 1], (10, 11)),   # asymmetric pads
    (5, 3, [0, 0, 0, 0], (13, 16)),
])
@pytest.mark.parametrize("opset", [17, 9])
def test_conv_large_kernel_strided(kernel, stride, pads, size, opset):
    """The polyphase adjoint (one Conv over all output phases, then interleaved); opset 9:
    the light_* graphs' form (Slice and Pad as attributes)."""
    check("Conv", {"x": (2, 3) + size}, {"w": weights(5, 3, kernel, kernel)}, kind=LINEAR, opset=opset,
          strides=[stride, stride], pads=pads)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_depthwise_with_bias(stride):
    check("Conv", {"x": (2, 4, 8, 8)}, {"w": weights(4, 1, 3, 3), "b": weights(4)}, kind=LINEAR,
          group=4, strides=[stride, stride], pads=[1, 1, 1, 1])


@pytest.mark.parametrize("attrs", CONV_CASES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()) or "plain")
def test_conv_depthwise(attrs):
    check("Conv", {"x": (2, 4, 9, 8)}, {"w": weights(4, 1, 3, 2)}, kind=LINEAR, group=4, **attrs)
    # channel multiplier 2: grouped, not depthwise
    check("Conv", {"x": (2, 4, 9, 8)}, {"w": weights(8, 1, 3, 3)}, kind=LINEAR, group=4, **attrs)


@pytest.mark.parametrize("attrs", [dict(strides=[2, 2]), dict(strides=[2, 3], pads=[0, 1, 1, 0]),
                                   dict(strides=[3, 2], pads=[1, 0, 0, 0]), dict(auto_pad="SAME_UPPER", strides=[2, 2])],
                         ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
@pytest.mark.parametrize("group", [1, 2])
def test_conv_pointwise_strided(attrs, group):
    check("Conv", {"x": (2, 4, 9, 8)}, {"w": weights(6, 4 // group, 1, 1)}, kind=LINEAR, group=group, **attrs)


def test_conv_1d_and_3d():
    check("Conv", {"x": (2, 3, 11)}, {"w": weights(4, 3, 3)}, kind=LINEAR, strides=[2], pads=[1, 0])
    check("Conv", {"x": (1, 2, 5, 6, 4)}, {"w": weights(3, 2, 2, 3, 2)}, kind=LINEAR, strides=[2, 1, 2])


def test_conv_weights_computed_in_graph():
    """Weights produced by nodes (light models: ConstantOfShape) use the in-graph flip."""
    import onnx
    from onnx import helper, numpy_helper
    from _engine_helpers import adjoint_check as check_model
    from vis_service.graph.loading import prepare_model
    w = weights(4, 3, 3, 3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w0"], ["w"]),
         helper.make_node("Conv", ["x", "w"], ["y0"], pads=[1, 0, 2, 1], group=1)],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 7, 7])],
        [helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model = prepare_model(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 7)).astype(np.float32)
    assert check_model(model, {"x": x}, ["y0"], ["x"], eps=1.0).relative_error < 1e-4


def test_strided_stem_scaled_by_batchnorm_takes_the_polyphase_adjoint():
    """A 7x7/2 stem whose BatchNorm the model did not fold (the light_* graphs): the rule scales the
    weights by the BatchNorm factor in emitted nodes, and folded_value evaluates them at build time
    so that the polyphase adjoint (Conv, then the phases interleaved) applies instead of a ConvTranspose."""
    import onnx
    from onnx import helper, numpy_helper
    from _engine_helpers import adjoint_check as check_model
    from vis_service.engine import build_gradient_model
    from vis_service.graph.loading import prepare_model
    r = np.random.default_rng(3)
    c = 16
    params = {"w": r.standard_normal((c, 3, 7, 7)), "scale": r.uniform(0.5, 2, c), "bias": r.standard_normal(c),
              "mean": r.standard_normal(c), "var": r.uniform(0.5, 2, c)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[3, 3, 3, 3], kernel_shape=[7, 7]),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-3),
         helper.make_node("Relu", ["y"], ["r"])],
        "stem", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 15, 14])],
        [helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model = prepare_model(model)
    nodes = build_gradient_model(model, ["r"], ["x"]).model.graph.node
    assert any(n.op_type == "Conv" and "phase_weight" in n.input[1] for n in nodes)
    # the only ConvTranspose interleaves the phases (a one-hot 2x2/2 kernel), none is the 7x7 adjoint
    transposed = [n for n in nodes if n.op_type == "ConvTranspose"]
    assert len(transposed) == 1 and "interleave" in transposed[0].input[1]
    x = r.standard_normal((2, 3, 15, 14)).astype(np.float32)
    assert check_model(model, {"x": x}, ["r"], ["x"], eps=1e-2).relative_error < 1e-3


@pytest.mark.parametrize("attrs", [
    dict(),
    dict(strides=[2, 2]),
    dict(strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 0]),
    dict(strides=[3, 2], dilations=[1, 2], pads=[1, 1, 1, 1]),
    dict(strides=[2, 2], output_shape=[10, 9]),
    dict(strides=[2, 2], auto_pad="SAME_UPPER"),
], ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()) or "plain")
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(attrs, group):
    check("ConvTranspose", {"x": (2, 4, 5, 4)}, {"w": weights(4, 6 // group, 3, 3)}, kind=LINEAR, group=group, **attrs)


# ---- pooling ---------------------------------------------------------------------------------
POOL_CASES = [
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER"),
]
pool_ids = lambda a: ",".join(f"{k}={v}" for k, v in a.items())  # noqa: E731


@pytest.mark.parametrize("attrs", POOL_CASES + [dict(kernel_shape=[3, 3], strides=[2, 1], dilations=[2, 2], pads=[1, 1, 2, 2])],
                         ids=pool_ids)
def test_max_pool(attrs):
    check("MaxPool", {"x": (2, 3, 9, 8)}, kind=LINEAR, values="separated", **attrs)


def test_max_pool_old_opset_is_converted():
    check("MaxPool", {"x": (2, 3, 9, 8)}, opset=9, kind=LINEAR, values="separated", kernel_shape=[3, 3], strides=[2, 2])


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("attrs", POOL_CASES, ids=pool_ids)
def test_average_pool(attrs, count_include_pad):
    check("AveragePool", {"x": (2, 3, 9, 8)}, kind=LINEAR, count_include_pad=count_include_pad, **attrs)


def test_average_pool_opset_9_and_1d():
    check("AveragePool", {"x": (2, 3, 9, 8)}, opset=9, kind=LINEAR, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1])
    check("AveragePool", {"x": (2, 3, 10)}, kind=LINEAR, kernel_shape=[3], strides=[2], ceil_mode=1)


@pytest.mark.parametrize("shape,kernel", [((2, 3, 11), [2]), ((1, 2, 5, 4, 7), [2, 2, 3]), ((2, 16, 6, 6), [3, 3])],
                         ids=["1d-tail", "3d-tail", "2d-exact"])
def test_average_pool_tiling_windows(shape, kernel):
    # kernel == stride, no pads: the adjoint is a nearest Resize and a per-channel 1/(k*k) scale
    check("AveragePool", {"x": shape}, kind=LINEAR, kernel_shape=kernel, strides=kernel)


def test_average_pool_tiling_windows_before_opset_13():
    # Resize needs its roi input before opset 13: the broadcast-product form instead
    check("AveragePool", {"x": (2, 3, 9, 8)}, opset=11, kind=LINEAR, kernel_shape=[2, 2], strides=[2, 2])


def test_global_pools():
    check("GlobalAveragePool", {"x": (2, 3, 5, 4)}, kind=LINEAR)
    check("GlobalAveragePool", {"x": (2, 16, 5, 4)}, kind=LINEAR)  # channels in whole blocks: the depthwise Conv spread
    check("GlobalMaxPool", {"x": (2, 3, 5, 4)}, kind=LINEAR, values="separated")


# ---- activations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("op,attrs,opset,values", [
    ("Relu", {}, 17, "separated"),
    ("LeakyRelu", {"alpha": 0.1}, 17, "separated"),
    ("Elu", {"alpha": 0.7}, 17, "normal"),
    ("Sigmoid", {}, 17, "normal"),
    ("Tanh", {}, 17, "normal"),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 17, "separated"),
    ("HardSwish", {}, 17, "separated"),
    ("Erf", {}, 17, "normal"),
    ("Gelu", {}, 20, "normal"),
    ("Gelu", {"approximate": "tanh"}, 20, "normal"),
    ("Softmax", {"axis": 1}, 17, "normal"),
    ("Softmax", {"axis": 1}, 11, "normal"),      # coerce-to-2D semantics
    ("Softmax", {}, 9, "normal"),
    ("LogSoftmax", {"axis": -1}, 17, "normal"),
    ("LogSoftmax", {"axis": 2}, 11, "normal"),
    ("Clip", {"min": -0.5, "max": 0.6}, 9, "separated"),
    ("Sqrt", {}, 17, "positive"),
    ("Exp", {}, 17, "normal"),
    ("Log", {}, 17, "positive"),
    ("Neg", {}, 17, "normal"),
    ("Abs", {}, 17, "separated"),
    ("Reciprocal", {}, 17, "positive"),
    ("Identity", {}, 17, "normal"),
    ("Dropout", {}, 17, "normal"),
    ("Dropout", {"ratio": 0.3}, 9, "normal"),
])
def test_unary(op, attrs, opset, values):
    kind = LINEAR if values == "separated" or op in ("Neg", "Identity", "Dropout") else SMOOTH
    check(op, {"x": (2, 3, 4, 5)}, opset=opset, kind=kind, values=values, **attrs)


@pytest.mark.parametrize("op,attrs", [("HardSwish", {}), ("Clip", {"min": 0.0, "max": 6.0}),
                                      ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}), ("LeakyRelu", {"alpha": 0.1}),
                                      ("Sigmoid", {}), ("Tanh", {})])
def test_blocked_activation_slopes(op, attrs):
    """Channels in whole NCHWc blocks: the slopes take ramps and depthwise 1x1 Convs that stay in
    onnxruntime's blocked layout (no comparison, Cast or scalar Sub in the graph); adjoint and
    finite-difference checks as above."""
    from vis_service.engine import build_gradient_model
    opset = 9 if op == "Clip" else 17
    smooth = op in ("Sigmoid", "Tanh")
    check(op, {"x": (2, 16, 4, 5)}, opset=opset, kind=SMOOTH if smooth else LINEAR,
          values="normal" if smooth else "separated", **attrs)
    ops = {n.op_type for n in build_gradient_model(one_node_model(op, {"x": (2, 16, 4, 5)}, opset=opset, **attrs),
                                                   ["y0"], ["x"]).model.graph.node}
    assert "Conv" in ops and not ops & {"Cast", "Greater", "Less", "Sub"}, ops


def _prelu_slope():
    return np.random.default_rng(8).uniform(-0.5, 0.9, (16, 1, 1)).astype(np.float32)


@pytest.mark.parametrize("op,attrs,consts,slope", [
    ("LeakyRelu", {"alpha": 0.1}, {}, lambda x: np.where(x > 0, 1.0, 0.1)),
    ("Sigmoid", {}, {}, lambda x: (1 / (1 + np.exp(-x))) * (1 - 1 / (1 + np.exp(-x)))),
    ("Tanh", {}, {}, lambda x: 1 - np.tanh(x) ** 2),
    ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, {}, lambda x: np.where((0.2 * x + 0.5 > 0) & (0.2 * x + 0.5 < 1), 0.2, 0.0)),
    ("PRelu", {}, {"slope": _prelu_slope()}, lambda x: np.where(x > 0, 1.0, _prelu_slope())),
], ids=lambda v: v if isinstance(v, str) else "")
def test_blocked_slopes_in_float32(op, attrs, consts, slope):
    """The blocked forms run only in float32 (the adjoint checks above settle in float64 where
    onnxruntime has the op): their gradient against numpy's slope, away from the kinks."""
    from _engine_helpers import run_gradient
    from vis_service.engine import build_gradient_model
    shape = (2, 16, 6, 7)
    x = (np.random.default_rng(9).standard_normal(shape) * 3).astype(np.float32)
    x[np.abs(x) < 1e-3] = 0.5                           # no value at ReLU-like kinks
    if op == "HardSigmoid":
        x[np.abs(np.abs(x) - 2.5) < 1e-3] = 0.5        # nor at 0.2 x + 0.5 in {0, 1}
    g = np.random.default_rng(10).standard_normal(shape).astype(np.float32)
    graph = build_gradient_model(one_node_model(op, {"x": shape}, consts, opset=17, **attrs), ["y0"], ["x"])
    assert "Conv" in {n.op_type for n in graph.model.graph.node}
    got = run_gradient(graph, {"x": x}, {"y0": g})["x"]
    np.testing.assert_allclose(got, g * slope(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "LeakyRelu", "HardSwish", "Relu"])
def test_activation_rules_need_no_rank(op):
    """After a Reshape to a shape known only at run time the rank is unknown: the rules take their
    general forms (the blocked ones ask for 4-D) and the gradient is still right."""
    from onnx import TensorProto, helper
    from _engine_helpers import run_gradient
    from vis_service.engine import build_gradient_model
    from vis_service.graph.loading import prepare_model
    g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node(op, ["r"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                           helper.make_tensor_value_info("s", TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = prepare_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    graph = build_gradient_model(model, ["y"], ["x"])
    x = np.random.default_rng(11).standard_normal((2, 16)).astype(np.float32)
    cot = np.random.default_rng(12).standard_normal((2, 2, 8)).astype(np.float32)
    got = run_gradient(graph, {"x": x, "s": np.array([2, 2, 8], np.int64)}, {"y": cot})["x"]
    eps = 1e-3
    for k in range(5):  # directional differences
        v = np.random.default_rng(20 + k).standard_normal(x.shape).astype(np.float32)
        s = _onnx_eval(model, x + eps * v) - _onnx_eval(model, x - eps * v)
        assert np.isclose((s * cot.reshape(2, 16)).sum() / (2 * eps), (got * v).sum(), rtol=2e-2, atol=2e-3)


def _onnx_eval(model, x):
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "s": np.array([2, 2, 8], np.int64)})[0].reshape(2, 16)


def test_hard_swish_slope_near_the_kinks():
    """The blocked HardSwish slope against numpy's, on values within 100 ulps of -3 and 3 and at random.
    It judges the kinks on clip(x/6 + 1/2, 0, 1) in float32: within 2 ulps of them either side's slope."""
    from _engine_helpers import run_gradient
    from vis_service.engine import build_gradient_model
    shape = (2, 16, 8, 10)
    x = (np.random.default_rng(5).standard_normal(shape) * 4).astype(np.float32)
    near = []
    for kink in (np.float32(-3.0), np.float32(3.0)):
        for direction in (np.float32(np.inf), np.float32(-np.inf)):
            v = kink
            for _ in range(100):
                v = np.nextafter(v, direction)
                near.append(v)
    x.flat[:2] = [-3.0, 3.0]
    x.flat[2:2 + len(near)] = near
    g = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    graph = build_gradient_model(one_node_model("HardSwish", {"x": shape}, opset=17), ["y0"], ["x"])
    x64 = x.astype(np.float64)
    slope = np.where(x64 <= -3, 0.0, np.where(x64 >= 3, 1.0, x64 / 3 + 0.5))
    kink = np.where(x64 < 0, -3.0, 3.0)
    close = np.abs(x64 - kink) <= 2 * np.spacing(np.float32(3.0))
    assert close.sum() == 2 * 5, close.sum()   # each kink and two floats either side
    # the slope the other side of the nearest kink has
    other = np.where(x64 < 0, np.where(x64 <= -3, x64 / 3 + 0.5, 0.0), np.where(x64 >= 3, x64 / 3 + 0.5, 1.0))
    for optimize in (True, False):
        got = run_gradient(graph, {"x": x}, {"y0": g}, optimize=optimize)["x"]
        np.testing.assert_allclose(got[~close], (g * slope)[~close], rtol=1e-6, atol=1e-6)
        either = np.isclose(got, g * slope, rtol=1e-6, atol=1e-6) | np.isclose(got, g * other, rtol=1e-6, atol=1e-6)
        assert either[close].all()


def test_clip_with_inputs():
    check("Clip", {"x": (2, 3, 4, 5)}, {"lo": np.array(-0.5), "hi": np.array(0.7)}, kind=LINEAR, values="separated")
    check("Clip", {"x": (2, 3, 4, 5)}, {"hi": np.array(6.0)}, kind=LINEAR, values="separated", input_order=["x", "", "hi"])


def test_prelu():
    check("PRelu", {"x": (2, 3, 4, 5), "slope": (3, 1, 1)}, kind=LINEAR, values="separated")


@pytest.mark.parametrize("slope_shape", [(16, 1, 1), (1, 16, 1, 1), (1,), (5,)])
def test_prelu_constant_slope(slope_shape):
    """A constant slope on a blocked tensor: per-channel ones take a ramp and a depthwise Conv; a
    slope along W ([5] for W = 5) keeps the general rule. Adjoint and finite-difference checks."""
    from vis_service.engine import build_gradient_model
    slope = np.random.default_rng(8).uniform(-0.5, 0.9, slope_shape).astype(np.float32)
    check("PRelu", {"x": (2, 16, 4, 5)}, {"slope": slope}, kind=LINEAR, values="separated")
    ops = {n.op_type for n in build_gradient_model(one_node_model("PRelu", {"x": (2, 16, 4, 5)}, {"slope": slope}, opset=17),
                                                   ["y0"], ["x"]).model.graph.node}
    assert ("Greater" in ops) == (slope_shape == (5,)), ops


# ---- linear algebra ---------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("c_shape", [(5,), (3, 5), (1, 1)])
def test_gemm(trans_a, trans_b, c_shape):
    a = (4, 3) if trans_a else (3, 4)
    b = (5, 4) if trans_b else (4, 5)
    check("Gemm", {"a": a, "b": b, "c": c_shape}, kind=SMOOTH, transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3)


def test_gemm_opset_9_constant_weights():
    check("Gemm", {"a": (3, 4)}, {"b": weights(5, 4), "c": weights(5)}, opset=9, kind=LINEAR, transB=1)


@pytest.mark.parametrize("a,b", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                                 ((4,), (2, 4, 3)), ((2, 3, 4), (4,)), ((4,), (4,))])
def test_matmul(a, b):
    check("MatMul", {"a": a, "b": b}, kind=SMOOTH)


# ---- broadcasting arithmetic --------------------------------------------------------------------------
BROADCAST = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1,), (2, 3, 1)), ((), (2, 3))]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow"])
@pytest.mark.parametrize("a,b", BROADCAST)
def test_binary(op, a, b):
    values = "positive" if op in ("Div", "Pow") else "normal"
    check(op, {"a": a, "b": b}, values=values)


@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
def test_variadic(op):
    values = "separated" if op in ("Max", "Min") else "normal"
    check(op, {"a": (2, 3, 4), "b": (3, 1), "c": (4,)}, values=values, kind=LINEAR)


def test_where_and_expand():
    check("Where", {"a": (2, 3, 4), "b": (4,)}, {"cond": rng.random((3, 4)) > 0.5}, input_order=["cond", "a", "b"])
    check("Expand", {"x": (3, 1)}, {"shape": np.array([2, 3, 4], dtype=np.int64)}, kind=LINEAR)


def test_cast_float_to_float():
    check("Cast", {"x": (2, 3)}, to=11)


# ---- reductions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare"])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("opset,axes", [(11, [1, -1]), (18, [1, -1]), (18, None)])
def test_reduce(op, keepdims, opset, axes):
    values = "separated" if op in ("ReduceMax", "ReduceMin") else "normal"
    consts, attrs = {}, {}
    if axes is not None:
        if opset >= 18 or (op == "ReduceSum" and opset >= 13):
            consts["axes"] = np.array(axes, dtype=np.int64)
        else:
            attrs["axes"] = axes
    check(op, {"x": (2, 3, 4, 5)}, consts, opset=opset, values=values, keepdims=keepdims, **attrs)


# ---- normalization ----------------------------------------------------------------------------------
def test_batch_norm_inference():
    params = {"scale": weights(3), "bias": weights(3), "mean": weights(3), "var": rng.uniform(0.5, 2, 3)}
    check("BatchNormalization", {"x": (2, 3, 4, 5)}, params, kind=LINEAR, epsilon=1e-3)
    check("BatchNormalization", {"x": (2, 3, 4, 5)}, params, opset=9, kind=LINEAR)
    check("BatchNormalization", {"x": (2, 3, 4, 5)}, params, opset=7, kind=LINEAR, spatial=1)
    # BatchNorm1d on [N, C]: the per-channel scale broadcasts as it is (an empty Unsqueeze was a
    # ValueError at opset 11)
    for opset in (11, 17):
        check("BatchNormalization", {"x": (4, 3)}, params, opset=opset, kind=LINEAR)


@pytest.mark.parametrize("shape,opset,attrs", [((2, 3, 4, 5), 17, {}), ((4, 3), 17, {}), ((2, 3, 4), 9, {})],
                         ids=["NCHW", "NC", "NCL-opset9"])
def test_batch_norm_with_every_parameter_fed_at_run_time(shape, opset, attrs):
    """scale, bias, mean and var as graph inputs: each gets its gradient (the statistics' were dropped)."""
    params = (3,) if attrs.get("spatial", 1) else shape[1:]
    inputs = {"x": shape, "scale": params, "bias": params, "mean": params, "var": params}
    check("BatchNormalization", inputs, opset=opset, values="positive", epsilon=1e-3, **attrs)


def test_batch_norm_fed_the_moments_of_its_input_central_differences():
    """tf2onnx's Keras LayerNormalization (epsilon >= 1.001e-5): a BatchNormalization whose mean and
    variance are computed from x; the gradient flows through them too (it was the gradient with the
    statistics frozen: 14% off)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["mean", "axes"], ["mean_b"]),
             helper.make_node("Sub", ["x", "mean_b"], ["centered"]),
             helper.make_node("Mul", ["centered", "centered"], ["squared"]),
             helper.make_node("ReduceMean", ["squared"], ["var"], axes=[0, 2, 3], keepdims=0),
             helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y0"], epsilon=1e-3)]
    graph = helper.make_graph(nodes, "moments", [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("y0", onnx.TensorProto.DOUBLE, None)],
                              [numpy_helper.from_array(weights(3), "scale"), numpy_helper.from_array(weights(3), "bias"),
                               numpy_helper.from_array(np.array([0, 2, 3], np.int64), "axes")])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                          symbolic_batch=False)
    x = np.random.default_rng(20).standard_normal((2, 3, 4, 4))
    assert adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1e-6).relative_error < 1e-6


def test_instance_and_layer_norm():
    check("InstanceNormalization", {"x": (2, 3, 4, 5)}, {"scale": weights(3), "bias": weights(3)}, epsilon=1e-3)
    check("LayerNormalization", {"x": (2, 3, 4, 5)}, {"scale": weights(4, 5), "bias": weights(4, 5)}, axis=-2)


@pytest.mark.parametrize("opset, groups, scale_size", [(18, 2, 2), (18, 6, 6), (21, 3, 6), (21, 1, 6)])
def test_group_norm(opset, groups, scale_size):
    """Opset 18 scales per group, 21 per channel; 4-D and 3-D inputs. Opset 21 computes in its
    stash_type, float32 by default: double here, so that the float64 check sees double's rounding."""
    params = {"scale": weights(scale_size), "bias": weights(scale_size)}
    stash = {"stash_type": 11} if opset >= 21 else {}   # TensorProto.DOUBLE
    check("GroupNormalization", {"x": (2, 6, 3, 4)}, params, opset=opset, num_groups=groups, epsilon=1e-3, **stash)
    check("GroupNormalization", {"x": (2, 6, 5)}, params, opset=opset, num_groups=groups, **stash)


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_rms_norm(axis):
    """Opset 23 (torch's nn.RMSNorm under the dynamo exporter); stash_type double for the float64 check."""
    shape = (2, 3, 4, 5)
    scale = weights(*shape[axis:]) if axis != -1 else weights(5)
    check("RMSNormalization", {"x": shape}, {"scale": scale}, opset=23, axis=axis, epsilon=1e-3, stash_type=11)


@pytest.mark.parametrize("axes", [None, [2, 3], [1], [0, 1, 2, 3]])
def test_mean_variance_normalization(axes):
    check("MeanVarianceNormalization", {"x": (2, 3, 4, 5)}, **({} if axes is None else {"axes": axes}))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("axis", [1, -1, 0])
def test_lp_normalization(p, axis):
    # "separated": no element at 0, where the 1-norm's sign switches
    check("LpNormalization", {"x": (2, 3, 4)}, p=p, axis=axis, values="separated" if p == 1 else "normal")


def test_lp_normalization_of_a_zero_vector_has_a_zero_gradient():
    """onnxruntime's forward gives 0 where the norm is 0; the gradient there is 0 too, not NaN."""
    model = one_node_model("LpNormalization", {"x": (1, 3, 2)}, {}, opset=17, dtype=np.float32, axis=1, p=2)
    x = np.zeros((1, 3, 2), np.float32)
    x[0, :, 1] = [1, 2, 2]
    grad = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": np.ones((1, 3, 2), np.float32)})["x"]
    assert np.isfinite(grad).all() and not grad[..., 0].any()
    np.testing.assert_allclose(grad[0, :, 1], (1 - x[0, :, 1] / 3 * 5 / 3) / 3, rtol=1e-6)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn(size):
    check("LRN", {"x": (2, 7, 3, 4)}, size=size, alpha=0.3, beta=0.75, bias=1.5)


# ---- layout ---------------------------------------------------------------------------------------------
def test_reshape_family():
    check("Reshape", {"x": (2, 3, 4)}, {"shape": np.array([0, -1], dtype=np.int64)}, kind=LINEAR)
    check("Flatten", {"x": (2, 3, 4, 5)}, kind=LINEAR, axis=2)
    check("Squeeze", {"x": (2, 1, 4)}, {"axes": np.array([1], dtype=np.int64)}, kind=LINEAR)
    check("Squeeze", {"x": (2, 1, 4)}, opset=11, kind=LINEAR, axes=[1])
    check("Unsqueeze", {"x": (2, 4)}, {"axes": np.array([1, -1], dtype=np.int64)}, kind=LINEAR)
    check("Unsqueeze", {"x": (2, 4)}, opset=11, kind=LINEAR, axes=[0])
    check("Transpose", {"x": (2, 3, 4)}, kind=LINEAR, perm=[2, 0, 1])
    check("Transpose", {"x": (2, 3, 4)}, kind=LINEAR)


def test_reshape_old_attribute_form():
    check("Reshape", {"x": (2, 3, 4)}, opset=4, kind=LINEAR, shape=[2, 12])


def test_concat_and_split():
    check("Concat", {"a": (2, 3, 4), "b": (2, 1, 4), "c": (2, 2, 4)}, kind=LINEAR, axis=1)
    check("Concat", {"a": (2, 3, 4)}, {"b": weights(2, 3, 2)}, kind=LINEAR, axis=-1)
    check("Split", {"x": (2, 6, 4)}, {"split": np.array([1, 3, 2], dtype=np.int64)}, kind=LINEAR, axis=1, n_outputs=3)
    check("Split", {"x": (2, 6, 4)}, opset=11, kind=LINEAR, axis=1, split=[4, 2], n_outputs=2)
    check("Split", {"x": (2, 6, 4)}, opset=18, kind=LINEAR, axis=2, num_outputs=2, n_outputs=2, objectives=["y1"])


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([1], [3], [1], [1]),
    ([0, -3], [100, -1], [2, 1], [1, 1]),
    ([5], [0], [1], [-1]),
    ([0], [7], [2], [3]),
    ([-1], [-100], [2], [-2]),
    ([1, 6], [5, 1], [1, 2], [2, -3]),
])
def test_slice(starts, ends, axes, steps):
    as_ints = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    check("Slice", {"x": (2, 6, 7)}, {"starts": as_ints(starts), "ends": as_ints(ends), "axes": as_ints(axes),
                                      "steps": as_ints(steps)}, kind=LINEAR)


def test_slice_attribute_form():
    check("Slice", {"x": (2, 6, 7)}, opset=9, kind=LINEAR, starts=[1, -4], ends=[4, 1000], axes=[1, 2])


@pytest.mark.parametrize("pads", [[0, 1, 2, 0, 2, 1], [0, -1, 1, 0, 2, -2]])
def test_pad_constant(pads):
    check("Pad", {"x": (2, 4, 5)}, {"pads": np.array(pads, dtype=np.int64)}, kind=LINEAR)
    check("Pad", {"x": (2, 4, 5)}, opset=9, kind=LINEAR, pads=pads)


@pytest.mark.parametrize("mode", ["edge", "reflect"])
@pytest.mark.parametrize("pads", [[0, 1, 2, 0, 2, 1], [0, 0, 3, 0, 3, 0], [0, 3, 0, 0, 0, 1]])
def test_pad_edge_and_reflect(mode, pads):
    check("Pad", {"x": (2, 4, 5)}, {"pads": np.array(pads, dtype=np.int64)}, kind=LINEAR, mode=mode)


@pytest.mark.parametrize("pads", [[0, 1, 2, 0, 2, 1], [0, 0, 5, 0, 4, 0], [0, 4, 0, 0, 0, 5]])
def test_pad_wrap(pads):
    """Circular padding (torch's F.pad mode="circular" under the dynamo exporter), up to a whole axis."""
    check("Pad", {"x": (2, 4, 5)}, {"pads": np.array(pads, dtype=np.int64)}, opset=19, kind=LINEAR, mode="wrap")


def test_pad_opset_18_axes():
    check("Pad", {"x": (2, 4, 5)}, {"pads": np.array([1, 2, 0, 1], dtype=np.int64), "value": np.array(0.0),
                                    "axes": np.array([-1, 1], dtype=np.int64)}, opset=18, kind=LINEAR)


def test_tile():
    check("Tile", {"x": (2, 3, 4)}, {"repeats": np.array([1, 2, 3], dtype=np.int64)}, kind=LINEAR)


# ---- resize ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs,scales,sizes", [
    (dict(mode="nearest"), [1, 1, 2, 2], None),
    (dict(mode="nearest"), [1, 1, 1.5, 2.5], None),
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), [1, 1, 3, 2], None),
    (dict(mode="linear"), [1, 1, 2, 2], None),
    (dict(mode="linear", coordinate_transformation_mode="align_corners"), None, [2, 3, 7, 3]),
    (dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), [1, 1, 0.5, 1.7], None),
    (dict(mode="cubic"), [1, 1, 2, 1], None),
])
def test_resize(attrs, scales, sizes):
    consts = {"roi": np.zeros(0, np.float32)}
    order = ["x", "roi"]
    if scales is not None:
        consts["scales"] = np.array(scales, np.float32)
        order.append("scales")
    else:
        consts["sizes"] = np.array(sizes, np.int64)
        order += ["", "sizes"]
    check("Resize", {"x": (2, 3, 5, 4)}, consts, kind=LINEAR, input_order=order, **attrs)


def test_upsample_opset_9_and_resize_opset_10():
    scales = {"scales": np.array([1, 1, 2, 3], np.float32)}
    check("Upsample", {"x": (2, 3, 4, 3)}, scales, opset=9, kind=LINEAR, mode="nearest")
    check("Upsample", {"x": (2, 3, 4, 3)}, scales, opset=9, kind=LINEAR, mode="linear")
    check("Resize", {"x": (2, 3, 4, 3)}, scales, opset=10, kind=LINEAR, mode="linear")


# ---- per-channel scales folded into conv weights ------------------------------------------------
@pytest.mark.parametrize("opset", [9, 17])
def test_channel_scales_fold_into_conv_weights(opset):
    """Conv -> BN -> Mul(per-channel) -> Conv(stride 2) -> BN: the scales reach the convs' weights."""
    import onnx
    from onnx import helper, numpy_helper
    from vis_service.graph.loading import prepare_model
    bn = lambda c: [numpy_helper.from_array(v.astype(np.float32), f"{n}{c}")  # noqa: E731
                    for n, v in (("s", weights(c)), ("b", weights(c)), ("m", weights(c)), ("v", rng.uniform(0.5, 2, c)))]
    inits = [numpy_helper.from_array(weights(6, 3, 3, 3).astype(np.float32), "w1"),
             numpy_helper.from_array(weights(4, 6, 3, 3).astype(np.float32), "w2"),
             numpy_helper.from_array(weights(1, 6, 1, 1).astype(np.float32), "per_channel")] + bn(6) + bn(4)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Identity", ["s6"], ["s6_computed"]),    # parameters computed in the graph
             helper.make_node("BatchNormalization", ["c1", "s6_computed", "b6", "m6", "v6"], ["n1"]),
             helper.make_node("Mul", ["per_channel", "n1"], ["scaled"]),
             helper.make_node("Conv", ["scaled", "w2"], ["c2"], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c2", "s4", "b4", "m4", "v4"], ["y0"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 9, 9])],
                              [helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = prepare_model(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
    assert adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1.0).relative_error < 1e-4


@pytest.mark.parametrize("opset,channels", [(9, 32), (17, 32), (17, 3)])
def test_relu_mask_ramp_is_exact(opset, channels):
    """The float32 ReLU mask is a HardSigmoid ramp (runs in NCHWc): exact at 0, tiny normal and huge values."""
    from _engine_helpers import run_gradient
    from vis_service.engine import build_gradient_model
    model = one_node_model("Relu", {"x": (2, channels, 4, 5)}, opset=opset)
    x = np.random.default_rng(3).standard_normal((2, channels, 4, 5)).astype(np.float32)
    x.flat[:6] = [0.0, -0.0, 2.0 ** -126, -(2.0 ** -126), 3e38, -3e38]
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    graph = build_gradient_model(model, ["y0"], ["x"])
    assert "HardSigmoid" in {n.op_type for n in graph.model.graph.node}
    for optimize in (True, False):
        got = run_gradient(graph, {"x": x}, {"y0": g}, optimize=optimize)["x"]
        np.testing.assert_array_equal(got, g * (x > 0))


@pytest.mark.parametrize("shape", [(2, 32, 8, 10), (2, 32, 80)], ids=["4d_fused_conv", "3d_two_ramps"])
@pytest.mark.parametrize("high", [6.0, 1.0, 0.3, 4.0, 20.0])
def test_clip_mask_ramps_are_exact(high, shape):
    """Clip(0, high) in float32 takes HardSigmoid ramps: two ramps and their product, or on 4-D tensors
    one ramp and a depthwise 1x1 Conv + Add + ramp that onnxruntime fuses. Exact at the bounds and
    on every float within 100 ulps of them."""
    from _engine_helpers import run_gradient
    from vis_service.engine import build_gradient_model
    model = one_node_model("Clip", {"x": shape}, {"lo": np.array(0.0, np.float32), "hi": np.array(high, np.float32)}, opset=17)
    x = (np.random.default_rng(3).standard_normal(shape) * high).astype(np.float32)
    high32 = np.float32(high)
    x.flat[:12] = [0.0, -0.0, 2.0 ** -126, -(2.0 ** -126), high32, np.nextafter(high32, np.float32(0)),
                   np.nextafter(high32, np.float32(np.inf)), high32 / 2, np.nextafter(high32 / 2, np.float32(0)),
                   3e38, -3e38, 2.0 ** -149]
    sweep = []
    for bound in (np.float32(2.0 ** -126), high32):  # 100 floats each side of the bounds
        for direction in (np.float32(np.inf), np.float32(-np.inf)):
            v = bound
            for _ in range(100):
                v = np.nextafter(v, direction)
                sweep.append(v)
    x.flat[12:12 + len(sweep)] = sweep
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    graph = build_gradient_model(model, ["y0"], ["x"])
    ops = [n.op_type for n in graph.model.graph.node]
    assert "HardSigmoid" in ops
    assert ("Conv" in ops) == (len(shape) == 4), ops
    expected = g * ((x > 0) & (x < high32))
    for optimize in (True, False):
        got = run_gradient(graph, {"x": x}, {"y0": g}, optimize=optimize)["x"]
        # a positive denormal below 2^-127 gets a fractional factor (documented); all else exact
        np.testing.assert_array_equal(got.flat[:11], expected.flat[:11])
        np.testing.assert_array_equal(got.flat[12:], expected.flat[12:])


def _dense_layer_model(dtype):
    """Concat -> BatchNormalization -> Relu -> 1x1 Conv, as in a DenseNet layer."""
    from onnx import helper, numpy_helper
    from vis_service.graph.loading import prepare_model
    rng = np.random.default_rng(7)
    c = 32
    inits = [numpy_helper.from_array(v.astype(dtype), name) for name, v in {
        "scale": rng.uniform(0.5, 2.0, c), "bias": rng.standard_normal(c), "mean": rng.standard_normal(c),
        "var": rng.uniform(0.5, 2.0, c), "w": rng.standard_normal((16, c, 1, 1)) / np.sqrt(c)}.items()]
    nodes = [helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
             helper.make_node("BatchNormalization", ["cat", "scale", "bias", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["y0"])]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info(n, elem, [2, c // 2, 5, 5]) for n in "ab"],
                              [helper.make_tensor_value_info("y0", elem, [2, 16, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    # inputs at least 0.2 (in input units) away from each channel's ReLU kink, so that central
    # differences never cross one
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in inits}
    kink = p["mean"] - p["bias"] * np.sqrt(p["var"] + 1e-5) / p["scale"]
    x = kink[None, :, None, None] + rng.choice([-1.0, 1.0], (2, c, 5, 5)) * rng.uniform(0.2, 2.0, (2, c, 5, 5))
    feeds = {"a": x[:, : c // 2].astype(dtype), "b": x[:, c // 2:].astype(dtype)}
    return prepare_model(model, symbolic_batch=False), feeds


def test_channel_scale_before_a_split_folds_into_the_masked_backward_conv(monkeypatch):
    """DenseNet-style layer: the BatchNorm's per-channel scale goes into the backward Conv's weights
    (no broadcast product before the Concat's Split); the gradient stays exact."""
    from _engine_helpers import run_gradient
    from vis_service.engine import build_gradient_model
    from vis_service.engine.context import RuleContext
    model, feeds = _dense_layer_model(np.float32)
    gg = build_gradient_model(model, ["y0"], ["a", "b"])
    producers = {o: n for n in gg.model.graph.node for o in n.output}
    split = next(n for n in gg.model.graph.node if n.op_type == "Split")
    masked = producers[split.input[0]]
    assert masked.op_type == "Mul" and sorted(producers[i].op_type for i in masked.input) == ["Conv", "HardSigmoid"]
    cotangent = {"y0": np.random.default_rng(8).standard_normal((2, 16, 5, 5)).astype(np.float32)}
    folded = run_gradient(gg, feeds, cotangent)
    monkeypatch.setattr(RuleContext, "_scaled_masked_conv", lambda self, g, factor, like: None)
    plain = run_gradient(build_gradient_model(model, ["y0"], ["a", "b"]), feeds, cotangent)
    for name in "ab":
        np.testing.assert_allclose(folded[name], plain[name], rtol=1e-5, atol=1e-6)
    assert adjoint_check(model, feeds, ["y0"], ["a", "b"], eps=1e-2, graph=gg).relative_error < 1e-4


def _relu_pool_model(dtype, activation="Relu", second_consumer=False):
    """x*s -> Relu (or ReLU6 as Clip) -> MaxPool 3x3/2 pad 1 -> *t, as in a ResNet stem (products
    with constants instead of Convs: onnxruntime has no float64 Conv on CPU)."""
    from onnx import helper, numpy_helper
    from vis_service.graph.loading import prepare_model
    rng = np.random.default_rng(11)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(rng.uniform(0.5, 2.0, (1, 3, 1, 1)).astype(dtype), "s"),
             numpy_helper.from_array(rng.standard_normal((1, 3, 6, 6)).astype(dtype), "t")]
    if activation == "Relu":
        act = helper.make_node("Relu", ["c"], ["r"])
    else:
        inits += [numpy_helper.from_array(np.array(0.0, dtype), "lo"), numpy_helper.from_array(np.array(6.0, dtype), "hi")]
        act = helper.make_node("Clip", ["c", "lo", "hi"], ["r"])
    nodes = [helper.make_node("Mul", ["x", "s"], ["c"]), act,
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["p", "t"], ["y0"])]
    outputs = [helper.make_tensor_value_info("y0", elem, [2, 3, 6, 6])]
    if second_consumer:  # the ReLU output also feeds a second objective
        nodes.append(helper.make_node("ReduceSum", ["r"], ["y1"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("y1", elem, []))
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", elem, [2, 3, 12, 12])], outputs, inits)
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                          symbolic_batch=False)
    x = rng.standard_normal((2, 3, 12, 12)) * 4
    x[0, :, 2:9, 2:9] = 0.75   # a flat patch: windows with tied maxima
    x[1, :, 3:8, 3:8] = 9.0    # ... that ReLU6 clips to 6 (tied at the upper bound)
    x[1, :, 8:11, 0:5] = -1.0  # windows of zeros after the ReLU
    return model, {"x": x.astype(dtype)}


def _reads(graph, tensor, op_types):
    return [n for n in graph.model.graph.node if n.op_type in op_types and tensor in n.input]


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_mask_moves_before_the_max_pool_backward(monkeypatch, activation, dtype):
    """The ReLU's mask is applied to the pooled gradient (stride^2 fewer elements) instead of the
    routed one; the gradient is the same, ties in the windows included."""
    from _engine_helpers import run_gradient
    from vis_service.engine import build_gradient_model
    from vis_service.engine.context import RuleContext
    mask_ops = {"HardSigmoid", "Greater", "Less"}
    model, feeds = _relu_pool_model(dtype, activation)
    gg = build_gradient_model(model, ["y0"], ["x"])
    assert _reads(gg, "p", mask_ops) and not _reads(gg, "r", mask_ops)
    cotangent = {"y0": np.random.default_rng(12).standard_normal((2, 3, 6, 6)).astype(dtype)}
    moved = run_gradient(gg, feeds, cotangent)["x"]
    monkeypatch.setattr(RuleContext, "sole_gradient_source", lambda self, x, node: None)
    plain_graph = build_gradient_model(model, ["y0"], ["x"])
    assert _reads(plain_graph, "r", mask_ops) and not _reads(plain_graph, "p", mask_ops)
    np.testing.assert_array_equal(moved, run_gradient(plain_graph, feeds, cotangent)["x"])
    assert np.count_nonzero(moved) > moved.size // 16  # at most one element per window gets one
    monkeypatch.undo()
    if dtype == np.float64:  # central differences away from the ties
        rng = np.random.default_rng(13)
        smooth = {"x": rng.standard_normal((2, 3, 12, 12)) * 4}
        assert adjoint_check(model, smooth, ["y0"], ["x"], eps=1e-6).relative_error < 1e-6


@pytest.mark.parametrize("case", ["relu output is a wrt tensor", "relu output has a second consumer",
                                  "deconvnet", "guided"])
def test_relu_mask_stays_where_the_pool_is_not_its_only_gradient(case):
    from vis_service.engine import build_gradient_model
    model, _ = _relu_pool_model(np.float32, second_consumer=case == "relu output has a second consumer")
    objectives = ["y0", "y1"] if case == "relu output has a second consumer" else ["y0"]
    wrt = ["x", "r"] if case == "relu output is a wrt tensor" else ["x"]
    rule_set = case if case in ("deconvnet", "guided") else "gradient"
    gg = build_gradient_model(model, objectives, wrt, rule_set=rule_set)
    assert not _reads(gg, "p", {"HardSigmoid", "Greater", "Less", "Relu"})


def _lucid_redirected(x, g, low, high):
    """numpy transcription of Lucid's redirected_relu_grad / redirected_relu6_grad (ascent sign:
    Lucid differentiates a loss, -objective, so its "grad > 0" is our g < 0)."""
    inside = (x > low) if high is None else (x > low) & (x < high)
    exact = np.where(inside, g, 0.0)
    stop = (x <= low) & (g < 0)
    if high is not None:
        stop |= (x >= high) & (g > 0)
    redirected = np.where(stop, 0.0, g)
    flowing = np.abs(exact).reshape(len(x), -1).max(axis=1) > 0
    return np.where(flowing.reshape((-1,) + (1,) * (x.ndim - 1)), exact, redirected)


@pytest.mark.parametrize("op", ["Relu", "Clip"])
def test_redirected_rule_set_is_lucids_redirected_relu_gradient(op):
    """Image 0 has every unit inactive (below 0, or for ReLU6 also saturated at 6): its gradient
    passes except where it pushes a unit further out; image 1 has active units: the exact gradient."""
    opset = 13
    constants = {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)} if op == "Clip" else {}
    model = one_node_model(op, {"x": [2, 3, 4, 4]}, constants, opset=opset)
    rng = np.random.default_rng(31)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32) * 4
    x[0] = -np.abs(x[0]) - 0.5                      # all inactive below
    if op == "Clip":
        x[0, 1] = 6.5 + np.abs(x[0, 1])             # ... and a channel saturated above
    g = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"], rule_set="redirected"), {"x": x}, {"y0": g})["x"]
    want = _lucid_redirected(x.astype(np.float64), g.astype(np.float64), 0.0, 6.0 if op == "Clip" else None)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    exact = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    np.testing.assert_array_equal(got[1], exact[1])
    assert not exact[0].any() and got[0].any()
    assert (got[0][g[0] < 0][x[0][g[0] < 0] < 0] == 0).all()   # nothing pushes an inactive unit lower
