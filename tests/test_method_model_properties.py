"""Models the server accepts whose properties the methods must meet or refuse clearly, through the
real server and the Python client: onnxruntime's run errors on the request's input, a fixed batch
other than 1, a second input without a batch dimension, a float16 image input, a weight named as a
layer, an image input without a batch dimension, a static input too large for any loop, a free image size.

Every refusal is INVALID_ARGUMENT naming the field (RESOURCE_EXHAUSTED for memory), never INTERNAL,
and the server goes on serving; where a method can run (a fixed batch, an unbatched input, float16)
its results equal those of a twin model without that property.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vis_client import Target
from vis_client.errors import InvalidArgument, ResourceExhausted
from vis_client.optimization import Objective

RNG = np.random.default_rng(0)
W1 = RNG.uniform(-1, 1, (4, 1, 3, 3)).astype(np.float32)
W2 = RNG.uniform(-1, 1, (6, 4, 3, 3)).astype(np.float32)
WFC = RNG.uniform(-1, 1, (3, 6)).astype(np.float32)
BFC = RNG.uniform(-0.1, 0.1, (3,)).astype(np.float32)


def _bytes(inputs, nodes, inits=(), outputs=("logits",)) -> bytes:
    g = helper.make_graph(nodes, "net", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                  for o in outputs], initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m.SerializeToString()


def classifier(batch=1, *, second: str = "", dtype=TensorProto.FLOAT, hw=(10, 10)) -> bytes:
    """x [batch, 1, H, W] -> conv1 -> relu1 -> pool -> conv2 -> relu2 (-> scaled) -> GAP -> Gemm.

    `second`: "input" multiplies relu2 by a second input k of static shape [1] (int64, no batch
    dimension); "constant" by the constant 3 (its twin at k = 3)."""
    inputs = [helper.make_tensor_value_info("x", dtype, [batch, 1, *hw])]
    nodes = []
    x = "x"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast"))
        x = "xf"
    nodes += [helper.make_node("Conv", [x, "w1"], ["conv1"], pads=[1, 1, 1, 1], name="conv1"),
              helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
              helper.make_node("MaxPool", ["relu1"], ["pool"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
              helper.make_node("Conv", ["pool", "w2"], ["conv2"], pads=[1, 1, 1, 1], name="conv2"),
              helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2")]
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2"),
             numpy_helper.from_array(WFC, "wfc"), numpy_helper.from_array(BFC, "bfc")]
    feature = "relu2"
    if second == "input":
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
        nodes += [helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT, name="cast_k"),
                  helper.make_node("Mul", ["relu2", "kf"], ["scaled"], name="scale")]
        feature = "scaled"
    elif second == "constant":
        inits.append(numpy_helper.from_array(np.array([3.0], np.float32), "kf"))
        nodes.append(helper.make_node("Mul", ["relu2", "kf"], ["scaled"], name="scale"))
        feature = "scaled"
    nodes += [helper.make_node("GlobalAveragePool", [feature], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], transB=1, name="fc")]
    return _bytes(inputs, nodes, inits)


def images(n, hw=(10, 10), seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, *hw)).astype(np.float32)


def _load(client, data, name, **kw):
    return client.load_model(data, name, config={"preset": "raw255"}, **kw)


def _still_serves(client, digits):
    assert client.activations(digits, np.zeros((1, 1, 32, 32), np.float32), ["logits"])["logits"].shape == (1, 10)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# onnxruntime's run errors


def test_an_input_smaller_than_a_kernel_is_invalid_argument_on_input(client, digits):
    """A dynamic-size input smaller than the first Conv's 3x3 kernel: refused before any run, shape
    inference at its size naming the tensor that would be empty. Where inference cannot see the size
    (a Resize by scales fed at run time), onnxruntime's shape error is the request's input not fitting
    the model: INVALID_ARGUMENT on `input` with onnxruntime's reason."""
    w = numpy_helper.from_array(W1, "w1")
    head = [helper.make_node("Conv", ["xs", "w1"], ["conv"], name="conv"),
            helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
            helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["logits"], name="flat")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])
    m = client.load_model(_bytes([x], [helper.make_node("Identity", ["x"], ["xs"], name="id")] + head, [w]),
                          "props_dynamic")
    small = np.ones((1, 1, 2, 2), np.float32)
    calls = [lambda: client.activations(m, small, ["logits"]),
             lambda: client.integrated_gradients(m, small, steps=2, baseline="zero"),
             lambda: client.smoothgrad(m, small, samples=2),
             lambda: client.grad_cam(m, small, method="scorecam")]
    for call in calls:
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.details == ("input: the input is too small for the model: with 'x' of shape ['N', 1, 2, 2], "
                                   "tensor 'conv' would have shape ['N', 4, 0, 0]; send larger images"), e.value.details
    assert client.activations(m, np.ones((1, 1, 5, 5), np.float32), ["logits"])["logits"].shape == (1, 4)
    scales = helper.make_tensor_value_info("k", TensorProto.FLOAT, [4])
    resized = _bytes([x, scales], [helper.make_node("Resize", ["x", "", "k"], ["xs"], name="resize")] + head, [w])
    m = client.load_model(resized, "props_dynamic_resized")
    with pytest.raises(InvalidArgument) as e:
        client.activations(m, {"x": np.ones((1, 1, 8, 8), np.float32), "k": np.array([1, 1, .25, .25], np.float32)},
                           ["logits"])
    assert e.value.details.startswith("input: the input is too small for the model"), e.value.details
    assert "Invalid input shape: {2,2}" in e.value.details
    _still_serves(client, digits)


def test_an_input_shape_a_reshape_does_not_take_is_invalid_argument_on_input(client, digits):
    """onnxruntime reports a Reshape's shape error as FAIL (ORT_ENFORCE): still the request's input."""
    shape = numpy_helper.from_array(np.array([-1, 64], np.int64), "shape")
    data = _bytes([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
                  [helper.make_node("Reshape", ["x", "shape"], ["logits"], name="reshape")], [shape])
    m = client.load_model(data, "props_reshape")
    with pytest.raises(InvalidArgument) as e:
        client.activations(m, np.ones((1, 1, 3, 3), np.float32), ["logits"])
    assert e.value.details.startswith("input: the model cannot run on an input of this shape"), e.value.details
    assert "cannot be reshaped to the requested shape" in e.value.details and ".h:" not in e.value.details
    assert client.activations(m, np.ones((1, 1, 8, 8), np.float32), ["logits"])["logits"].shape == (1, 64)
    _still_serves(client, digits)


def test_a_failed_allocation_is_resource_exhausted(client, digits):
    """A graph that asks for 4 PB (ConstantOfShape): onnxruntime's arena fails at once."""
    shape = numpy_helper.from_array(np.array([100000, 100000, 100000], np.int64), "shape")
    data = _bytes([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                  [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="big"),
                   helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0, name="sum"),
                   helper.make_node("Add", ["x", "total"], ["logits"], name="add")], [shape])
    m = client.load_model(data, "props_alloc")
    with pytest.raises(ResourceExhausted) as e:
        client.activations(m, np.ones((1, 1, 8, 8), np.float32), ["logits"])
    assert e.value.details.startswith("input: onnxruntime could not allocate the memory this run needs")
    assert "4000000000000000" in e.value.details
    _still_serves(client, digits)


def test_results_over_a_quarter_of_memory_are_refused_before_running(client, digits):
    """Activations holds every requested tensor until streamed: a static [N, C, 512, 512] layer
    (over 1/16 of the machine's memory per image) for 8 images is refused before any run, naming
    `layers`."""
    from vis_service.methods.limits import physical_memory_bytes

    side = 512
    channels = max(1, physical_memory_bytes() // 4 // (side * side * 4) // 4 + 1)   # > 1/16 of memory per image
    shape = numpy_helper.from_array(np.array([1, channels, side, side], np.int64), "shape")
    data = _bytes([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                  [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=1, name="mean"),
                   helper.make_node("Expand", ["m", "shape"], ["big"], name="big"),
                   helper.make_node("ReduceMean", ["big"], ["logits"], axes=[2, 3], keepdims=0, name="logits")],
                  [shape])
    m = client.load_model(data, "props_result_size")
    with pytest.raises(ResourceExhausted) as e:
        client.activations(m, np.ones((8, 1, 8, 8), np.float32), ["big"])
    assert e.value.details.startswith("layers: the 1 requested tensors take") and "for 8 images" in e.value.details
    _still_serves(client, digits)


# ----------------------------------------------------------------------------
# a fixed batch other than 1


def test_a_fixed_batch_of_4_runs_in_batches_of_4(client, digits):
    """Every method that stacks copies runs them 4 at a time, padding the last run: the results
    equal the free-batch twin's (IG's summed gradients included: padded rows add nothing)."""
    fixed, free = _load(client, classifier(4), "props_batch4"), _load(client, classifier("N"), "props_batch_free")
    x = images(4)
    for kw in (dict(steps=7, baseline="zero"), dict(steps=3, baseline="black", rule="riemann_trapezoid")):
        a, b = (client.integrated_gradients(m, x, **kw) for m in (fixed, free))
        _close(a.attribution, b.attribution)
        _close(a.extra["delta"], b.extra["delta"])
    for kw in (dict(samples=6), dict(samples=5, vargrad=True)):
        a, b = (client.smoothgrad(m, x, seed=3, **kw) for m in (fixed, free))
        _close(a.attribution, b.attribution)
    a, b = (client.occlusion(m, x, patch=4, stride=2, fill="zero", batch=5) for m in (fixed, free))
    _close(a.probability, b.probability)
    _close(a.feature, b.feature)
    for method in ("scorecam", "ablationcam"):
        a, b = (client.grad_cam(m, x, method=method, batch=3) for m in (fixed, free))
        _close(a.weights, b.weights)
    a, b = (client.deconvnet(m, x, "relu2", top_k=3) for m in (fixed, free))
    _close(a.projections, b.projections)
    with pytest.raises(InvalidArgument) as e:
        client.invert(fixed, x, ["relu2"], steps=2)
    assert e.value.details.startswith("input: ") and "exactly 4 images (the model's fixed batch)" in e.value.details
    _still_serves(client, digits)


# ----------------------------------------------------------------------------
# a second input without a batch dimension


def test_a_second_input_without_a_batch_dimension_is_fed_unchanged(client, digits):
    """k [1] scales the features: every run gets it as sent, whatever its rows (copied per row, it
    was a [rows] tensor the model does not take); the twin multiplies by the constant 3."""
    with_k, twin = _load(client, classifier(second="input"), "props_k"), _load(client, classifier(second="constant"),
                                                                                 "props_k_twin")
    x = images(2)   # two images and a k of [1]: k is not part of the batch
    feeds = {"x": x, "k": np.array([3], np.int64)}
    a, b = client.integrated_gradients(with_k, feeds, steps=5, baseline="zero"), \
        client.integrated_gradients(twin, x, steps=5, baseline="zero")
    _close(a.attribution, b.attribution)
    a, b = client.smoothgrad(with_k, feeds, samples=3, vargrad=True), \
        client.smoothgrad(twin, x, samples=3, vargrad=True)
    _close(a.attribution, b.attribution)
    a, b = (client.occlusion(with_k, feeds, patch=4, stride=3, fill="zero"),
            client.occlusion(twin, x, patch=4, stride=3, fill="zero"))
    _close(a.probability, b.probability)
    # relu2 lies before the scaling: Ablation-CAM's replay from it reads k again
    for kw in (dict(method="scorecam"), dict(method="ablationcam", layer="relu2")):
        a, b = client.grad_cam(with_k, feeds, **kw), client.grad_cam(twin, x, **kw)
        _close(a.weights, b.weights)
    a, b = client.deconvnet(with_k, feeds, "scaled", top_k=2), client.deconvnet(twin, x, "scaled", top_k=2)
    _close(a.projections, b.projections)
    _still_serves(client, digits)


def test_maximize_and_invert_refuse_a_model_with_a_second_input(client, digits):
    """The loops feed the image input alone: INVALID_ARGUMENT naming the input they cannot feed."""
    m = _load(client, classifier(second="input"), "props_k_opt")
    with pytest.raises(InvalidArgument) as e:
        client.maximize(m, [Objective.class_score(0)], steps=1)
    assert e.value.details.startswith("model: model input 'k' would get no value"), e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.invert(m, {"x": images(1), "k": np.array([3], np.int64)}, ["relu2"], steps=1)
    assert e.value.details.startswith("input.tensors[k]: model input 'k' would get no value"), e.value.details
    _still_serves(client, digits)


def test_maximize_and_invert_refuse_an_integer_image_input(client, digits):
    """The loops move the image by gradient steps: a uint8 input is refused naming the request's
    field, not the gradient engine's `wrt` (a field these requests do not have)."""
    m = _load(client, classifier(dtype=TensorProto.UINT8), "props_uint8")
    with pytest.raises(InvalidArgument) as e:
        client.maximize(m, [Objective.class_score(0)], steps=1)
    assert e.value.details.startswith("model: input 'x' is uint8"), e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.invert(m, np.ones((1, 1, 10, 10), np.uint8), ["relu2"], steps=1)
    assert e.value.details.startswith("input: input 'x' is uint8"), e.value.details
    _still_serves(client, digits)


# ----------------------------------------------------------------------------
# float16 image input


def test_maximize_and_invert_cast_to_a_float16_input(client):
    """The loops compute in float32 and feed the model's float16: the objective and the features
    come out as the float32 twin's, to float16's precision."""
    half, single = _load(client, classifier(dtype=TensorProto.FLOAT16), "props_fp16"), \
        _load(client, classifier(), "props_fp32")
    kw = dict(steps=3, parameterization="raw", jitter=0, scale=0, rotate=0)
    a, b = (client.maximize(m, [Objective.channel("relu2", 2)], **kw) for m in (half, single))
    assert np.isfinite(a.x).all() and a.x.shape == (1, 1, 10, 10)
    np.testing.assert_allclose(a.objective, b.objective, rtol=2e-2, atol=1e-3)
    x = images(1)
    a = client.invert(half, x.astype(np.float16), ["relu2"], steps=3)["relu2"]
    b = client.invert(single, x.astype(np.float16).astype(np.float32), ["relu2"], steps=3)["relu2"]
    assert a.x.shape == b.x.shape == (1, 1, 10, 10)
    np.testing.assert_allclose(a.feature_error, b.feature_error, rtol=2e-2, atol=1e-3)


# ----------------------------------------------------------------------------
# a weight named as a layer


def test_a_weight_as_diversity_layer_or_occlusion_layer_is_invalid_argument(client, digits):
    """w2 is a 4-D weight [6, 4, 3, 3]: like Cam and Deconvnet, the fields that take a feature map
    refuse it by name."""
    m = _load(client, classifier(), "props_weights")
    with pytest.raises(InvalidArgument) as e:
        client.maximize(m, [Objective.class_score(1)], steps=1, batch=2, diversity=1.0, diversity_layer="w2")
    assert e.value.details.startswith("diversity_layer: 'w2' is a weight (initializer)"), e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.occlusion(m, images(1), patch=4, fill="zero", layer="w2")
    assert e.value.details.startswith("layer: 'w2' is a weight (initializer)"), e.value.details
    assert client.occlusion(m, images(1), patch=4, fill="zero", layer="relu2").feature.shape == (1, 4, 4)
    _still_serves(client, digits)


# ----------------------------------------------------------------------------
# degenerate image inputs


def test_a_1d_image_input_is_invalid_argument_for_attributions(client, digits):
    w = numpy_helper.from_array(RNG.uniform(-1, 1, (8, 3)).astype(np.float32), "w")
    data = _bytes([helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
                  [helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")], [w])
    m = client.load_model(data, "props_1d")
    x = np.ones(8, np.float32)
    for call in (lambda: client.integrated_gradients(m, x, steps=2, baseline="zero"),
                 lambda: client.smoothgrad(m, x, samples=2),
                 lambda: client.integrated_gradients(m, x, 1, steps=2, baseline="zero")):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.details.startswith("input: input 'x' has shape [8], without a batch dimension"), \
            e.value.details
    _still_serves(client, digits)


def test_maximize_on_a_huge_static_input_is_resource_exhausted_before_allocating(client, digits):
    data = _bytes([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 100000, 100000])],
                  [helper.make_node("Relu", ["x"], ["logits"], name="relu")])
    m = client.load_model(data, "props_huge")
    with pytest.raises(ResourceExhausted) as e:
        client.maximize(m, [Objective.channel("logits", 0)], steps=1)
    assert e.value.details.startswith("batch: 1 images of 3x100000x100000 need about"), e.value.details
    assert "physical memory" in e.value.details
    _still_serves(client, digits)


def test_a_batch_of_one_that_stays_fixed_runs_one_row_at_a_time(client, digits):
    """A batch-1 export whose batch prepare_model cannot free (a constant [1, ...] map concatenated):
    IG and SmoothGrad run their rows one per run and agree with per-row gradients; two images
    are refused as a shape the model does not take."""
    from test_graph_exports import _concat_constant_map, _model

    nodes, inits = _concat_constant_map()
    m = client.load_model(_model(nodes, inits, [1, 3, 4, 4], opset=13).SerializeToString(), "props_fixed_one")
    x = np.random.default_rng(4).uniform(0, 1, (1, 3, 4, 4)).astype(np.float32)
    ig = client.integrated_gradients(m, x, Target.output(0), steps=4, baseline="zero", rule="riemann_middle")
    path = [client.gradient(m, x * a, Target.output(0)).gradient for a in (0.125, 0.375, 0.625, 0.875)]
    _close(ig.attribution, x * np.mean(path, axis=0))
    sg = client.smoothgrad(m, x, Target.output(0), samples=3, noise=0.0)
    _close(sg.attribution, client.gradient(m, x, Target.output(0)).gradient)
    with pytest.raises(InvalidArgument) as e:
        client.saliency(m, np.concatenate([x, x]))
    assert "shape [2, 3, 4, 4] not allowed; the model takes [1, 3, 4, 4]" in e.value.details
    _still_serves(client, digits)


def test_input_channels_a_conv_does_not_take_are_invalid_argument(client, digits):
    """A Conv whose channel dimension is dynamic but whose weights take 3: two channels fail inside
    onnxruntime ('Input channels C is not equal to kernel channels * group'), answered on input."""
    w = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    m = client.load_model(model.SerializeToString())
    with pytest.raises(InvalidArgument) as e:
        client.activations(m, np.ones((1, 2, 8, 8), np.float32), ["y"])
    assert e.value.details.startswith("input: the input's channels are not what the model's layers take"), \
        e.value.details
    _still_serves(client, digits)


def convnext_like() -> bytes:
    """x [N, 3, 16, 16] -> 4x4/4 stem conv ("stem", [N, 8, 4, 4]) -> a ConvNeXt block: Transpose to
    channels-last ("nhwc"), LayerNormalization over channels ("ln"), MatMul 8 -> 16 ("fc1"), Relu,
    MatMul 16 -> 8 ("fc2"), Transpose back ("back") + stem ("block") -> GAP -> Gemm."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 4, 4)).astype(np.float32), "w_stem"),
             numpy_helper.from_array(np.ones(8, np.float32), "ln_scale"),
             numpy_helper.from_array(np.zeros(8, np.float32), "ln_bias"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "w_fc1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "w_fc2"),
             numpy_helper.from_array(rng.normal(0, 0.5, (3, 8)).astype(np.float32), "w_head")]
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["stem"], strides=[4, 4], name="stem"),
             helper.make_node("Transpose", ["stem"], ["nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
             helper.make_node("LayerNormalization", ["nhwc", "ln_scale", "ln_bias"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "w_fc1"], ["fc1"], name="fc1"),
             helper.make_node("Relu", ["fc1"], ["act"], name="act"),
             helper.make_node("MatMul", ["act", "w_fc2"], ["fc2"], name="fc2"),
             helper.make_node("Transpose", ["fc2"], ["back"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Add", ["back", "stem"], ["block"], name="residual"),
             helper.make_node("GlobalAveragePool", ["block"], ["pooled"], name="gap"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w_head"], ["logits"], transB=1, name="head")]
    g = helper.make_graph(nodes, "convnext_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def test_channels_last_layers_are_refused_where_a_channel_is_picked(client, digits):
    """ConvNeXt's blocks run channels-last [N, H, W, C] between two Transposes: a channel target, a
    CAM, deconvnet, occlusion or maximize layer there read axis 1 (rows) as channels, with finite,
    meaningless results. They are refused naming a channels-first tensor nearby; the receptive
    fields pass the block's LayerNormalization and MatMuls (they were unknown after them)."""
    model = _load(client, convnext_like(), "convnext_like")
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 16, 16)).astype(np.float32)
    rfs = {n.name: n for n in model.inspect().nodes}
    assert rfs["fc2"].receptive_fields["fc2"].size == (4, 4) and rfs["residual"].receptive_fields["block"].size == (4, 4)
    for layer in ("nhwc", "ln", "fc1", "act", "fc2"):
        for call, field in [(lambda: client.gradient(model, x, Target.channel(layer, 5)), "target.channel.layer"),
                            (lambda: client.gradient(model, x, Target.neuron(layer, 1, 0, 0)), "target.neuron.layer"),
                            (lambda: client.grad_cam(model, x, layer=layer), "layer"),
                            (lambda: client.deconvnet(model, x, layer), "layer"),
                            (lambda: client.occlusion(model, x, patch=8, stride=8, layer=layer), "layer"),
                            (lambda: client.maximize(model, [Objective.channel(layer, 1)], steps=2), "objectives[0].channel.layer")]:
            with pytest.raises(InvalidArgument) as e:
                call()
            assert e.value.details.startswith(f"{field}: {layer!r} is channels-last [N, H, W, C]"), e.value.details
            assert "e.g. 'stem'" in e.value.details or "e.g. 'back'" in e.value.details, e.value.details
    # the channels-first tensors work, and the default CAM layer is one
    assert client.gradient(model, x, Target.channel("back", 5)).gradient.shape == x.shape
    assert client.grad_cam(model, x).layer == "block"
    _still_serves(client, digits)


def test_activations_name_the_layout_the_server_traced(client, digits):
    """Activations say which results are [N, H, W, C] (the ConvNeXt block's, traced through its
    Transposes, LayerNormalization and MatMuls) and which [N, C, H, W]: a client reading axis 1 as
    channels drew the block's maps as 4 rows of 4 x 16. Vectors and untraced tensors get none."""
    model = _load(client, convnext_like(), "convnext_layouts")
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 16, 16)).astype(np.float32)
    res = client.activations_result(model, x, ["stem", "to_nhwc", "fc1", "back", "logits"])
    assert res.layouts == {"stem": "NCHW", "to_nhwc": "NHWC", "fc1": "NHWC", "back": "NCHW"}
    assert res.tensors["fc1"].shape == (2, 4, 4, 16) and res.tensors["back"].shape == (2, 8, 4, 4)
    _still_serves(client, digits)


def test_a_free_size_model_refuses_images_whose_activations_exceed_memory(client, digits):
    """A model whose height and width are symbolic takes any image size the request asks for:
    a 100-byte PNG with preprocess size 4096 x 4096 meant ~270 GB of activations for this net
    (8 GB for a small ResNet at 8192); refused before any run, naming the input."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (2048, 1, 3, 3)).astype(np.float32), "w_wide"),
             numpy_helper.from_array(rng.normal(0, 0.1, (3, 2048)).astype(np.float32), "w_fc")]
    data = _bytes([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
                  [helper.make_node("Conv", ["x", "w_wide"], ["wide"], pads=[1, 1, 1, 1], name="wide"),
                   helper.make_node("Relu", ["wide"], ["act"], name="act"),
                   helper.make_node("GlobalAveragePool", ["act"], ["pooled"], name="gap"),
                   helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
                   helper.make_node("Gemm", ["flat", "w_fc"], ["logits"], transB=1, name="fc")], inits)
    m = _load(client, data, "props_free_size")
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    with pytest.raises(ResourceExhausted) as e:
        client.activations(m, [buf.getvalue()], ["act"], preprocess={"preset": "raw255", "size": [4096, 4096]})
    assert e.value.details.startswith("input: an image of 4096 x 4096 takes an estimated"), e.value.details
    # a run may take half of the memory (two go at once, beside the cached sessions), measured 1.25x
    # the estimate (~16 KiB per pixel here): a size the whole memory allowed (a SqueezeNet at 5600 x
    # 5600 was killed by the kernel) is refused
    from vis_service.methods.limits import physical_memory_bytes

    side = int((0.75 * physical_memory_bytes() / (1.25 * 2 * 2048 * 4)) ** 0.5)
    with pytest.raises(ResourceExhausted) as e:
        client.activations(m, [buf.getvalue()], ["act"], preprocess={"preset": "raw255", "size": [side, side]})
    assert e.value.details.startswith(f"input: an image of {side} x {side} takes an estimated"), e.value.details
    small = client.activations(m, [buf.getvalue()], ["act"], preprocess={"preset": "raw255", "size": [48, 40]})
    assert small["act"].shape == (1, 2048, 48, 40)
    # activation maximization makes its images itself, past the servicer's input checks: at such a
    # size it took the server to all of its memory
    with pytest.raises(ResourceExhausted) as e:
        client.maximize(m, [Objective.class_score(0)], steps=1, batch=2,
                        preprocess={"preset": "raw255", "size": [side, side]})
    assert e.value.details.startswith(f"preprocess.size: 2 images of {side} x {side} take an estimated"), e.value.details
    _still_serves(client, digits)


def test_a_free_size_model_batches_rows_by_its_activations_at_the_images_size(repository):
    """SmoothGrad, IG and deconvnet put as many rows in a run as the memory budget holds, counted
    from the model's activations per image: for a free-size model at the images' size (it counted
    64x the image, 1/64 of this net's: a deconvnet at 1024 x 1024 peaked at 3.6x the estimate)."""
    from vis_service.methods.attribution_common import per_sample_bytes
    from vis_service.models.store import ModelStore
    from vis_service.runtime.sessions import Runtime

    store = ModelStore(Runtime(provider="cpu"), repository)
    free = store.upload(classifier(hw=("H", "W")), "props_rows_free")
    fixed = store.upload(classifier(hw=(64, 48)), "props_rows_fixed")
    x = images(1, (64, 48))
    exact, estimated = per_sample_bytes(fixed, x), per_sample_bytes(free, x)
    assert exact / 2 <= estimated <= exact * 2, (estimated, exact)


def test_a_free_size_model_gets_gradients_at_each_image_size(client, digits):
    """A model exported with a free height and width (SqueezeNet-style: convolutions, then global
    pooling) gets gradients at whatever size its images have: the backward graph is built for that
    size (its rules need static window sizes; this was UNIMPLEMENTED at GlobalAveragePool), once per
    size, and every gradient method (and occlusion's grey fill, which read the config only with a
    size) equals that of a twin whose input has the size fixed."""
    # black is (0 - 100) / 50 in model space: IG's black baseline and the grey fill read the config
    config = {"input": {"color": "GRAY", "value_range": [0, 255], "mean": [100], "std": [50]}}
    free = client.load_model(classifier(hw=("H", "W")), "props_free_hw_normalized", config=config)
    assert free.gradients_supported, free
    for hw in ((10, 10), (13, 7)):
        twin = client.load_model(classifier(hw=hw), f"props_fixed_{hw[0]}x{hw[1]}_normalized", config=config)
        x = images(2, hw, seed=hw[1])
        a, b = (client.gradient(m, x, Target.output(1)) for m in (free, twin))
        assert a.gradient.shape == (2, 1, *hw)
        _close(a.gradient, b.gradient)
        _close(a.objective, b.objective)
        for baseline in ("zero", "black"):   # black was zeros on the free-size model
            a, b = (client.integrated_gradients(m, x, steps=4, baseline=baseline) for m in (free, twin))
            _close(a.attribution, b.attribution)
            _close(a.extra["delta"], b.extra["delta"])
        a, b = (client.grad_cam(m, x, layer="relu2") for m in (free, twin))
        _close(a.cam, b.cam)
        a, b = (client.guided_backprop(m, x) for m in (free, twin))
        _close(a.attribution, b.attribution)
        a, b = (client.deconvnet(m, x, "relu2", top_k=2) for m in (free, twin))
        _close(a.projections, b.projections)
        # the grey fill reads the config's value range, mean and std: they resolved only with a size
        a, b = (client.occlusion(m, x, patch=4, stride=3) for m in (free, twin))
        _close(a.probability, b.probability)
    built = client.server_info()["sessions_built"]
    client.gradient(free, images(3, (13, 7)), Target.output(1))
    assert client.server_info()["sessions_built"] == built, "a size seen before reuses its gradient session"
    for call in (lambda x: client.gradient(free, x), lambda x: client.activations(free, x, ["relu2"])):
        with pytest.raises(InvalidArgument) as e:   # was INTERNAL (a division by the window's size 0)
            call(np.ones((1, 1, 0, 4), np.float32))
        assert e.value.details == ("input.tensors[x]: shape [1, 1, 0, 4] is empty along axis 2, which the model "
                                   "leaves free; send at least one element there"), e.value.details
    _still_serves(client, digits)


def test_a_free_size_model_runs_the_optimization_loops_at_the_requested_size(client, digits):
    """Maximize and invert optimize images of the size the request's preprocessing gives: on a
    free-size model their gradient graph is built for it, and the results equal a fixed-size twin's."""
    free, twin = _load(client, classifier(hw=("H", "W")), "props_free_hw"), \
        _load(client, classifier(hw=(12, 9)), "props_fixed_12x9")
    pre = {"preset": "raw255", "size": [12, 9]}
    a, b = (client.maximize(m, [Objective.channel("relu2", 2)], steps=4, seed=1, preprocess=pre) for m in (free, twin))
    assert a.x.shape == (1, 1, 12, 9)
    _close(a.x, b.x)
    _close(a.losses["loss"], b.losses["loss"])
    reference = images(1, (12, 9), seed=4)
    for given in (pre, None):   # a reference tensor gives the size (a preprocess size was required)
        a, b = (client.invert(m, reference, ["relu1"], steps=3, seed=2, preprocess=given) for m in (free, twin))
        _close(a["relu1"].x, b["relu1"].x)
        _close(a["relu1"].feature_error, b["relu1"].feature_error)
    _still_serves(client, digits)


def _same_padded(hw) -> bytes:
    """tf2onnx-style: x -> Conv 3x3/2 auto_pad SAME_UPPER -> Relu -> Conv 3x3 SAME_UPPER -> Relu -> GAP
    -> Gemm; where the sizes are free, how a SAME pad splits (and so every receptive field) is not known."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["conv1"], strides=[2, 2], auto_pad="SAME_UPPER", name="conv1"),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("Conv", ["relu1", "w2"], ["conv2"], auto_pad="SAME_UPPER", name="conv2"),
             helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["relu2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], transB=1, name="fc")]
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2"),
             numpy_helper.from_array(WFC, "wfc"), numpy_helper.from_array(BFC, "bfc")]
    return _bytes([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, *hw])], nodes, inits)


def test_a_free_size_model_with_same_pads_gets_deconvnet_boxes_at_the_images_size(client, digits):
    """Deconvnet's boxes and crops come from receptive fields, which a SAME pad makes depend on the
    size: on a free-size model they are taken at the images' size (they were unknown: whole-image
    boxes and uncut crops), equal to a fixed-size twin's."""
    free = _load(client, _same_padded(("H", "W")), "props_same_free")
    for hw in ((13, 10), (16, 11)):
        twin = _load(client, _same_padded(hw), f"props_same_{hw[0]}x{hw[1]}")
        x = images(2, hw, seed=hw[0])
        a, b = (client.deconvnet(m, x, "relu2", top_k=3, crop=True) for m in (free, twin))
        assert "boxes" not in a.text, a.text
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert (a.boxes[..., 2:] - a.boxes[..., :2]).max() < max(hw), a.boxes   # not the whole image
        _close(a.crops, b.crops)
    _still_serves(client, digits)


def test_inspect_gives_a_free_size_model_receptive_fields_at_its_configured_size(client, digits):
    """Inspect showed no receptive fields for a free-size model whose pads are SAME (every tf2onnx Keras
    export): they are given at the configured size (else 224), which the response names, equal to a
    fixed-size twin's; a fixed-size model names none."""
    free = client.load_model(_same_padded(("H", "W")), "props_inspect_free", config={"input": {"size": [16, 11]}})
    twin = _load(client, _same_padded((16, 11)), "props_inspect_16x11")
    a, b = client.inspect(free), client.inspect(twin)
    assert a.receptive_fields_at == (16, 11) and b.receptive_fields_at == ()
    assert "receptive fields at an image size of 16 x 11" in a.summary()
    for tensor in ("relu1", "relu2"):
        rf_free, rf_twin = a.node(tensor).receptive_fields[tensor], b.node(tensor).receptive_fields[tensor]
        assert rf_free == rf_twin and rf_free.size[0] > 1, (rf_free, rf_twin)
    unconfigured = client.inspect(_load(client, _same_padded(("H", "W")), "props_inspect_free_224"))
    assert unconfigured.receptive_fields_at == (224, 224) and unconfigured.node("relu2").receptive_fields


def _nhwc_with_an_untraced_map() -> bytes:
    """tf2onnx-style NHWC net: x [N, 8, 8, 3] -> Transpose -> Conv -> Relu -> Transpose (NHWC "feat")
    -> Reshape [N, 64, 4] -> Sigmoid -> Reshape back to [N, 8, 8, 4] ("untraced": no axis trace goes
    through the reshapes, as after a Keras LayerNormalization) -> ReduceMean over 1, 2 -> Gemm."""
    rng = np.random.default_rng(30)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 64, 4], np.int64), "rows"),
             numpy_helper.from_array(np.array([0, 8, 8, 4], np.int64), "back"),
             numpy_helper.from_array(rng.normal(0, 1, (3, 4)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xc", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["feat"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["feat", "rows"], ["flat"]),
             helper.make_node("Sigmoid", ["flat"], ["s"]),
             helper.make_node("Reshape", ["s", "back"], ["untraced"]),
             helper.make_node("ReduceMean", ["untraced"], ["pooled"], axes=[1, 2], keepdims=0),
             helper.make_node("Gemm", ["pooled", "fc"], ["logits"], transB=1)]
    return _bytes([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3])], nodes, inits)


def test_an_untraced_map_of_a_channels_last_model_is_not_read_as_channels_first(client, digits):
    """In a channels-last model a tensor whose axes the trace lost (reshapes) is [N, H, W, C] like the
    rest: channel targets, directions and deconvnet read its rows as channels without an error. Refused
    now, naming the nearest traced map."""
    m = client.load_model(_nhwc_with_an_untraced_map(), "props_nhwc_untraced", config={"preset": "raw255"})
    x = images(2, (8, 8), seed=3).transpose(0, 2, 3, 1).repeat(3, axis=3)
    for call in (lambda: client.gradient(m, x, Target.channel("untraced", 1)),
                 lambda: client.maximize(m, [Objective.channel("untraced", 1)], steps=1),
                 lambda: client.maximize(m, [Objective.channel("r", 1)], steps=1, batch=2, diversity=1.0,
                                         diversity_layer="untraced"),
                 lambda: client.deconvnet(m, x, "untraced")):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert "could not be traced to [N, C, H, W]" in e.value.details and "e.g. 'r'" in e.value.details, e.value.details
    assert client.gradient(m, x, Target.channel("r", 1)).gradient.shape == x.shape
    _still_serves(client, digits)


def test_a_class_probability_named_by_its_softmax_node(client, digits):
    """Objective.class_score(probability=True) with the Softmax's node name (not its output tensor's)
    was INVALID_ARGUMENT about an internal tensor of unknown type."""
    proto = onnx.load_from_string(classifier(second=""))
    proto.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax_node", axis=1))
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, None))
    m = client.load_model(proto.SerializeToString(), "props_softmax_node", config={"preset": "raw255"})
    by_node = client.maximize(m, [Objective.class_score(1, True, output="softmax_node")], steps=1, seed=1)
    by_tensor = client.maximize(m, [Objective.class_score(1, True, output="probs")], steps=1, seed=1)
    np.testing.assert_allclose(by_node.terms, by_tensor.terms, rtol=1e-6)
    _still_serves(client, digits)


def test_an_integer_layer_is_refused_naming_the_field(client, digits):
    """Gradients flow through float tensors only: an integer layer (a quantized model's) as a target,
    an objective or an inversion layer is INVALID_ARGUMENT naming that field, not 'objectives' with an
    internal tensor's name."""
    from onnx import numpy_helper as nh

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Conv", ["xd", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="quantize_c"),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"]),
             helper.make_node("GlobalAveragePool", ["cd"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    inits = [nh.from_array(np.float32(0.05), "s"), nh.from_array(np.uint8(128), "z"),
             nh.from_array(np.random.default_rng(31).normal(0, 0.3, (3, 1, 3, 3)).astype(np.float32), "w")]
    m = client.load_model(_bytes([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])], nodes, inits),
                          "props_integer_layer", config={"preset": "raw255"})
    x = images(1, (8, 8), seed=4)
    for field, call in (("target.channel.layer", lambda: client.gradient(m, x, Target.channel("cq", 0))),
                        ("objectives[0].channel.layer", lambda: client.maximize(m, [Objective.channel("cq", 0)], steps=1)),
                        ("layers[0]", lambda: client.invert(m, x, ["cq"], steps=1))):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.details.startswith(f"{field}: 'cq' is an integer tensor (UINT8"), e.value.details
    assert client.gradient(m, x, Target.channel("cd", 0)).gradient.shape == x.shape
    _still_serves(client, digits)
