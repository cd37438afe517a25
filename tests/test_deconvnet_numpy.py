"""The numpy deconvnet (engine/deconvnet_numpy.py) against the graph `deconvnet` rule set.

Two independent implementations of the Zeiler & Fergus projection must agree to 1e-5
relative (max |a - b| / max |b|) on the shared trained models and on the untrained
`light_*` graphs of the onnx wheel (structural agreement: Concat, Add/Sum, Slice+Pad,
depthwise Conv, Clip, BatchNormalization, Transpose, AveragePool, LRN, MatMul, Gemm).
Both sides run with graph optimizations off, so both see bit-identical forward values
and hence identical max-pool switches (notes #11: NCHWc can flip a near-tie).
Small hand-made graphs check what can be written down: rectification ignores the
forward mask, overlapping pools accumulate, the numpy conv/pool adjoints satisfy
⟨A x, g⟩ = ⟨x, Aᵀ g⟩ against onnxruntime's forward ops.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _graph_helpers import load
from vis_service.engine.backward import build_gradient_model
from vis_service.engine.deconvnet_numpy import (deconvnet_projection, feature_map_cotangent,
                                                top_activation_cotangent)
from vis_service.errors import InvalidArgument, Unimplemented
from vis_service.graph.expose import expose_tensors
from vis_service.graph.loading import prepare_model, tensor_infos

TOL = 1e-5


def exact_session(model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def forward(model, feeds, names, session=exact_session):
    return session(expose_tensors(model, names)).run(None, feeds)


def engine_projection(model, feeds, layer, cotangent, wrt, session=exact_session):
    gg = build_gradient_model(model, [layer], [wrt], rule_set="deconvnet")
    sess = session(gg.model)
    (out,) = sess.run([gg.gradient_outputs[wrt]], {**feeds, gg.cotangent_inputs[layer]: cotangent})
    return out


def relative_error(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_input(model, batch, seed=0, scale=1.0):
    inp = model.graph.input[0]
    shape = [d if isinstance(d, int) else batch for d in tensor_infos(model)[inp.name].shape]
    return inp.name, (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def compare(model, layer, batch, *, lrn="identity", cotangent="random", seed=0):
    wrt, x = random_input(model, batch, seed)
    feeds = {wrt: x}
    (act,) = forward(model, feeds, [layer])
    if cotangent == "random":
        cot = np.random.default_rng(seed + 1).standard_normal(act.shape).astype(np.float32)
    else:
        cot = top_activation_cotangent(act)
    got = deconvnet_projection(model, feeds, layer, cot, session_factory=exact_session, lrn=lrn)
    ref = engine_projection(model, feeds, layer, cot, wrt)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert np.abs(ref).max() > 0, "degenerate comparison: the projection is all zeros"
    err = relative_error(got, ref)
    assert err <= TOL, f"{layer}: relative error {err:.3g}"
    return got, ref


# ---------------------------------------------------------------------------------------------
# real models


SHARED_CASES = [
    # model, layer, batch
    ("shared:squeezenet1.0", "fire4/concat_1", 2),                           # Concat fire modules, 2 MaxPools
    ("shared:resnet20", "/layer3/layer3.0/Relu_1_output_0", 2),               # Add, Slice + Pad shortcut
    ("shared:mobilenet_v1", "t55_bilenetV1_MobilenetV1_Conv2d_6_pointwise_BatchNorm_Fold_bias", 1),  # depthwise, Clip
    ("shared:mnist-8", "Plus214_Output_0", 2),                                 # CNTK: MaxPool, MatMul, Add bias
]

LIGHT_CASES = [
    ("light:bvlc_alexnet", "r13", 1),        # conv5 relu: LRN x2, overlapping 3x3/2 MaxPool
    ("light:zfnet512", "r13", 1),            # LRN, 3x3/2 MaxPool
    ("light:vgg19", "r11", 1),               # conv3_1 relu after two MaxPools
    ("light:squeezenet", "r34", 2),
    ("light:inception_v1", "r74", 1),        # LRN, inception Concat, MaxPool in branches
    ("light:inception_v2", "r257", 1),       # BatchNormalization, AveragePool branch, Concat
    ("light:resnet50", "r89", 1),            # Sum shortcut, BatchNormalization
    ("light:shufflenet", "r101", 1),         # grouped Conv, Reshape/Transpose channel shuffle, Sum
    ("light:densenet121", "r300", 1),        # dense Concat, BN as Mul/Add, AveragePool transition
]

@pytest.mark.parametrize("model_id,layer,batch", SHARED_CASES, ids=[c[0] for c in SHARED_CASES])
def test_agrees_with_graph_rule_set_on_shared_models(model_id, layer, batch):
    compare(load(model_id), layer, batch)


@pytest.mark.parametrize("model_id,layer,batch", LIGHT_CASES, ids=[c[0] for c in LIGHT_CASES])
def test_agrees_with_graph_rule_set_on_light_models(model_id, layer, batch):
    # alexnet, zfnet512 and inception_v1 have LRN: both sides pass it through
    compare(load(model_id), layer, batch)


def test_top_activation_projection_squeezenet():
    """The Zeiler & Fergus use: project the strongest activation of a layer (one-hot cotangent)."""
    got, _ = compare(load("shared:squeezenet1.0"), "fire5/concat_1", 2, cotangent="top")
    # a single activation's projection is confined to its receptive field
    assert (np.abs(got[0]).sum(axis=0) > 0).mean() < 0.9


def test_default_session_runs_with_optimizations():
    """The default (optimized) session gives the same projection where no switch can flip."""
    model = load("shared:resnet20")
    wrt, x = random_input(model, 1)
    layer = "/layer2/layer2.0/Relu_1_output_0"
    (act,) = forward(model, {wrt: x}, [layer])
    cot = feature_map_cotangent(act, 3)
    got = deconvnet_projection(model, {wrt: x}, layer, cot)
    ref = engine_projection(model, {wrt: x}, layer, cot, wrt)
    assert relative_error(got, ref) <= 1e-4


# ---------------------------------------------------------------------------------------------
# hand-made graphs


def _typed(v):
    v = np.asarray(v)
    return v.astype(np.int64) if v.dtype.kind in "iu" else v.astype(np.float32)


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                          initializer=[numpy_helper.from_array(_typed(v), k) for k, v in dict(inits).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return prepare_model(m)


def test_rectification_ignores_forward_mask():
    """deconvnet: relu(upstream) whatever the sign of the forward input (guided would mask)."""
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                        helper.make_node("Relu", ["c"], ["y"], name="relu")],
                       [("x", [1, 1, 2, 2])], ["y"], {"w": np.full((1, 1, 1, 1), 2.0)})
    x = np.array([[[[1.0, -1.0], [2.0, -3.0]]]], dtype=np.float32)      # forward mask: 1 0 / 1 0
    cot = np.array([[[[1.0, 1.0], [-1.0, -2.0]]]], dtype=np.float32)
    expected = 2.0 * np.maximum(cot, 0)                                   # [[2, 2], [0, 0]]
    got = deconvnet_projection(model, {"x": x}, "y", cot)
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(engine_projection(model, {"x": x}, "y", cot, "x"), expected)


def test_clip_and_leaky_relu_rectify_too():
    model = make_model([helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
                        helper.make_node("LeakyRelu", ["c"], ["y"], name="leaky", alpha=0.1)],
                       [("x", [1, 4])], ["y"], {"lo": np.float32(0.0), "hi": np.float32(6.0)})
    x = np.array([[-1.0, 3.0, 7.0, 0.5]], dtype=np.float32)
    cot = np.array([[2.0, -1.0, 3.0, -4.0]], dtype=np.float32)
    got = deconvnet_projection(model, {"x": x}, "y", cot)
    np.testing.assert_allclose(got, [[2.0, 0.0, 3.0, 0.0]])


def test_global_max_pool_ties_share_in_both_implementations():
    """A flat (dead) channel ties all its positions: each gets 1/k of the gradient, in the graph
    rule set and in the numpy deconvnet alike (deconvnet ignores the ReLU mask that would hide it)."""
    model = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                        helper.make_node("GlobalMaxPool", ["r"], ["y"], name="gmp")], [("x", [1, 2, 2, 2])], ["y"])
    x = np.array([[[[-1.0, -2.0], [-3.0, -4.0]], [[1.0, 3.0], [2.0, 0.5]]]], dtype=np.float32)
    cot = np.array([[[[2.0]], [[1.0]]]], dtype=np.float32)
    expected = np.array([[[[0.5, 0.5], [0.5, 0.5]], [[0.0, 1.0], [0.0, 0.0]]]], dtype=np.float32)
    np.testing.assert_allclose(deconvnet_projection(model, {"x": x}, "y", cot), expected)
    np.testing.assert_allclose(engine_projection(model, {"x": x}, "y", cot, "x"), expected)


def test_overlapping_max_pool_accumulates():
    """3x3 stride 2 on 5x5: the centre is the max of all four windows and receives 4.0."""
    model = make_model([helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 2])],
                       [("x", [1, 1, 5, 5])], ["y"])
    x = np.zeros((1, 1, 5, 5), dtype=np.float32)
    x[0, 0, 2, 2] = 1.0
    cot = np.ones((1, 1, 2, 2), dtype=np.float32)
    got = deconvnet_projection(model, {"x": x}, "y", cot)
    expected = np.zeros_like(x)
    expected[0, 0, 2, 2] = 4.0
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(engine_projection(model, {"x": x}, "y", cot, "x"), expected)


def test_max_pool_ceil_mode_pads_and_batch_offsets():
    """Flattened N·C·H·W switches with pads and an overhanging last window (notes #3, #5)."""
    model = make_model([helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                                         pads=[1, 0, 0, 1], ceil_mode=1)],
                       [("x", [2, 3, 8, 7])], ["y"])
    rng = np.random.default_rng(0)
    x = rng.permutation(2 * 3 * 8 * 7).reshape(2, 3, 8, 7).astype(np.float32)
    (y,) = forward(model, {"x": x}, ["y"])
    cot = rng.standard_normal(y.shape).astype(np.float32)
    got = deconvnet_projection(model, {"x": x}, "y", cot)
    np.testing.assert_allclose(got, engine_projection(model, {"x": x}, "y", cot, "x"), rtol=1e-6, atol=1e-6)
    # every switch lands inside its own (n, c) plane
    np.testing.assert_allclose(got.sum(axis=(2, 3)), cot.sum(axis=(2, 3)), rtol=1e-5)


CONV_GEOMETRIES = [
    dict(strides=[2, 2], pads=[0, 1, 1, 0]),                 # asymmetric pads, stride 2
    dict(strides=[3, 2], dilations=[2, 1], pads=[2, 0, 1, 2]),
    dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(auto_pad="SAME_UPPER", strides=[1, 1]),
    dict(strides=[2, 2], pads=[1, 1, 1, 1], group=4),        # depthwise
    dict(strides=[1, 2], pads=[0, 0, 0, 0], group=2),        # grouped
]


@pytest.mark.parametrize("attrs", CONV_GEOMETRIES)
def test_conv_adjoint_against_onnxruntime(attrs):
    """⟨Conv(x), g⟩ = ⟨x, projection(g)⟩: the numpy transposed conv is the exact adjoint."""
    group = attrs.get("group", 1)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 4 // group, 3, 3)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)],
                       [("x", [2, 4, 11, 10])], ["y"], {"w": w, "b": rng.standard_normal(4)})
    x = rng.standard_normal((2, 4, 11, 10)).astype(np.float32)
    (y,) = forward(model, {"x": x}, ["y"])
    (y0,) = forward(model, {"x": np.zeros_like(x)}, ["y"])      # the bias alone
    g = rng.standard_normal(y.shape).astype(np.float32)
    got = deconvnet_projection(model, {"x": x}, "y", g)
    lhs, rhs = np.vdot(y - y0, g), np.vdot(x, got)
    assert abs(lhs - rhs) <= 1e-5 * np.abs(y - y0).sum() * np.abs(g).max()
    np.testing.assert_allclose(got, engine_projection(model, {"x": x}, "y", g, "x"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], count_include_pad=0),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], count_include_pad=1),
    dict(kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1, count_include_pad=0),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0], ceil_mode=1, count_include_pad=1),
    dict(kernel_shape=[2, 2], strides=[2, 2]),
])
def test_average_pool_adjoint_against_onnxruntime(attrs):
    model = make_model([helper.make_node("AveragePool", ["x"], ["y"], name="pool", **attrs)],
                       [("x", [1, 2, 9, 8])], ["y"], opset=19)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 9, 8)).astype(np.float32)
    (y,) = forward(model, {"x": x}, ["y"])
    g = rng.standard_normal(y.shape).astype(np.float32)
    got = deconvnet_projection(model, {"x": x}, "y", g)
    assert abs(np.vdot(y, g) - np.vdot(x, got)) <= 1e-5 * np.abs(x).sum()
    np.testing.assert_allclose(got, engine_projection(model, {"x": x}, "y", g, "x"), rtol=1e-5, atol=1e-6)


def test_layout_and_linear_ops_against_engine():
    """Slice (stride 2) + Pad, Concat, Add/Sum with broadcasting, BN, Transpose, Flatten, Gemm, MatMul."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.standard_normal((4, 3, 3, 3)), "starts": np.array([0, 0]), "ends": np.array([99, 99]),
        "axes": np.array([2, 3]), "steps": np.array([2, 2]), "pads": np.array([0, 2, 0, 0, 0, 2, 0, 0]),
        "scale": rng.uniform(0.5, 2, 8), "bias": rng.standard_normal(8), "mean": rng.standard_normal(8),
        "var": rng.uniform(0.5, 2, 8), "cb": rng.standard_normal((1, 8, 1, 1)),
        "gw": rng.standard_normal((5, 8 * 4 * 4)), "mw": rng.standard_normal((5, 3)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Slice", ["r1", "starts", "ends", "axes", "steps"], ["s"], name="slice"),
        helper.make_node("Pad", ["s", "pads"], ["p"], name="pad"),                          # 4 -> 8 channels
        helper.make_node("MaxPool", ["r1"], ["mp"], name="mp", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["mp", "mp"], ["cat"], name="cat", axis=1),               # 8 channels
        helper.make_node("Sum", ["p", "cat", "cb"], ["sum"], name="sum"),
        helper.make_node("BatchNormalization", ["sum", "scale", "bias", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Transpose", ["bn"], ["t"], name="t", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["t"], ["t2"], name="t2", perm=[0, 3, 1, 2]),
        helper.make_node("Flatten", ["t2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "gw"], ["fc"], name="fc", transB=1),
        helper.make_node("MatMul", ["fc", "mw"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [("x", [2, 3, 8, 8])], ["y"], inits)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    for layer in ("y", "sum"):
        (act,) = forward(model, {"x": x}, [layer])
        cot = rng.standard_normal(act.shape).astype(np.float32)
        got = deconvnet_projection(model, {"x": x}, layer, cot)
        ref = engine_projection(model, {"x": x}, layer, cot, "x")
        assert relative_error(got, ref) <= TOL, layer


def _lrn_model():
    rng = np.random.default_rng(4)
    return make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                       helper.make_node("LRN", ["c"], ["y"], name="norm", size=3, alpha=0.5, beta=0.75, bias=1.0)],
                      [("x", [1, 2, 4, 4])], ["y"], {"w": rng.standard_normal((6, 2, 1, 1))})


def test_lrn_is_passed_through_by_default():
    """Numpy and graph deconvnets both leave LRN out (Zeiler & Fergus do not invert it)."""
    model = _lrn_model()
    x = np.random.default_rng(5).standard_normal((1, 2, 4, 4)).astype(np.float32)
    cot = np.random.default_rng(6).standard_normal((1, 6, 4, 4)).astype(np.float32)
    (w,) = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w"]
    expected = np.einsum("nmhw,mc->nchw", cot, w[:, :, 0, 0])      # Conv adjoint only
    np.testing.assert_allclose(deconvnet_projection(model, {"x": x}, "y", cot), expected, rtol=1e-5, atol=1e-6)
    gg = build_gradient_model(model, ["y"], ["x"], rule_set="deconvnet")
    (graph,) = exact_session(gg.model).run([gg.gradient_outputs["x"]], {"x": x, gg.cotangent_inputs["y"]: cot})
    np.testing.assert_allclose(graph, expected, rtol=1e-5, atol=1e-6)


def test_lrn_gradient_mode_matches_engine_exact_gradient():
    """lrn='gradient' reproduces the exact LRN vector-Jacobian product (gradient rule set)."""
    model = _lrn_model()
    x = np.random.default_rng(5).standard_normal((1, 2, 4, 4)).astype(np.float32)
    cot = np.random.default_rng(6).standard_normal((1, 6, 4, 4)).astype(np.float32)
    got = deconvnet_projection(model, {"x": x}, "y", cot, lrn="gradient")
    gg = build_gradient_model(model, ["y"], ["x"], rule_set="gradient")
    (ref,) = exact_session(gg.model).run([gg.gradient_outputs["x"]], {"x": x, gg.cotangent_inputs["y"]: cot})
    assert relative_error(got, ref) <= TOL


# ---------------------------------------------------------------------------------------------
# helpers and errors


def test_top_activation_cotangent():
    a = np.zeros((2, 3, 2, 2), dtype=np.float32)
    a[0, 1, 1, 0] = 5.0
    a[0, 2, 0, 1] = 3.0
    a[1, 0, 0, 0] = -1.0
    a[1, 2, 1, 1] = 0.5
    cot = top_activation_cotangent(a)
    assert cot.shape == a.shape and cot.dtype == a.dtype
    assert cot.sum() == 2 and cot[0, 1, 1, 0] == 1 and cot[1, 2, 1, 1] == 1
    cot = top_activation_cotangent(a, channel=2)
    assert cot.sum() == 2 and cot[0, 2, 0, 1] == 1 and cot[1, 2, 1, 1] == 1
    fc = top_activation_cotangent(np.array([[0.1, 0.7, 0.2]]))
    np.testing.assert_array_equal(fc, [[0, 1, 0]])
    with pytest.raises(InvalidArgument):
        top_activation_cotangent(a, channel=3)
    fm = feature_map_cotangent(a, 2)
    assert fm[:, 2].tolist() == a[:, 2].tolist() and not fm[:, :2].any()


def test_unsupported_op_names_op_and_node():
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                        helper.make_node("Sigmoid", ["c"], ["y"], name="squash")],
                       [("x", [1, 1, 3, 3])], ["y"], {"w": np.ones((1, 1, 1, 1))})
    x = np.ones((1, 1, 3, 3), dtype=np.float32)
    with pytest.raises(Unimplemented, match=r"Sigmoid.*'squash'"):
        deconvnet_projection(model, {"x": x}, "y", x)
    # below the unsupported op everything works
    np.testing.assert_allclose(deconvnet_projection(model, {"x": x}, "c", x), x)


def test_softmax_and_bad_cotangent_are_refused():
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], name="prob", axis=1)], [("x", [1, 4])], ["y"])
    x = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(Unimplemented, match="Softmax"):
        deconvnet_projection(model, {"x": x}, "y", x)
    with pytest.raises(InvalidArgument, match="cotangent"):
        deconvnet_projection(model, {"x": x}, "x", np.ones((1, 5), dtype=np.float32))


def test_second_input_operand_and_wrt_choice():
    """A Mul by another graph input is read from the feeds; `wrt` picks the input; node names resolve."""
    model = make_model([helper.make_node("Mul", ["x", "s"], ["m"], name="scale"),
                        helper.make_node("Relu", ["m"], ["y"], name="relu")],
                       [("x", [1, 3]), ("s", [1, 3])], ["y"])
    x = np.array([[1.0, -2.0, 3.0]], dtype=np.float32)
    s = np.array([[2.0, 3.0, -1.0]], dtype=np.float32)
    cot = np.array([[1.0, -1.0, 2.0]], dtype=np.float32)
    with pytest.raises(InvalidArgument, match="wrt"):
        deconvnet_projection(model, {"x": x, "s": s}, "y", cot)
    got = deconvnet_projection(model, {"x": x, "s": s}, "relu", cot, wrt="x")
    np.testing.assert_allclose(got, [[2.0, 0.0, -2.0]])
    np.testing.assert_allclose(deconvnet_projection(model, {"x": x, "s": s}, "y", cot, wrt="s"), [[1.0, 0.0, 6.0]])
