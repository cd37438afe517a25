"""Class outputs other than one logits vector per image, through the server and the client: outputs
without a batch axis (a model exported for one image with its batch squeezed away, a scalar score),
a Sigmoid (multi-label) end, a LogSoftmax end, a single logit, a dense [N, classes, H, W] output.
What a method takes per sample of them is refused naming the field, and a class probability is what
the model makes of its scores (a softmax over a single logit was a constant 1; over a Sigmoid's
outputs, or over every pixel of a segmentation map, a meaningless small number). Then layers and
inputs a method cannot use (another input's branch, a map of one position, a 1-D CNN's input for
the image-making methods): refused naming the field."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vis_client import Target
from vis_client.errors import InvalidArgument
from vis_client.optimization import Objective

W_CONV = np.random.default_rng(11).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)


def _weights(*shape) -> np.ndarray:
    """Fixed random weights of `shape` (the same in every test order: other modules build these models too)."""
    return np.random.default_rng(list(shape)).normal(0, 0.5, shape).astype(np.float32)


def _model(end: str | None = None, classes: int = 4, batch="N", squeeze: bool = False, dense: bool = False) -> bytes:
    """x [batch, 3, 8, 8] -> Conv 3x3 + Relu ("feat") -> GAP -> Gemm -> "logits" [N, classes] (or, `dense`,
    a 1x1 Conv -> "logits" [N, classes, 8, 8]) -> `end` ("out"); `squeeze`: the batch axis squeezed
    away ([classes]) and a scalar second output "score"."""
    inits = [numpy_helper.from_array(W_CONV, "w"),
             numpy_helper.from_array(_weights(classes, 4), "wfc"),
             numpy_helper.from_array(_weights(classes, 4, 1, 1), "w1x1")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["feat"], name="feat")]
    if dense:
        nodes.append(helper.make_node("Conv", ["feat", "w1x1"], ["logits"], name="head"))
    else:
        nodes += [helper.make_node("GlobalAveragePool", ["feat"], ["gap"], name="gap"),
                  helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
                  helper.make_node("Gemm", ["flat", "wfc"], ["logits"], transB=1, name="fc")]
    outputs = ["logits"]
    if end:
        nodes.append(helper.make_node(end, ["logits"], ["out"], name="end", **({"axis": 1} if "Softmax" in end else {})))
        outputs = ["out"]
    if squeeze:
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
        nodes += [helper.make_node("Squeeze", [outputs[0], "axis0"], ["squeezed"], name="squeeze"),
                  helper.make_node("ReduceSum", ["squeezed"], ["score"], keepdims=0, name="score")]
        outputs = ["squeezed", "score"]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _load(client, name, **kw):
    return client.load_model(_model(**kw), f"forms_{name}", config={"preset": "raw255"})


def _images(n=2):
    return np.random.default_rng(3).uniform(0, 255, (n, 3, 8, 8)).astype(np.float32)


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _softmax(v, axis):
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_outputs_without_a_batch_axis_are_refused_naming_the_field(client, digits):
    """A model exported for one image with its batch squeezed away ([classes]) and a scalar output:
    Score-CAM, Ablation-CAM and occlusion were INTERNAL (IndexError, reshape), inversion a broadcast
    error, class models a confusing range; the gradient already said it."""
    model = _load(client, "squeezed", batch=1, squeeze=True)
    x = _images(1)
    calls = [("target", lambda: client.grad_cam(model, x, method="scorecam")),
             ("target", lambda: client.grad_cam(model, x, method="ablationcam")),
             ("target", lambda: client.occlusion(model, x, patch=4, stride=4)),
             ("target", lambda: client.occlusion(model, x, Target.output(output="score"), patch=4, stride=4)),
             ("target", lambda: client.grad_cam(model, x, Target.output(output="score"), method="scorecam")),
             ("layers", lambda: client.invert(model, x, steps=2)),
             ("objectives[0].class_score.layer", lambda: client.class_model(model, 1, steps=2)),
             ("objectives[0].class_score.layer", lambda: client.class_model(model, 1, steps=2, probability=True))]
    for field, call in calls:
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.details.startswith(f"{field}: ") and "has no batch dimension" in e.value.details, e.value.details
    assert client.activations(digits, np.zeros((1, 1, 32, 32), np.float32), ["logits"])["logits"].shape == (1, 10)


def test_a_sigmoid_end_gives_its_own_probabilities(client):
    """Multi-label: occlusion's and Score-CAM's probability is the Sigmoid's output (it was a softmax
    over the sigmoids), the default gradient target is the logit before it, and a class model's
    probability objective is the Sigmoid's value."""
    model = _load(client, "sigmoid", end="Sigmoid")
    x = _images()
    acts = client.activations(model, x, ["logits", "out"])
    target = 2
    occ = client.occlusion(model, x, Target.output(target), patch=4, stride=4)
    np.testing.assert_allclose(occ.probability_unoccluded, acts["out"][:, target], rtol=1e-5)
    assert client.gradient(model, x, target).result.text["objective_tensor"] == "logits"
    grad = client.gradient(model, x, Target.output(target)).gradient
    cot = np.zeros((2, 4), np.float32)
    cot[:, target] = 1
    np.testing.assert_allclose(grad, client.gradient(model, x, "logits", cotangent=cot).gradient, rtol=1e-5, atol=1e-7)
    result = client.class_model(model, target, steps=1, probability=True, jitter=0, seed=0)
    value = client.activations(model, result.x, ["out"])["out"][:, target]
    np.testing.assert_allclose(result.terms[:, 0], value, rtol=1e-4)


def test_a_single_logit_and_a_logsoftmax_end(client):
    """One score per image is a binary logit: its probability is the sigmoid (a softmax over one entry
    was 1 everywhere). A LogSoftmax end: the default target is the logit before it, its probability the
    softmax of the logits."""
    single = _load(client, "single", classes=1)
    x = _images() / 255  # logits of a few units: sigmoids short of 1
    logit = client.activations(single, x, ["logits"])["logits"][:, 0]
    occ = client.occlusion(single, x, patch=4, stride=4)
    np.testing.assert_allclose(occ.probability_unoccluded, _sigmoid(logit.astype(np.float64)), rtol=1e-5)
    assert occ.probability.std() > 0

    log_model = _load(client, "logsoftmax", end="LogSoftmax")
    logits = client.activations(log_model, x, ["logits"])["logits"]
    assert client.gradient(log_model, x, 1).result.text["objective_tensor"] == "logits"
    occ = client.occlusion(log_model, x, Target.output(1), patch=4, stride=4)
    np.testing.assert_allclose(occ.probability_unoccluded, _softmax(logits.astype(np.float64), 1)[:, 1], rtol=1e-5)


def test_a_dense_output_takes_probabilities_over_the_classes_at_each_pixel(client):
    """[N, classes, H, W] scores without a final op: the target pixel's probability is a softmax over the
    classes there (it was over all classes x pixels: ~1e-4), and the top class is a class at that pixel
    (it was a flat index)."""
    model = _load(client, "dense", classes=3, dense=True)
    x = _images() / 255  # logits of a few units: probabilities short of 0 and 1
    logits = client.activations(model, x, ["logits"])["logits"].astype(np.float64)
    flat = 1 * 64 + 5 * 8 + 6  # class 1 at pixel (5, 6)
    occ = client.occlusion(model, x, Target.output(flat), patch=2, stride=2, fill="zero")
    np.testing.assert_allclose(occ.probability_unoccluded, _softmax(logits, 1)[:, 1, 5, 6], rtol=1e-5)
    assert occ.top_class.max() < 3 and occ.probability.min() > 0.01


# ----------------------------------------------------------------------------
# layers and inputs a method cannot use: refused naming the field (they returned blank or
# meaningless maps, or a wrong reason)


def _siamese() -> bytes:
    """Inputs a and b [N, 3, 8, 8], each Conv + Relu ("fa", "fb"), pooled and summed -> Gemm."""
    inits = [numpy_helper.from_array(W_CONV, "w"), numpy_helper.from_array(_weights(3, 4), "wfc")]
    nodes = [helper.make_node("Conv", ["a", "w"], ["ca"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["ca"], ["fa"]),
             helper.make_node("Conv", ["b", "w"], ["cb"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["cb"], ["fb"]),
             helper.make_node("Add", ["fa", "fb"], ["both"]), helper.make_node("GlobalAveragePool", ["both"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]), helper.make_node("Gemm", ["flat", "wfc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "siamese", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 8, 8])
                                                 for n in ("a", "b")],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_maps_of_layers_the_image_does_not_reach_or_of_one_position_are_refused(client):
    """A siamese model's other branch as the CAM / occlusion / deconvnet layer (Grad-CAM drew image b's
    map over image a; deconvnet named `wrt`, a field it has not); a [N, C, 1, 1] layer (every CAM method's map was blank); CAM with a layer on a model
    without a pooled linear head (it was told to name 'the pooled feature map' of a pooling it has
    not)."""
    siamese = client.load_model(_siamese(), "forms_siamese", config={"preset": "raw255"})
    feeds = {"a": _images(), "b": _images()[::-1].copy()}
    assert client.grad_cam(siamese, feeds, layer="fa").heatmap.shape == (2, 8, 8)
    for call in (lambda: client.grad_cam(siamese, feeds, layer="fb"),
                 lambda: client.occlusion(siamese, feeds, layer="fb", patch=4, stride=4),
                 lambda: client.deconvnet(siamese, feeds, "fb")):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.details.startswith("layer: 'fb' is not computed from the image input 'a'"), e.value.details

    model = _load(client, "one_position")
    for method in ("gradcam", "scorecam", "ablationcam"):
        with pytest.raises(InvalidArgument) as e:
            client.grad_cam(model, _images(), layer="gap", method=method)
        assert e.value.details.startswith("layer: 'gap'") and "has one position" in e.value.details, e.value.details

    dense = _load(client, "dense_cam", classes=3, dense=True)
    for layer in (None, "feat"):
        with pytest.raises(InvalidArgument) as e:
            client.grad_cam(dense, _images(), Target.output(5), layer=layer, method="cam")
        assert "CAM needs a global-average-pooling + linear head" in e.value.details, e.value.details


def _net1d() -> bytes:
    """x [N, 2, 16] -> Conv1d 3 + Relu ("r") -> GAP -> Gemm: an audio-like 1-D CNN."""
    inits = [numpy_helper.from_array(_weights(4, 2, 3), "w"),
             numpy_helper.from_array(_weights(3, 4), "wfc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wfc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "net1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return proto.SerializeToString()


def test_a_1d_cnn_is_told_that_images_need_a_4d_input(client):
    """maximize / class_model / invert on a 1-D CNN said 'give size [H, W]' (its input is static), and
    given one, that the model takes another rank; image files to it said the same."""
    model = client.load_model(_net1d(), "forms_net1d")
    x = np.random.default_rng(0).standard_normal((1, 2, 16)).astype(np.float32)
    assert client.saliency(model, x, 1).attribution.shape == x.shape
    for call in (lambda: client.maximize(model, [Objective.channel("r", 1)], steps=2),
                 lambda: client.class_model(model, 1, steps=2),
                 lambda: client.invert(model, x, ["r"], steps=2)):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert "4-D image input" in e.value.details and "['N', 2, 16]" in e.value.details, e.value.details
    png = _png()
    with pytest.raises(InvalidArgument) as e:
        client.activations(model, [png], ["r"])
    assert e.value.details.startswith("input.preprocess: model input 'x' of shape ['N', 2, 16] is not a 4-D image"), \
        e.value.details


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------
# several inputs


def _image_and(other: str, other_shape: list, first: bool) -> bytes:
    """An image [N, 3, 8, 8] and another input: "mask" [N, 1, 8, 8] multiplied in, or "meta" (a vector
    per image, concatenated to the pooled features); `first`: the other input listed first."""
    inits = [numpy_helper.from_array(W_CONV, "w"), numpy_helper.from_array(_weights(3, 9), "wfc9"),
             numpy_helper.from_array(_weights(3, 4), "wfc")]
    nodes = []
    x = "x"
    if other == "mask":
        nodes.append(helper.make_node("Mul", ["x", "mask"], ["masked"]))
        x = "masked"
    nodes += [helper.make_node("Conv", [x, "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["feat"]),
              helper.make_node("GlobalAveragePool", ["feat"], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"])]
    if other == "meta":
        nodes += [helper.make_node("Concat", ["flat", "meta"], ["joined"], axis=1),
                  helper.make_node("Gemm", ["joined", "wfc9"], ["logits"], transB=1)]
    else:
        nodes.append(helper.make_node("Gemm", ["flat", "wfc"], ["logits"], transB=1))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info(other, TensorProto.FLOAT, other_shape)]
    graph = helper.make_graph(nodes, "two_inputs", inputs[::-1] if first else inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_the_image_input_is_the_colour_one_when_a_mask_comes_first(client):
    """A mask [N, 1, H, W] listed before the RGB image took the images: every method ran on the mask."""
    model = client.load_model(_image_and("mask", [1, 1, 8, 8], first=True), "forms_mask_first")
    feeds = {"mask": np.ones((2, 1, 8, 8), np.float32), "x": _images() / 255}
    assert client.saliency(model, feeds, 1).attribution.shape == (2, 3, 8, 8)
    assert client.grad_cam(model, feeds, 1).heatmap.shape == (2, 8, 8)


def test_one_row_of_another_input_is_shared_by_every_image(client):
    """A vector input exported as [1, 5] beside images made free-batch: three images with that one row
    were refused (its batch is made free with the images'); the row is now each image's, as
    onnxruntime broadcasts it; rows of another count still are refused."""
    model = client.load_model(_image_and("meta", [1, 5], first=False), "forms_meta")
    x = _images(3) / 255
    meta = np.random.default_rng(1).standard_normal((1, 5)).astype(np.float32)
    shared = client.activations(model, {"x": x, "meta": meta}, ["logits"])["logits"]
    repeated = client.activations(model, {"x": x, "meta": np.repeat(meta, 3, axis=0)}, ["logits"])["logits"]
    np.testing.assert_array_equal(shared, repeated)
    grads = client.gradient(model, {"x": x, "meta": meta}, 1, wrt=["x"]).gradient
    assert grads.shape == x.shape and np.abs(grads).max() > 0
    with pytest.raises(InvalidArgument) as e:
        client.activations(model, {"x": x, "meta": np.repeat(meta, 2, axis=0)}, ["logits"])
    assert e.value.details == "input.tensors[meta]: batch size 2 differs from the other inputs' 3", e.value.details


def test_an_attribution_target_the_image_does_not_reach_names_the_target(client):
    """Saliency of a target computed from the other input only was refused naming `wrt`, a field the
    attribution request has not."""
    model = client.load_model(_image_and("meta", [1, 5], first=False), "forms_meta_target")
    feeds = {"x": _images(2) / 255, "meta": np.ones((2, 5), np.float32)}
    with pytest.raises(InvalidArgument) as e:
        client.saliency(model, feeds, Target.channel("meta", 0))
    assert e.value.details.startswith("target.channel.layer: 'meta' is not computed from the image input 'x'"), \
        e.value.details


def _detector() -> bytes:
    """A detection-like output first: the positive class scores of every image, flattened and selected
    by NonZero ("scores" [k], k set by the data: 4 per image here, each logit biased to > 0)."""
    inits = [numpy_helper.from_array(W_CONV, "w"), numpy_helper.from_array(_weights(4, 4), "wfc"),
             numpy_helper.from_array(np.full(4, 100, np.float32), "bfc"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["feat"]),
             helper.make_node("GlobalAveragePool", ["feat"], ["gap"]), helper.make_node("Flatten", ["gap"], ["f"]),
             helper.make_node("Gemm", ["f", "wfc", "bfc"], ["logits"], transB=1),
             helper.make_node("Reshape", ["logits", "flat_shape"], ["all"]),
             helper.make_node("Greater", ["all", "zero"], ["positive"]), helper.make_node("NonZero", ["positive"], ["nz"]),
             helper.make_node("Reshape", ["nz", "flat_shape"], ["kept"]),
             helper.make_node("Gather", ["all", "kept"], ["scores"])]
    graph = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_detection_output_whose_rows_are_not_the_images(client):
    """Detections [k] first in the outputs, k varying with the input (shape inference names it with a
    symbol of its own): occlusion and Score-CAM were IndexErrors (INTERNAL) or, where k happened to fit,
    some detection's score; Grad-CAM of a backbone channel looked for its default layer before the
    detections ('no 4-D feature map') instead of before the channel's layer."""
    model = client.load_model(_detector(), "forms_detector", config={"preset": "raw255"})
    x = _images(1) / 255  # logits of 100 +- a few: all four kept
    assert client.activations(model, x, ["scores"])["scores"].shape == (4,)
    for call in (lambda: client.occlusion(model, x, patch=4, stride=4),
                 lambda: client.grad_cam(model, x, method="scorecam"),
                 lambda: client.grad_cam(model, x, Target.output(0, output="scores"), method="ablationcam")):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.details.startswith("target: tensor 'scores' came out of shape [4] for 1 images"), e.value.details
    cam = client.grad_cam(model, _images(2) / 255, Target.channel("feat", 1))
    assert cam.heatmap.shape == (2, 8, 8) and cam.layer == "c"
    occ = client.occlusion(model, x, Target.output(1, output="logits"), patch=4, stride=4)
    assert occ.probability.shape == (1, 2, 2)


def test_inspect_says_why_it_gives_no_receptive_fields(client):
    """Inspect's receptive-field columns were empty without a word for 1-D / 3-D CNNs and for a
    detector's graph, which gathers its image from the batch first."""
    inits = [numpy_helper.from_array(W_CONV, "w"), numpy_helper.from_array(np.array(0, np.int64), "first"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [helper.make_node("Gather", ["x", "first"], ["image"], axis=0, name="take_image"),
             helper.make_node("Unsqueeze", ["image", "axis0"], ["one"], name="one"),
             helper.make_node("Conv", ["one", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("ReduceMean", ["c"], ["score"], keepdims=0, name="score")]
    graph = helper.make_graph(nodes, "gathers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    gathers = client.inspect(client.load_model(proto.SerializeToString(), "forms_gathers"))
    assert gathers.receptive_fields_note.startswith("not traced past the Gather node 'take_image'"), \
        gathers.receptive_fields_note
    assert "receptive fields: none, not traced past the Gather node" in gathers.summary()
    traced = client.inspect(_load(client, "traced"))
    assert traced.receptive_fields_note == "" and traced.node("conv").receptive_fields
    net1d = client.inspect(client.load_model(_net1d(), "forms_net1d_inspect"))
    assert net1d.receptive_fields_note.startswith("no 4-D float image input"), net1d.receptive_fields_note
