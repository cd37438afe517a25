"""Quantized graphs: QDQ pairs by the clipped straight-through estimator; operator form unimplemented."""
from __future__ import annotations

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _engine_helpers import run_gradient, session
from vis_service.default_models import DEFAULT_MODEL_DIR
from vis_service.engine import build_gradient_model
from vis_service.errors import Unimplemented
from vis_service.graph.expose import expose_tensors
from vis_service.graph.loading import prepare_model

FLOAT, UINT8, INT8 = onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes, x_shape, inits, opset=13):
    graph = helper.make_graph(nodes, "quantized", [helper.make_tensor_value_info("x", FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", FLOAT, None)], inits)
    return prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8),
                         symbolic_batch=False)


def _qdq(x, y, scale, zero, axis=None, between=()):
    """x -> QuantizeLinear -> (between) -> DequantizeLinear -> y, with initializers `scale`, `zero`."""
    extra = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", [x, "s", "z"], ["q"], name="quantize", **extra)]
    last = "q"
    for k, (op, attrs) in enumerate(between):
        nodes.append(helper.make_node(op, [last], [f"q{k}"], name=f"{op.lower()}_q", **attrs))
        last = f"q{k}"
    nodes.append(helper.make_node("DequantizeLinear", [last, "s", "z"], [y], name="dequantize", **extra))
    return nodes, [_const("s", scale), _const("z", zero)]


def _gradient(model, x, g):
    return run_gradient(build_gradient_model(model, ["y"], ["x"]), {"x": x}, {"y": g})["x"]


def _representable(x, scale, zero, low, high):
    level = np.round(x / scale) + zero         # numpy rounds half to even, as QuantizeLinear does
    return (level >= low) & (level <= high)


@pytest.mark.parametrize("zero,dtype,bounds", [(128, np.uint8, (0, 255)), (0, np.int8, (-128, 127)),
                                                (0, np.uint8, (0, 255))], ids=["uint8", "int8", "relu-folded"])
def test_pair_passes_the_gradient_where_the_integer_is_representable(zero, dtype, bounds):
    """Identity inside the range, zero where the integer saturates (round(x/s) + z outside it), also
    just beyond the rounding boundary; with a zero point of 0 in uint8 that is the folded ReLU's mask."""
    nodes, inits = _qdq("x", "y", np.float32(0.1), dtype(zero))
    model = _model(nodes, [2, 8], inits)
    edges = np.array([(bounds[0] - zero - 0.4) * 0.1, (bounds[0] - zero - 0.6) * 0.1,
                      (bounds[1] - zero + 0.4) * 0.1, (bounds[1] - zero + 0.6) * 0.1])
    x = np.concatenate([edges, [-30.0, -0.01, 0.3, 40.0], np.linspace(-14, 14, 8)]).astype(np.float32).reshape(2, 8)
    g = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    expected = g * _representable(x, np.float32(0.1), zero, *bounds)
    assert 0 < _representable(x, np.float32(0.1), zero, *bounds).sum() < x.size
    np.testing.assert_allclose(_gradient(model, x, g), expected, rtol=1e-6, atol=0)


def test_per_channel_scales_and_zero_points():
    scale = np.array([0.05, 0.2, 1.0], np.float32)
    zero = np.array([-20, 0, 100], np.int8)
    nodes, inits = _qdq("x", "y", scale, zero, axis=1)
    model = _model(nodes, [2, 3, 4, 4], inits)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 3, 4, 4)) * 30).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    mask = _representable(x, scale.reshape(1, 3, 1, 1), zero.reshape(1, 3, 1, 1).astype(np.float32), -128, 127)
    assert 0 < mask.sum() < x.size
    np.testing.assert_allclose(_gradient(model, x, g), g * mask, rtol=1e-6, atol=0)


def test_reshapes_between_the_pair():
    nodes, inits = _qdq("x", "y", np.float32(0.5), np.uint8(10),
                        between=[("Flatten", {"axis": 1}), ("Transpose", {"perm": [1, 0]})])
    model = _model(nodes, [2, 2, 3], inits)
    x = np.linspace(-8, 8, 12, dtype=np.float32).reshape(2, 2, 3)
    g = np.random.default_rng(3).standard_normal((6, 2)).astype(np.float32)
    expected = g.T.reshape(2, 2, 3) * _representable(x, 0.5, 10, 0, 255)
    np.testing.assert_allclose(_gradient(model, x, g), expected, rtol=1e-6, atol=0)


def test_an_op_computing_on_the_integers_is_unimplemented_naming_it():
    nodes, inits = _qdq("x", "y", np.float32(0.5), np.uint8(10),
                        between=[("MaxPool", {"kernel_shape": [2, 2]})])
    model = _model(nodes, [1, 1, 4, 4], inits)
    with pytest.raises(Unimplemented, match="MaxPool node 'maxpool_q' computes on quantized integers"):
        build_gradient_model(model, ["y"], ["x"])


def _operator_form_model(weight_at_run_time: bool = False):
    """x -> QuantizeLinear -> QLinearConv (1x1) -> DequantizeLinear -> y: onnxruntime's QOperator form.
    `weight_at_run_time`: the int8 weight a graph input (a form the rewrite does not take)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="quantize"),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["yq"], name="qconv"),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dequantize")]
    inits = [_const("xs", np.float32(0.1)), _const("xz", np.uint8(128)), _const("ws", np.float32(0.05)),
             _const("wz", np.int8(0)), _const("ys", np.float32(0.02)), _const("yz", np.uint8(128)),
             _const("b", np.array([40], np.int32))]
    inputs = [helper.make_tensor_value_info("x", FLOAT, [1, 2, 3, 3])]
    if weight_at_run_time:
        inputs.append(helper.make_tensor_value_info("w", INT8, [1, 2, 1, 1]))
    else:
        inits.append(_const("w", np.array([[[[3]], [[-2]]]], np.int8)))
    graph = helper.make_graph(nodes, "operator_form", inputs, [helper.make_tensor_value_info("y", FLOAT, None)], inits)
    return prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8),
                         symbolic_batch=False)


def test_operator_form_is_differentiated_as_its_qdq_form():
    """QLinearConv = Q(Conv(DQ(x), (w - wz) ws, b xs ws), ys, yz): its gradient is that QDQ graph's, the
    input's and the output's saturation masks included (it was UNIMPLEMENTED, and before that
    INVALID_ARGUMENT 'does not influence')."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((1, 2, 3, 3)) * 12).astype(np.float32)
    got = _gradient(_operator_form_model(), x, np.ones((1, 1, 3, 3), np.float32))
    w = np.array([3, -2], np.float32) * np.float32(0.05)
    xq = np.clip(np.round(x / np.float32(0.1)) + 128, 0, 255)
    pre = np.einsum("c,nchw->nhw", w, (xq - 128) * np.float32(0.1))[:, None] + 40 * np.float32(0.1 * 0.05)
    out_mask = _representable(pre, np.float32(0.02), 128, 0, 255)
    expected = w[None, :, None, None] * out_mask * _representable(x, np.float32(0.1), 128, 0, 255)
    assert 0 < out_mask.sum() < out_mask.size
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_operator_form_outside_the_rewrite_is_unimplemented_naming_the_op():
    """A QLinearConv whose weight is computed at run time stays integer: UNIMPLEMENTED naming it, not
    INVALID_ARGUMENT 'input does not influence the objectives'."""
    with pytest.raises(Unimplemented, match="QLinearConv node 'qconv' computes on quantized integers"):
        build_gradient_model(_operator_form_model(weight_at_run_time=True), ["y"], ["x"])


def _qdq_conv_model() -> onnx.ModelProto:
    """QDQ form around a 1x1 Conv with int8 weights: x -> Q -> DQ -> Conv(DQ(w)) -> y."""
    nodes, inits = _qdq("x", "xd", np.float32(0.1), np.uint8(128))
    nodes += [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="weights"),
              helper.make_node("Conv", ["xd", "w"], ["y"], name="conv")]
    inits += [_const("wq", np.array([[[[3]], [[-2]]], [[[1]], [[5]]], [[[-4]], [[0]]]], np.int8)),
              _const("ws", np.float32(0.05)), _const("wz", np.int8(0))]
    graph = helper.make_graph(nodes, "qdq_conv", [helper.make_tensor_value_info("x", FLOAT, ["N", 2, 3, 3])],
                              [helper.make_tensor_value_info("y", FLOAT, ["N", 3, 3, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_qdq_model_through_the_service(client):
    """A QDQ model and operator-form ones uploaded: the gradient of the first is W-transposed times
    the cotangent, masked where the input saturates; an operator-form one gets its QDQ form's; one the
    rewrite does not take is UNIMPLEMENTED naming the op, and its forward still runs."""
    from vis_client import VisError

    model = client.load_model(_qdq_conv_model().SerializeToString())
    assert model.gradients_supported
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 2, 3, 3)) * 10).astype(np.float32)
    g = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    result = client.gradient(model, x, "y", cotangent=g)
    w = np.array([[3, -2], [1, 5], [-4, 0]], np.float32) * np.float32(0.05)
    expected = np.einsum("mc,nmhw->nchw", w, g) * _representable(x, np.float32(0.1), 128, 0, 255)
    np.testing.assert_allclose(result.gradient, expected, rtol=1e-5, atol=1e-6)

    operator_form = client.load_model(_operator_form_model().SerializeToString())
    assert operator_form.gradients_supported
    cot = np.ones((1, 1, 3, 3), np.float32)
    np.testing.assert_allclose(client.gradient(operator_form, x[:1], "y", cotangent=cot).gradient,
                               _gradient(_operator_form_model(), x[:1], cot), rtol=1e-6)
    run_time_weight = client.load_model(_operator_form_model(weight_at_run_time=True).SerializeToString())
    assert not run_time_weight.gradients_supported and "QLinearConv" in run_time_weight.gradients_unsupported_reason
    with pytest.raises(VisError) as e:
        client.gradient(run_time_weight, {"x": x[:1], "w": np.array([[[[3]], [[-2]]]], np.int8)}, "y", cotangent=cot)
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED and "qconv" in e.value.details
    assert client.activations(operator_form, x[:1], ["y"])["y"].shape == (1, 1, 3, 3)


def _folded_relu_model(explicit_relu: bool) -> onnx.ModelProto:
    """images -> Q/DQ (zero point 128: the data) -> Conv -> [Relu] -> Q/DQ (zero point 0: a folded
    ReLU without the Relu) -> Conv -> y."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="quantize_images"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("Conv", ["xd", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1")]
    if explicit_relu:
        nodes.append(helper.make_node("Relu", ["a"], ["r"], name="relu"))
    nodes += [helper.make_node("QuantizeLinear", ["r" if explicit_relu else "a", "as", "az"], ["aq"], name="quantize_relu"),
              helper.make_node("DequantizeLinear", ["aq", "as", "az"], ["ad"]),
              helper.make_node("Conv", ["ad", "w2"], ["y"], name="conv2")]
    inits = [_const("xs", np.float32(0.05)), _const("xz", np.uint8(128)), _const("as", np.float32(0.02)),
             _const("az", np.uint8(0)), _const("w1", rng.standard_normal((4, 2, 3, 3)).astype(np.float32)),
             _const("w2", rng.standard_normal((3, 4, 1, 1)).astype(np.float32))]
    graph = helper.make_graph(nodes, "folded", [helper.make_tensor_value_info("x", FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", FLOAT, None)], inits)
    return prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8),
                         symbolic_batch=False)


@pytest.mark.parametrize("rule_set", ["guided", "deconvnet"])
def test_guided_and_deconvnet_rectify_at_a_relu_the_quantizer_folded(rule_set):
    """onnxruntime's quantizer drops every ReLU into the next QuantizeLinear (zero point at qmin):
    guided backprop and deconvnet rectify there as at the ReLU the float model had (equal to the same
    graph with the Relu kept), not the plain gradient; the images' own QuantizeLinear rectifies nothing."""
    folded, kept = _folded_relu_model(False), _folded_relu_model(True)
    # images whose pre-activations avoid (-s/2, 0]: there round(a/s) = 0 is representable, so the
    # estimator passes what the ReLU's mask stops (the one place the folded form differs)
    forward = session(expose_tensors(folded, ["a"]))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x = rng.uniform(-2, 2, (1, 2, 5, 5)).astype(np.float32)
        a = forward.run(["a"], {"x": x})[0]
        if not np.any((a > -0.01) & (a <= 0)):
            break
    g = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)

    def run(model, rules):
        graph = build_gradient_model(model, ["y"], ["x"], rule_set=rules)
        return run_gradient(graph, {"x": x}, {"y": g})["x"]

    got = run(folded, rule_set)
    np.testing.assert_allclose(got, run(kept, rule_set), rtol=1e-6, atol=1e-7)
    assert np.abs(got - run(folded, "gradient")).max() > 0.1 * np.abs(got).max()
    assert got.min() < 0 < got.max()        # not rectified at the images


def test_contrib_domain_pairs_take_the_standard_rules(client):
    """com.microsoft QuantizeLinear / DequantizeLinear (quantize_static with UseQDQContribOps) gave
    'input does not influence the objectives': the same gradient as the standard pairs now."""
    standard = _qdq_conv_model()
    contrib = onnx.ModelProto()
    contrib.CopyFrom(standard)
    for node in contrib.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.domain = "com.microsoft"
    contrib.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    x = (np.random.default_rng(7).standard_normal((1, 2, 3, 3)) * 10).astype(np.float32)
    cot = np.random.default_rng(8).standard_normal((1, 3, 3, 3)).astype(np.float32)
    got = [client.gradient(client.load_model(m.SerializeToString()), x, "y", cotangent=cot).gradient
           for m in (contrib, standard)]
    np.testing.assert_array_equal(got[0], got[1])
    assert np.count_nonzero(got[0]) > 0


def _quantized_default_model(tmp_path, digit_images, form: str = "QDQ") -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    """(float model, onnxruntime's static quantization of it calibrated on the sample digits in `form`
    (QDQ or QOperator), images)."""
    from PIL import Image
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    source = DEFAULT_MODEL_DIR / "model.onnx"
    float_model = prepare_model(onnx.load(str(source)))
    image = float_model.graph.input[0].name
    images = np.stack([np.asarray(Image.open(p).convert("L").resize((32, 32)), np.float32)[None] / 255.0
                       for p in digit_images])

    class Samples(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{image: images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.feeds, None)

    quantized_path = tmp_path / f"digits_{form}.onnx"
    quantize_static(str(source), str(quantized_path), Samples(), quant_format=getattr(QuantFormat, form),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return float_model, onnx.load(str(quantized_path)), images


def test_quantized_default_model_through_the_service(client, tmp_path, digit_images):
    """CAM looks through the Q/DQ pair between the pooling and the linear head (it refused: 'not one
    linear layer'), and equals Grad-CAM's map as on the float model; guided backprop differs from the
    plain gradient (the quantizer folded every ReLU)."""
    _, quantized, images = _quantized_default_model(tmp_path, digit_images)
    model = client.load_model(quantized.SerializeToString())
    cam = client.grad_cam(model, images[:2], 3, method="cam")
    grad_cam = client.grad_cam(model, images[:2], 3, method="gradcam")
    assert cam.heatmap.shape == grad_cam.heatmap.shape and np.abs(cam.heatmap).max() > 0
    guided = client.guided_backprop(model, images[:2], 3).attribution
    plain = client.gradient(model, images[:2], 3).gradient
    assert np.abs(guided - plain).max() > 0.1 * np.abs(plain).max()


def test_statically_quantized_default_model_follows_the_float_gradient(tmp_path, digit_images):
    """onnxruntime's own static quantizer (QDQ, calibrated on the sample digits): the estimator's input
    gradient of the predicted class points where the float model's does (cosine > 0.8 on each image;
    measured 0.89-0.97; without the saturation mask, i.e. without the folded ReLUs, it fails)."""
    float_model, quantized, images = _quantized_default_model(tmp_path, digit_images)
    quantized = prepare_model(quantized)
    image = float_model.graph.input[0].name
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in quantized.graph.node}
    logits = float_model.graph.output[0].name
    cotangent = np.zeros((len(images), 10), np.float32)
    cotangent[np.arange(len(images)), np.arange(len(images)) % 10] = 1
    grads = [run_gradient(build_gradient_model(m, [logits], [image]), {image: images}, {logits: cotangent})[image]
             for m in (quantized, float_model)]
    assert len(images) >= 5
    for q, f in zip(*grads):
        cosine = float(q.ravel() @ f.ravel() / np.linalg.norm(q) / np.linalg.norm(f))
        assert cosine > 0.8, cosine


def test_operator_form_default_model_gets_its_qdq_twins_gradient(tmp_path, digit_images):
    """onnxruntime's quantizer in operator form (QLinearConv, QLinearAdd, QLinearConcat,
    QLinearGlobalAveragePool, QGemm, MaxPool on uint8) and in QDQ form, calibrated alike: the rewritten
    graph's forward gives onnxruntime's integer kernels' logits exactly, and its input gradients are
    the QDQ twin's."""
    from vis_service.runtime.type_probe import complete_types

    _, operator_form, images = _quantized_default_model(tmp_path, digit_images, "QOperator")
    _, qdq, _ = _quantized_default_model(tmp_path, digit_images, "QDQ")
    assert {"QLinearConv", "QLinearAdd", "QGemm"} <= {n.op_type for n in operator_form.graph.node}
    models = [complete_types(prepare_model(m)) for m in (operator_form, qdq)]
    image, logits = models[0].graph.input[0].name, models[0].graph.output[0].name
    cotangent = np.zeros((len(images), 10), np.float32)
    cotangent[np.arange(len(images)), np.arange(len(images)) % 10] = 1
    results = []
    for m in models:
        graph = build_gradient_model(m, [logits], [image])
        results.append(session(graph.model).run([graph.gradient_outputs[image], graph.forward_outputs[logits]],
                                                {image: images, graph.cotangent_inputs[logits]: cotangent}))
    integer_kernels = session(models[0]).run([logits], {image: images})[0]
    np.testing.assert_allclose(results[0][1], integer_kernels, rtol=0, atol=1e-6 * np.abs(integer_kernels).max())
    # where the QDQ twin's float forward meets the integer kernels too (on one image of ten a rounding
    # tie in its bias moves a value one step: measured cosine 0.9996 there), the gradients are the same
    agree = np.abs(results[1][1] - integer_kernels).max(axis=1) == 0
    assert agree.sum() >= len(images) - 2
    scale = np.abs(results[1][0]).max()
    np.testing.assert_allclose(results[0][0][agree], results[1][0][agree], rtol=0, atol=1e-5 * scale)
    for a, b in zip(results[0][0], results[1][0]):
        assert float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


_CONTRIB = "com.microsoft"
_S, _Z = np.float32(0.05), np.uint8(128)


def _single_operator_form_op(op: str):
    """x [1, 4, 6, 6] -> QuantizeLinear -> `op` in operator form -> DequantizeLinear -> y."""
    rng = np.random.default_rng(10)
    inits = [_const("s", _S), _const("z", _Z), _const("ys", np.float32(0.03)), _const("yz", np.uint8(100))]
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"])
    if op == "QLinearMatMul":
        inits += [_const("w", rng.integers(-20, 20, (6, 5)).astype(np.int8)), _const("ws", np.float32(0.02)),
                  _const("wz", np.int8(0))]
        node = helper.make_node(op, ["xq", "s", "z", "w", "ws", "wz", "ys", "yz"], ["yq"])
    elif op in ("QLinearAdd", "QLinearMul"):
        node = helper.make_node(op, ["xq", "s", "z", "xq", "s", "z", "ys", "yz"], ["yq"], domain=_CONTRIB)
    elif op == "QLinearConcat":
        node = helper.make_node(op, ["ys", "yz", "xq", "s", "z", "xq", "s", "z"], ["yq"], domain=_CONTRIB, axis=1)
    elif op == "QLinearAveragePool":
        node = helper.make_node(op, ["xq", "s", "z", "ys", "yz"], ["yq"], domain=_CONTRIB, kernel_shape=[2, 2],
                                strides=[2, 2])
    elif op == "QLinearLeakyRelu":
        node = helper.make_node(op, ["xq", "s", "z", "ys", "yz"], ["yq"], domain=_CONTRIB, alpha=0.1)
    else:   # QLinearSigmoid, QLinearGlobalAveragePool
        node = helper.make_node(op, ["xq", "s", "z", "ys", "yz"], ["yq"], domain=_CONTRIB)
    dq = helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])
    graph = helper.make_graph([q, node, dq], op, [helper.make_tensor_value_info("x", FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(_CONTRIB, 1)],
                              ir_version=8)
    from vis_service.runtime.type_probe import complete_types
    return complete_types(prepare_model(model, symbolic_batch=False))


def _against_the_integer_kernel(model, x: np.ndarray) -> np.ndarray:
    """The rewritten graph's y equals onnxruntime's integer kernel's to one output step (0.03); returns
    the input gradient of sum(y)."""
    graph = build_gradient_model(model, ["y"], ["x"])
    kernels = session(model).run(["y"], {"x": x})[0]
    ones = np.ones_like(kernels)
    y = session(graph.model).run([graph.forward_outputs["y"]], {"x": x, graph.cotangent_inputs["y"]: ones})[0]
    np.testing.assert_allclose(y, kernels, rtol=0, atol=0.03 + 1e-6)
    return run_gradient(graph, {"x": x}, {"y": ones})["x"]


@pytest.mark.parametrize("op", ["QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
                                "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu"])
def test_operator_form_ops_are_rewritten_faithfully(op):
    """Each operator-form op's rewrite computes what onnxruntime's integer kernel computes (to one
    quantization step, where the kernel rounds its own way: the Sigmoid's lookup table), and gets a
    gradient: the float op's, masked where an integer saturates."""
    model = _single_operator_form_op(op)
    x = (np.random.default_rng(11).standard_normal((1, 4, 6, 6)) * 2).astype(np.float32)
    g = _against_the_integer_kernel(model, x)
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_operator_form_add_of_a_constant_operand():
    """QLinearAdd(x, constant): the constant is dequantized by the scale the op names for it."""
    inits = [_const("s", _S), _const("z", _Z), _const("ys", np.float32(0.03)), _const("yz", np.uint8(100)),
             _const("c", np.random.default_rng(12).integers(0, 255, (1, 4, 6, 6)).astype(np.uint8)),
             _const("cs", np.float32(0.01)), _const("cz", np.uint8(120))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("QLinearAdd", ["xq", "s", "z", "c", "cs", "cz", "ys", "yz"], ["yq"], domain=_CONTRIB),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "add_constant", [helper.make_tensor_value_info("x", FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", FLOAT, None)], inits)
    from vis_service.runtime.type_probe import complete_types
    model = complete_types(prepare_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(_CONTRIB, 1)], ir_version=8),
        symbolic_batch=False))
    x = (np.random.default_rng(13).standard_normal((1, 4, 6, 6)) * 2).astype(np.float32)
    g = _against_the_integer_kernel(model, x)
    # the gradient passes (as 1) where both the input and the sum are representable
    constant = (numpy_helper.to_array(inits[4]).astype(np.float32) - 120) * np.float32(0.01)
    x_real = (np.clip(np.round(x / _S) + 128, 0, 255) - 128) * _S
    sum_level = np.round((x_real + constant) / np.float32(0.03)) + 100
    expected = _representable(x, _S, 128, 0, 255) & (sum_level >= 0) & (sum_level <= 255)
    assert 0 < expected.sum() < expected.size
    np.testing.assert_allclose(g, expected.astype(np.float32), rtol=1e-5, atol=1e-6)


def test_operator_form_model_through_the_service_cam_refuses_the_input_as_its_layer(client, tmp_path, digit_images):
    """An operator-form model has no float map between its input and its scores: Grad-CAM's default
    layer was the input itself (a 'CAM' of the pixels, status OK); refused now, naming `layer`. Its
    input-gradient methods run."""
    float_model, operator_form, images = _quantized_default_model(tmp_path, digit_images, "QOperator")
    model = client.load_model(operator_form.SerializeToString())
    assert model.gradients_supported
    # Inspect counts its integer weights (it counted none: 52 "parameters" for an 11.7 MB ResNet-18)
    float_count = client.inspect(client.load_model(float_model.SerializeToString())).parameter_count
    assert client.inspect(model).parameter_count >= float_count
    with pytest.raises(Exception) as e:
        client.grad_cam(model, images[:2], 3)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no 4-D float feature map" in e.value.details
    saliency = client.saliency(model, images[:2], 3)
    assert np.isfinite(saliency.attribution).all() and np.abs(saliency.attribution).max() > 0


def test_filters_of_integer_layers_are_their_dequantized_weights(client, tmp_path, digit_images):
    """`filters` on a QLinearConv / QGemm (onnxruntime's operator form) said the layer has no filters:
    they are (w - zero_point) * scale per output channel, the bias int32 * input scale * weight
    scale: the QDQ twin's folded weights, within half a quantization step of the float model's
    (its weights scaled per tensor)."""
    float_model, operator_form, _ = _quantized_default_model(tmp_path, digit_images, "QOperator")
    _, qdq, _ = _quantized_default_model(tmp_path, digit_images, "QDQ")
    models = [client.load_model(m.SerializeToString()) for m in (operator_form, qdq, float_model)]
    layers = []
    for m, kinds in zip((operator_form, qdq, float_model), (("QLinearConv", "QGemm"), ("Conv", "Gemm"), ("Conv", "Gemm"))):
        layers.append([n.output[0] for n in m.graph.node if n.op_type in kinds])
    assert len(layers[0]) == len(layers[1]) == len(layers[2]) >= 3
    for integer, qdq_layer, float_layer in zip(*layers):
        got = client.filters(models[0], integer)
        twin = client.filters(models[1], qdq_layer)
        ref = client.filters(models[2], float_layer)
        assert set(got) == set(twin) == {"weight", "bias"}
        for key in ("weight", "bias"):
            assert got[key].dtype == np.float32 and got[key].shape == ref[key].shape, (integer, key)
            np.testing.assert_allclose(got[key], twin[key], rtol=1e-6, atol=1e-7)
        step = np.abs(ref["weight"]).max() / 127  # the quantizer's per-tensor symmetric int8 scale
        assert np.abs(got["weight"] - ref["weight"]).max() <= 0.51 * step, integer


def test_integer_layer_weights_per_channel_and_orientation():
    """Per-channel scales and zero points go along each op's output-channel axis (QLinearConv's
    axis 0, QLinearMatMul's / MatMulInteger's columns, QGemm's rows with transB); the weights come
    out oriented as their float forms' (Conv as stored, matrices as (out, in))."""
    from vis_service.graph.constants import layer_weights

    r = np.random.default_rng(5)
    w4 = r.integers(-128, 128, (3, 2, 2, 2)).astype(np.int8)
    b2 = r.integers(0, 256, (4, 3)).astype(np.uint8)  # [K=4, N=3]
    scales, zps = np.array([0.1, 0.2, 0.4], np.float32), np.array([1, -2, 3], np.int8)
    uzps = np.array([100, 128, 7], np.uint8)
    bias = np.array([10, -20, 30], np.int32)
    inits = {"w4": w4, "w_scale": scales, "w_zp": zps, "bias": bias, "x_scale": np.float32(0.5),
             "x_zp": np.uint8(0), "y_scale": np.float32(1), "y_zp": np.uint8(0), "b2": b2, "b_scale": scales,
             "b_zp": uzps, "b2t": np.ascontiguousarray(b2.T), "w_zp0": np.int8(4)}
    nodes = [helper.make_node("QLinearConv", ["xq", "x_scale", "x_zp", "w4", "w_scale", "w_zp", "y_scale", "y_zp",
                                              "bias"], ["conv"], name="qconv"),
             helper.make_node("QLinearMatMul", ["aq", "x_scale", "x_zp", "b2", "b_scale", "b_zp", "y_scale", "y_zp"],
                              ["mm"], name="qmm"),
             helper.make_node("MatMulInteger", ["aq", "b2", "x_zp", "b_zp"], ["mmi"], name="mmi"),
             helper.make_node("ConvInteger", ["xq", "w4", "x_zp", "w_zp0"], ["convi"], name="convi"),
             helper.make_node("QGemm", ["aq", "x_scale", "x_zp", "b2t", "b_scale", "b_zp", "bias", "y_scale", "y_zp"],
                              ["gemm"], name="qgemm", domain=_CONTRIB, transB=1, alpha=2.0)]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, 2, 4, 4]),
                                           helper.make_tensor_value_info("aq", TensorProto.UINT8, [1, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
                               for o in ("conv", "mm", "mmi", "convi", "gemm")],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(_CONTRIB, 1)])
    conv = (w4.astype(np.float32) - zps[:, None, None, None]) * scales[:, None, None, None]
    matrix = ((b2.astype(np.float32) - uzps) * scales).T  # (out, in)
    expected = {"qconv": (conv, bias * 0.5 * scales), "qmm": (matrix, None),
                "mmi": ((b2.astype(np.float32) - uzps).T, None), "convi": (w4.astype(np.float32) - 4, None),
                "qgemm": (2 * matrix, 2 * bias * 0.5 * scales)}
    for layer, (weight, b) in expected.items():
        _, got_w, got_b = layer_weights(model, layer)
        np.testing.assert_allclose(got_w, weight, rtol=1e-6, err_msg=layer)
        assert (got_b is None) == (b is None), layer
        if b is not None:
            np.testing.assert_allclose(got_b, b, rtol=1e-6, err_msg=layer)
