"""Adjoint (dot-product) tests of the rules for DepthToSpace / SpaceToDepth, Softplus, Softsign,
Selu, Celu, ThresholdedRelu, Mish, ReduceL2, ReduceLogSumExp and Gather (on data), on randomized
attributes, and central differences on small graphs chaining several of them.

Same conventions as test_engine_rules.py (its `check` helper): float64 where onnxruntime has a
double kernel, else float32. Without its rule every test here raises Unimplemented.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from _engine_helpers import adjoint_check, one_node_model, run_gradient, session
from test_engine_rules import LINEAR, SMOOTH, check
from vis_service.engine import RULE_SETS, RULES, build_gradient_model
from vis_service.graph.loading import prepare_model

NEW_OPS = ["DepthToSpace", "SpaceToDepth", "Softplus", "Softsign", "Selu", "Celu", "ThresholdedRelu", "Mish",
           "ReduceL2", "ReduceLogSumExp", "Gather"]
# attribute values drawn at import, seeded and in a fixed order: randomized, yet reproducible
attr_rng = np.random.default_rng(2024)


def test_every_rule_set_finds_the_new_rules():
    for rule_set in RULE_SETS:
        for op in NEW_OPS:
            assert RULES.lookup(op, rule_set) is RULES.lookup(op, "gradient") is not None, (op, rule_set)


# ---- DepthToSpace / SpaceToDepth ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["DCR", "CRD"])
@pytest.mark.parametrize("block", [2, 3])
def test_depth_to_space(mode, block):
    check("DepthToSpace", {"x": (2, 2 * block * block, 3, 4)}, kind=LINEAR, blocksize=block, mode=mode)


def test_depth_to_space_opset_9_has_dcr_only():
    check("DepthToSpace", {"x": (2, 8, 3, 2)}, opset=9, kind=LINEAR, blocksize=2)


@pytest.mark.parametrize("block", [2, 3])
def test_space_to_depth(block):
    check("SpaceToDepth", {"x": (2, 3, 2 * block, 3 * block)}, kind=LINEAR, blocksize=block)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_spec_index_convention(mode):
    """The rules against the ONNX spec's numpy definition: the gradient of <DepthToSpace(x), g> is
    the spec's inverse permutation applied to g (element for element, not only in dot products)."""
    b, c, h, w, bs = 2, 12, 3, 2, 2
    model = one_node_model("DepthToSpace", {"x": (b, c, h, w)}, opset=17, blocksize=bs, mode=mode)
    g = np.random.default_rng(0).standard_normal((b, c // bs ** 2, h * bs, w * bs)).astype(np.float32)
    x = np.zeros((b, c, h, w), np.float32)
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    # forward by the spec on x = arange: y[p] = x.flat[index[p]]; the adjoint puts g[p] at index[p]
    flat = np.arange(x.size).reshape(x.shape)
    if mode == "DCR":
        index = flat.reshape(b, bs, bs, c // bs ** 2, h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        index = flat.reshape(b, c // bs ** 2, bs, bs, h, w).transpose(0, 1, 4, 2, 5, 3)
    expected = np.zeros(x.size, np.float32)
    expected[index.reshape(-1)] = g.reshape(-1)
    np.testing.assert_array_equal(got, expected.reshape(x.shape))


@pytest.mark.parametrize("spatial", [(3, 4), ("H", 4), ("H", "W")], ids=["static", "one-dynamic", "both-dynamic"])
def test_depth_to_space_crd_with_dynamic_spatial_sizes(spatial):
    """CRD's backward Reshape takes constant sizes where it can and Shape(y) otherwise (super-resolution
    models are exported with dynamic height and width)."""
    shape = ["N", 8] + list(spatial)
    graph = helper.make_graph([helper.make_node("DepthToSpace", ["x"], ["y0"], blocksize=2, mode="CRD")], "d2s",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, shape)],
                              [helper.make_tensor_value_info("y0", onnx.TensorProto.DOUBLE, None)])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    x = np.random.default_rng(1).standard_normal((3, 8, 3, 4))
    assert adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1.0).relative_error < 1e-12


# ---- activations ----------------------------------------------------------------------------------------
def _alpha(low, high):
    return float(attr_rng.uniform(low, high))


@pytest.mark.parametrize("op,attrs,opset,values", [
    ("Softplus", {}, 17, "normal"),
    ("Softsign", {}, 17, "normal"),
    ("Selu", {}, 17, "separated"),
    ("Selu", {"alpha": _alpha(0.5, 2.5), "gamma": _alpha(0.5, 2.0)}, 17, "separated"),
    ("Selu", {"alpha": 0.8, "gamma": 1.7}, 9, "separated"),
    ("Celu", {}, 17, "normal"),
    ("Celu", {"alpha": _alpha(0.2, 3.0)}, 17, "normal"),
    ("Celu", {"alpha": 0.4}, 12, "normal"),
    ("ThresholdedRelu", {}, 17, "separated"),
    ("ThresholdedRelu", {"alpha": 0.3}, 17, "separated"),
    ("ThresholdedRelu", {"alpha": -0.4}, 10, "separated"),
    ("Mish", {}, 18, "normal"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_activations(op, attrs, opset, values):
    # ThresholdedRelu is linear on each side of alpha; the others are smooth (Selu's kink at 0 stays
    # clear of the steps: "separated" values are at least 0.0185 from 0)
    kind = LINEAR if op == "ThresholdedRelu" else SMOOTH
    check(op, {"x": (2, 3, 4, 5)}, opset=opset, kind=kind, values=values, **attrs)


def _mish_slope(x):
    t = np.tanh(np.logaddexp(0, x))
    return t + x * (1 - t * t) / (1 + np.exp(-x))


@pytest.mark.parametrize("op,attrs,opset,slope", [
    ("Softplus", {}, 17, lambda x: 1 / (1 + np.exp(-x))),
    ("Softsign", {}, 17, lambda x: 1 / (1 + np.abs(x)) ** 2),
    ("Selu", {"alpha": 1.3, "gamma": 0.9}, 17, lambda x: np.where(x > 0, 0.9, 0.9 * 1.3 * np.exp(np.minimum(x, 0)))),
    ("Celu", {"alpha": 0.7}, 17, lambda x: np.exp(np.minimum(x, 0) / 0.7)),
    ("Celu", {"alpha": -2.0}, 17, lambda x: np.exp(np.minimum(x, 0) / -2.0)),
    ("ThresholdedRelu", {"alpha": 0.5}, 17, lambda x: (x > 0.5).astype(np.float64)),
    ("Mish", {}, 18, _mish_slope),
], ids=lambda v: v if isinstance(v, str) else "")
def test_activation_slopes_at_extremes(op, attrs, opset, slope):
    """Elementwise against numpy's slope on wide-ranged float32 values (up to +-80, and exact zeros,
    where Selu takes its negative side and ThresholdedRelu its threshold): finite, no overflow.
    Within 1e-6 * |g| absolutely: onnxruntime's float32 Sigmoid (Softplus's and Mish's slopes) is
    accurate to ~1e-7 absolutely, not relatively (it gives 0 below about -17)."""
    shape = (2, 3, 50)
    x = (np.random.default_rng(3).standard_normal(shape) * 25).astype(np.float32)
    x.flat[:6] = [0.0, 80.0, -80.0, 0.5, 30.0, -30.0]
    g = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    graph = build_gradient_model(one_node_model(op, {"x": shape}, opset=opset, **attrs), ["y0"], ["x"])
    got = run_gradient(graph, {"x": x}, {"y0": g})["x"]
    with np.errstate(over="ignore"):
        expected = g * slope(x.astype(np.float64))
    assert np.isfinite(got).all()
    assert (np.abs(got - expected) <= 2e-5 * np.abs(expected) + 1e-6 * np.abs(g)).all()


def test_mish_slope_in_float64():
    """Mish runs in float64 (its rule uses Sigmoid and arithmetic only): the slope from -700 to 700
    (the tails e^x (1 + x) and 1 + 4 x e^-2x included) to a few ulp of 1 absolutely, times |x| where the
    slope is about x s: the accuracy of onnxruntime's Sigmoid (~1e-16 absolutely; 0 below about -37 in
    float64). Nothing cancels on the way."""
    x = np.concatenate([np.linspace(-700, 700, 1401), np.linspace(-5, 5, 1001), [0.0]]).reshape(1, -1)
    g = np.random.default_rng(5).standard_normal(x.shape)
    graph = build_gradient_model(one_node_model("Mish", {"x": x.shape}, opset=18, dtype=np.float64), ["y0"], ["x"])
    got = run_gradient(graph, {"x": x}, {"y0": g})["x"]
    expected = g * _mish_slope(x)
    assert (np.abs(got - expected) <= 1e-13 * np.abs(expected) + 2e-16 * (2 + np.abs(x)) * np.abs(g)).all()


# ---- reductions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["ReduceL2", "ReduceLogSumExp"])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("opset,axes", [(13, [1, -1]), (13, [2]), (13, None), (18, [1, -1]), (18, [0, 2]), (18, None)])
def test_reduce(op, keepdims, opset, axes):
    consts, attrs = {}, {}
    if axes is not None:
        if opset >= 18:
            consts["axes"] = np.array(axes, dtype=np.int64)
        else:
            attrs["axes"] = axes
    check(op, {"x": (2, 3, 4, 5)}, consts, opset=opset, keepdims=keepdims, **attrs)


@pytest.mark.parametrize("op", ["ReduceL2", "ReduceLogSumExp"])
def test_reduce_noop_with_empty_axes(op):
    """No axes and noop_with_empty_axes: reduced over no axes (ReduceL2 gives |x|, ReduceLogSumExp x)."""
    check(op, {"x": (2, 3, 4)}, {"axes": np.zeros(0, np.int64)}, opset=18, noop_with_empty_axes=1,
          values="separated", kind=LINEAR if op == "ReduceL2" else SMOOTH)
    check(op, {"x": (2, 3, 4)}, opset=18, noop_with_empty_axes=1, values="separated",
          kind=LINEAR if op == "ReduceL2" else SMOOTH)


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_l2_of_zeros_gives_zero_gradient(opset):
    """A group of zeros has norm 0: its gradient is 0 (a subgradient), not NaN; the rest is x g / y."""
    axes = {"axes": [2]} if opset < 18 else {}
    consts = {"axes": np.array([2], np.int64)} if opset >= 18 else {}
    model = one_node_model("ReduceL2", {"x": (2, 3, 4)}, consts, opset=opset, dtype=np.float64, keepdims=0, **axes)
    x = np.random.default_rng(5).standard_normal((2, 3, 4))
    x[0, 1] = 0.0
    x[1, 2] = 0.0
    g = np.random.default_rng(6).standard_normal((2, 3))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    norm = np.sqrt((x * x).sum(axis=2, keepdims=True))
    expected = np.where(norm == 0, 0.0, x * g[..., None] / np.where(norm == 0, 1.0, norm))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert not got[0, 1].any() and not got[1, 2].any()


def test_reduce_log_sum_exp_of_large_values():
    """e^(x - y) cannot overflow: values of +-1000 (e^1000 overflows float64) give the softmax, not inf / inf."""
    model = one_node_model("ReduceLogSumExp", {"x": (2, 5)}, {"axes": np.array([1], np.int64)}, opset=18,
                           dtype=np.float64, keepdims=1)
    x = np.array([[1000.0, 999.0, 998.0, -1000.0, 1000.0], [-800.0, -801.0, -799.0, -802.0, -800.0]])
    g = np.array([[2.0], [-1.0]])
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    softmax = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(got, g * softmax / softmax.sum(axis=1, keepdims=True), rtol=1e-12, atol=1e-300)


# ---- Gather ----------------------------------------------------------------------------------------------
GATHER_INDICES = {
    "scalar": np.array(-1, np.int64),
    "scalar-0": np.array(0, np.int64),
    "1d-dup-neg": np.array([2, -1, 0, 2, -3, 1], np.int64),
    "2d-dup-neg": np.array([[1, -1, 1], [0, 1, -2]], np.int64),
    "int32": np.array([-2, 0, 0, 1], np.int32),
}


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("which", list(GATHER_INDICES))
def test_gather_constant_indices(which, axis):
    """Indices valid for every axis of a [3, 3, 4] tensor (in [-3, 2]): duplicates add up, negatives
    count from the end, scalar indices drop the axis, 2-D ones add one."""
    check("Gather", {"x": (3, 3, 4)}, {"i": GATHER_INDICES[which]}, kind=LINEAR, axis=axis)


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_gather_randomized(axis):
    """Random indices (with repeats and negative forms) on every axis of a rank-4 tensor."""
    shape = (2, 3, 4, 5)
    dim = shape[axis]
    r = np.random.default_rng(100 + axis)  # per test: the same draw whichever tests run
    index_shape = tuple(int(s) for s in r.integers(2, 5, size=int(r.integers(0, 3))))
    indices = r.integers(-dim, dim, size=index_shape).astype(np.int64)
    check("Gather", {"x": shape}, {"i": indices}, kind=LINEAR, axis=axis)


def _gather_model(indices_source: str, axis: int, data_shape, index_shape, opset: int = 17):
    """Gather whose indices are a graph input, or computed from a constant by an Identity: either way
    not a constant at build time (the run-time path of the rule)."""
    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, list(data_shape))]
    if indices_source == "input":
        inputs.append(helper.make_tensor_value_info("i", onnx.TensorProto.INT64, list(index_shape)))
        name = "i"
    else:
        inits.append(numpy_helper.from_array(np.zeros(index_shape, np.int64), "i0"))
        nodes.append(helper.make_node("Identity", ["i0"], ["i"]))
        name = "i"
    nodes.append(helper.make_node("Gather", ["x", name], ["y0"], axis=axis))
    graph = helper.make_graph(nodes, "gather", inputs, [helper.make_tensor_value_info("y0", onnx.TensorProto.DOUBLE, None)],
                              inits)
    return prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8),
                         symbolic_batch=False)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("index_shape", [(), (5,), (2, 3)], ids=["scalar", "1d", "2d"])
def test_gather_indices_computed_at_run_time(axis, index_shape):
    data_shape = (3, 4, 3)
    model = _gather_model("input", axis, data_shape, index_shape)
    rng = np.random.default_rng(axis)
    indices = rng.integers(-data_shape[axis], data_shape[axis], size=index_shape).astype(np.int64)
    if indices.size > 1:
        indices.flat[1] = indices.flat[0]  # a duplicate
    feeds = {"x": rng.standard_normal(data_shape), "i": indices}
    assert adjoint_check(model, feeds, ["y0"], ["x"], eps=1.0).relative_error < 1e-12


def test_gather_accumulates_duplicates_exactly():
    """Every element's gradient is the sum of g over the positions that read it."""
    x = np.zeros((2, 4), np.float64)
    indices = np.array([3, 3, -1, 0, 3], np.int64)
    model = one_node_model("Gather", {"x": x.shape}, {"i": indices}, opset=17, dtype=np.float64, axis=1)
    g = np.arange(10, dtype=np.float64).reshape(2, 5) + 1
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    np.testing.assert_array_equal(got, [[4, 0, 0, 1 + 2 + 3 + 5], [9, 0, 0, 6 + 7 + 8 + 10]])


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_gather_in_older_models_is_converted_to_opset_16(opset):
    check("Gather", {"x": (3, 4)}, {"i": np.array([[1, 1], [0, 3]], np.int64)}, opset=opset, kind=LINEAR, axis=1)
    model = one_node_model("Gather", {"x": (3, 4)}, {"i": np.array([1, 1], np.int64)}, opset=opset, axis=1)
    graph = build_gradient_model(model, ["y0"], ["x"])
    assert {o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")} == {16}


def test_gather_with_dynamic_trailing_size():
    """2-D indices where a size after the axis is known only at run time: g's index axes are merged
    with a shape built from Shape(g)."""
    graph = helper.make_graph([helper.make_node("Gather", ["x", "i"], ["y0"], axis=1)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, ["N", 4, "W"])],
                              [helper.make_tensor_value_info("y0", onnx.TensorProto.DOUBLE, None)],
                              [numpy_helper.from_array(np.array([[3, -1], [0, 1]], np.int64), "i")])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    x = np.random.default_rng(7).standard_normal((2, 4, 5))
    assert adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1.0).relative_error < 1e-12


@pytest.mark.parametrize("indices", [np.array(-1, np.int64), np.array([-1, 0, -1], np.int64)], ids=["scalar", "1d"])
def test_gather_negative_constant_indices_on_the_batch_axis(indices):
    """The batch size is symbolic: negative constant indices stay negative (ScatterElements counts
    them from the end at run time, as Gather does)."""
    graph = helper.make_graph([helper.make_node("Gather", ["x", "i"], ["y0"], axis=0)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, ["N", 3, 2])],
                              [helper.make_tensor_value_info("y0", onnx.TensorProto.DOUBLE, None)],
                              [numpy_helper.from_array(indices, "i")])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (2, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 2))
        assert adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1.0).relative_error < 1e-12


# ---- central differences on small chains -------------------------------------------------------------------
def _chain_model(nodes, inits, x_shape, dtype, opset):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", elem, list(x_shape))],
                              [helper.make_tensor_value_info("y0", elem, None)], inits)
    return prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8),
                         symbolic_batch=False)


def _central_differences(model, x, cotangent, eps):
    """d<f(x), cotangent>/dx element by element, by central differences."""
    forward = session(model, optimize=False)
    grad = np.zeros(x.shape, np.float64)
    for k in range(x.size):
        step = np.zeros(x.size, x.dtype)
        step[k] = eps
        plus = forward.run(None, {"x": x + step.reshape(x.shape)})[0].astype(np.float64)
        minus = forward.run(None, {"x": x - step.reshape(x.shape)})[0].astype(np.float64)
        grad.flat[k] = np.sum((plus - minus) * cotangent) / (2 * eps)
    return grad


def test_chain_depth_to_space_mish_log_sum_exp_central_differences():
    """DepthToSpace (CRD) -> Mish -> ReduceLogSumExp over the spatial axes, float64, every element."""
    nodes = [helper.make_node("DepthToSpace", ["x"], ["d"], blocksize=2, mode="CRD"),
             helper.make_node("Mish", ["d"], ["m"]),
             helper.make_node("ReduceLogSumExp", ["m", "axes"], ["y0"], keepdims=0)]
    model = _chain_model(nodes, [numpy_helper.from_array(np.array([2, 3], np.int64), "axes")], (2, 8, 2, 3), np.float64, 18)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 8, 2, 3))
    cotangent = rng.standard_normal((2, 2))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": cotangent})["x"]
    np.testing.assert_allclose(got, _central_differences(model, x, cotangent, 1e-6), rtol=1e-6, atol=1e-8)


def test_chain_gather_selu_l2_space_to_depth_central_differences():
    """Gather (duplicates, negative) -> Selu -> SpaceToDepth -> ReduceL2 over channels (opset 13:
    axes attribute), float32 (Selu has no float64 kernel), every element, inputs away from Selu's kink."""
    indices = np.array([2, -1, 0, 0], np.int64)
    nodes = [helper.make_node("Gather", ["x", "i"], ["g"], axis=1),
             helper.make_node("Selu", ["g"], ["s"], alpha=1.4, gamma=0.8),
             helper.make_node("SpaceToDepth", ["s"], ["d"], blocksize=2),
             helper.make_node("ReduceL2", ["d"], ["y0"], axes=[1], keepdims=1)]
    model = _chain_model(nodes, [numpy_helper.from_array(indices, "i")], (2, 3, 4, 2), np.float32, 13)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 4, 2))
    x = (np.sign(x) * (np.abs(x) + 0.1)).astype(np.float32)
    cotangent = rng.standard_normal((2, 1, 2, 1))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": cotangent.astype(np.float32)})["x"]
    np.testing.assert_allclose(got, _central_differences(model, x, cotangent, 1e-2), rtol=3e-3, atol=3e-4)
    assert not got[:, 1].any()   # channel 1 is never gathered


@pytest.mark.parametrize("rule_set", ["deconvnet", "guided"])
def test_chain_under_other_rule_sets(rule_set):
    """deconvnet and guided override ReLU-like ops only and inherit the new rules: a chain of them
    (no ReLU) differentiates exactly under either."""
    nodes = [helper.make_node("Softplus", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i"], ["g"], axis=0),
             helper.make_node("ReduceL2", ["g"], ["y0"], keepdims=0)]
    model = _chain_model(nodes, [numpy_helper.from_array(np.array([1, 1, -1], np.int64), "i")], (3, 4), np.float32, 17)
    x = np.random.default_rng(10).standard_normal((3, 4)).astype(np.float32)
    graph = build_gradient_model(model, ["y0"], ["x"], rule_set=rule_set)
    assert adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1e-2, graph=graph).relative_error < 2e-3
