"""constant_value folding and layer_weights (orientation, errors) on small models and the real ones."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _graph_helpers import ALL_MODELS, load

from vis_service.errors import InvalidArgument, NotFound
from vis_service.graph.constants import constant_value, layer_weights
from vis_service.graph.loading import prepare_model, tensor_infos

RNG = np.random.default_rng(0)


def _model(nodes, inits, outputs, inputs=None, opset=13):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, "g", inputs, outs, initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return prepare_model(m)


def test_initializer_fast_path_and_input_dependence():
    w = RNG.normal(size=(3, 4)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "wt"], ["y"]), helper.make_node("Transpose", ["w"], ["wt"])],
               {"w": w}, ["y"])
    np.testing.assert_array_equal(constant_value(m, "w"), w)
    np.testing.assert_array_equal(constant_value(m, "wt"), w.T)
    assert constant_value(m, "y") is None        # depends on the graph input
    assert constant_value(m, "x") is None
    assert constant_value(m, "nope") is None


def test_constant_of_shape_identity_cast_reshape_chain():
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25])),
        helper.make_node("Identity", ["c"], ["ci"]),
        helper.make_node("Cast", ["ci"], ["c16"], to=TensorProto.FLOAT16),
        helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.FLOAT, [], [3.0])),
        helper.make_node("Mul", ["ci", "k"], ["m"]),
        helper.make_node("Reshape", ["m", "newshape"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax"], ["u"]),
        helper.make_node("Concat", ["u", "u"], ["cat"], axis=0),
        helper.make_node("Add", ["x", "cat"], ["y"]),
    ]
    m = _model(nodes, {"shape": np.array([2, 3], np.int64), "newshape": np.array([3, 2], np.int64),
                       "ax": np.array([0], np.int64)}, ["y"])
    np.testing.assert_array_equal(constant_value(m, "c"), np.full((2, 3), 0.25, np.float32))
    c16 = constant_value(m, "c16")
    assert c16.dtype == np.float16 and c16.shape == (2, 3)
    np.testing.assert_array_equal(constant_value(m, "k"), np.float32(3.0))
    cat = constant_value(m, "cat")
    assert cat.shape == (2, 3, 2) and np.allclose(cat, 0.75)


def test_dequantize_linear_per_tensor_and_per_axis():
    q = RNG.integers(0, 255, size=(4, 3, 2, 2)).astype(np.uint8)
    scale = np.array([0.1, 0.2, 0.5, 1.0], np.float32)
    zp = np.array([128, 0, 3, 250], np.uint8)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["q", "s1", "z1"], ["w1"]),
        helper.make_node("Conv", ["img", "w"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 5, 5])]
    m = _model(nodes, {"q": q, "scale": scale, "zp": zp, "s1": np.array(0.05, np.float32), "z1": np.array(7, np.uint8)},
               ["y"], inputs=inputs)
    expect = (q.astype(np.float32) - zp.astype(np.float32).reshape(4, 1, 1, 1)) * scale.reshape(4, 1, 1, 1)
    np.testing.assert_allclose(constant_value(m, "w"), expect, rtol=1e-6)
    np.testing.assert_allclose(constant_value(m, "w1"), (q.astype(np.float32) - 7) * np.float32(0.05), rtol=1e-6)
    node, w, b = layer_weights(m, "y")
    np.testing.assert_allclose(w, expect, rtol=1e-6)
    assert b is None and node.op_type == "Conv"


def test_random_ops_are_not_constant():
    nodes = [helper.make_node("RandomNormal", [], ["r"], shape=[1, 4]), helper.make_node("Add", ["x", "r"], ["y"])]
    m = _model(nodes, {}, ["y"])
    assert constant_value(m, "r") is None


@pytest.mark.parametrize("trans_b, alpha, beta", [(0, 1.0, 1.0), (1, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm_orientation_is_out_by_in(trans_b, alpha, beta):
    """(out, in), and scaled as the layer applies them (alpha and beta were left out)."""
    w_out_in = RNG.normal(size=(5, 4)).astype(np.float32)        # 4 inputs -> 5 outputs
    stored = w_out_in if trans_b else w_out_in.T
    bias = RNG.normal(size=(1, 5)).astype(np.float32)
    m = _model([helper.make_node("Gemm", ["x", "B", "C"], ["y"], transB=trans_b, alpha=alpha, beta=beta, name="fc")],
               {"B": stored, "C": bias}, ["y"])
    node, w, b = layer_weights(m, "fc")
    np.testing.assert_allclose(w, w_out_in * alpha, rtol=1e-6)
    np.testing.assert_allclose(b, bias.reshape(5) * beta, rtol=1e-6)
    # the weight really maps inputs to outputs: y = x @ w.T + b
    x = RNG.normal(size=(1, 4)).astype(np.float32)
    from onnx.reference import ReferenceEvaluator
    (y,) = ReferenceEvaluator(m).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-5)
    assert layer_weights(m, "y")[0] is node       # by output tensor name


def test_matmul_and_errors():
    w = RNG.normal(size=(4, 6)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "W"], ["h"], name="dense"), helper.make_node("Relu", ["h"], ["y"], name="act")],
               {"W": w}, ["y"])
    _, wt, b = layer_weights(m, "dense")
    np.testing.assert_array_equal(wt, w.T)
    assert b is None
    with pytest.raises(InvalidArgument) as e:
        layer_weights(m, "act")
    assert e.value.field == "layer" and "Relu" in str(e.value) and "Conv" in str(e.value)
    with pytest.raises(NotFound) as e:
        layer_weights(m, "dens")
    assert "dense" in e.value.suggestions
    with pytest.raises(InvalidArgument):
        layer_weights(m, "x")


def test_conv_with_activation_weights_is_refused():
    inputs = [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 1, 5, 5]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 1, 3, 3])]
    m = _model([helper.make_node("Conv", ["img", "k"], ["y"], name="dyn")], {}, ["y"], inputs=inputs)
    with pytest.raises(InvalidArgument) as e:
        layer_weights(m, "dyn")
    assert "graph input" in str(e.value)


def _weight_nodes(m):
    return [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


@pytest.mark.parametrize("model_id", ALL_MODELS)
def test_first_and_last_layer_weights_of_every_model(model_id):
    m = load(model_id)
    nodes = _weight_nodes(m)
    assert nodes
    for node in (nodes[0], nodes[-1]):
        got, w, b = layer_weights(m, node.output[0])
        assert got is node and w.dtype == np.float32 and np.isfinite(w).all()
        if node.op_type == "Conv":
            assert w.ndim == 4
            assert tensor_infos(m)[node.output[0]].shape[1] == w.shape[0]   # (out, in/group, kh, kw)
        else:
            assert w.ndim == 2 and tensor_infos(m)[node.output[0]].shape[-1] == w.shape[0]   # (out, in)
        if b is not None:
            assert b.shape == (w.shape[0],)
    # first conv reads the image channels
    first = layer_weights(m, nodes[0].output[0])[1]
    assert first.shape[1] in (1, 3)


def test_mnist_matmul_weight_through_constant_reshape():
    m = load("shared:mnist-8")
    mm = [n for n in m.graph.node if n.op_type == "MatMul"][0]
    _, w, b = layer_weights(m, mm.name)
    assert w.shape == (10, 256) and b is None


def test_light_constant_of_shape_weights_are_folded():
    m = load("light:bvlc_alexnet")
    conv = [n for n in m.graph.node if n.op_type == "Conv"][0]
    assert conv.input[1] not in {t.name for t in m.graph.initializer}
    _, w, b = layer_weights(m, conv.output[0])
    assert w.shape == (96, 3, 11, 11) and b.shape == (96,)


def test_session_bytes_count_a_packed_copy_per_reading_gemm_or_conv():
    """A weight read by a forward Gemm and its adjoint is held three times by onnxruntime (its own
    copy and one packed per op); ConstantOfShape weights (the light_* models') count too."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from vis_service.graph.weights import constant_bytes, session_bytes, structure_only

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")          # 16 KiB, read by two Gemms
    shape = numpy_helper.from_array(np.array([64, 64], np.int64), "shape")   # 16 bytes
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["v"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.5])),
             helper.make_node("Gemm", ["x", "w"], ["a"]), helper.make_node("Gemm", ["a", "w"], ["b"], transB=1),
             helper.make_node("MatMul", ["b", "v"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w, shape])
    m = helper.make_model(g)
    kib = 64 * 64 * 4
    assert constant_bytes(m) == 2 * kib + 16
    assert session_bytes(m) == 3 * kib + 2 * kib + 16
    light = structure_only(m, keep=1000)
    assert [t.name for t in light.graph.initializer] == ["w", "shape"] and not light.graph.initializer[0].raw_data
    assert numpy_helper.to_array(light.graph.initializer[1]).tolist() == [64, 64]
