"""LocalizationService.Cam: every variant against an independent numpy computation.

The reference arrays come from the basic calls (client.activations, client.gradient,
client.filters) on a small GAP + Gemm CNN built here (and the embedded digits model),
so a wrong weight formula, a wrong layer, a wrong upsampling or a wrong target shows.
"""
from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vis_client import Cancelled, InvalidArgument, NotFound, Target

LAYER = "feat"          # the tiny model's last feature map (before GlobalAveragePool)
CLASSES = ["ant", "bee", "cat", "dog", "eel"]


def tiny_model_bytes(head: str = "gap", seed: int = 0) -> bytes:
    """Conv-Relu-Conv(stride 2)-Relu ("feat", [N, 6, 8, 8]) -> GAP -> Flatten -> Gemm (5 classes).

    head="flatten": Flatten(feat) -> Gemm, i.e. no global pooling (CAM must refuse it);
    head="tf_flatten": tf2onnx's form of Keras's Flatten, Transpose(feat, NHWC) -> Reshape [N, -1]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (6, 4, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, (6,)).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], [LAYER], name="relu2")]
    if head in ("gap", "gap_swish"):
        nodes += [helper.make_node("GlobalAveragePool", [LAYER], ["pooled"], name="gap"),
                  helper.make_node("Flatten", ["pooled"], ["flat"] if head == "gap" else ["pre"], name="flatten")]
        if head == "gap_swish":   # x * sigmoid(x) after the pooling (MobileNetV3's head is like it)
            nodes += [helper.make_node("Sigmoid", ["pre"], ["sig"], name="sigmoid"),
                      helper.make_node("Mul", ["pre", "sig"], ["flat"], name="swish")]
        fan_in = 6
    elif head == "tf_flatten":
        nodes += [helper.make_node("Transpose", [LAYER], ["feat_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
                  helper.make_node("Reshape", ["feat_nhwc", "flat_shape"], ["flat"], name="flatten")]
        inits.append(numpy_helper.from_array(np.array([-1, 6 * 8 * 8], np.int64), "flat_shape"))
        fan_in = 6 * 8 * 8
    elif head == "tf_layernorm":
        # like tf2onnx's Keras LayerNormalization then GlobalAveragePooling2D on NHWC: the batch folded
        # into a [1, N*H*W, C, 1] tensor (normalized there), reshaped back to [N, H, W, C] (whose axes
        # nothing traces), pooled by ReduceMean over axes 1, 2
        nodes += [helper.make_node("Transpose", [LAYER], ["feat_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
                  helper.make_node("Shape", ["feat_nhwc"], ["nhwc_shape"]),
                  helper.make_node("Gather", ["nhwc_shape", "zero"], ["n"]),
                  helper.make_node("Mul", ["n", "sixty_four"], ["positions"]),
                  helper.make_node("Concat", ["one", "positions", "six_one"], ["folded_shape"], axis=0),
                  helper.make_node("Reshape", ["feat_nhwc", "folded_shape"], ["folded"], name="fold"),
                  helper.make_node("Sigmoid", ["folded"], ["normed"], name="ln"),
                  helper.make_node("Reshape", ["normed", "nhwc_shape"], ["unfolded"], name="unfold"),
                  helper.make_node("ReduceMean", ["unfolded"], ["flat"], name="gap", axes=[1, 2], keepdims=0)]
        inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                  (("zero", [0]), ("sixty_four", [64]), ("one", [1]), ("six_one", [6, 1]))]
        fan_in = 6
    else:
        nodes += [helper.make_node("Flatten", [LAYER], ["flat"], name="flatten")]
        fan_in = 6 * 8 * 8
    inits += [numpy_helper.from_array(rng.normal(0, 1.0, (5, fan_in)).astype(np.float32), "fc_w"),
              numpy_helper.from_array(rng.normal(0, 0.1, (5,)).astype(np.float32), "fc_b")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, f"tiny_{head}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def tiny(client):
    return client.load_model(tiny_model_bytes(), "loc_tiny", config={"preset": "raw255"}, labels=CLASSES)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).uniform(0, 255, (3, 3, 16, 16)).astype(np.float32)


def _bilinear(n_in: int, n_out: int) -> np.ndarray:
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1 - (src - i0)
    m[np.arange(n_out), i1] += src - i0
    return m


def _heatmap(cam: np.ndarray, hw) -> np.ndarray:
    up = np.einsum("Hh,nhw,Ww->nHW", _bilinear(cam.shape[1], hw[0]), cam, _bilinear(cam.shape[2], hw[1]))
    lo = up.min(axis=(1, 2), keepdims=True)
    return (up - lo) / (up.max(axis=(1, 2), keepdims=True) - lo)


def _reference(client, model, x, layer, target):
    a = client.activations(model, x, [layer])[layer].astype(np.float64)
    g = client.gradient(model, x, target, wrt=[layer]).gradient.astype(np.float64)
    return a, g


def _gradcam(a, g):
    return np.maximum(np.einsum("nc,nchw->nhw", g.mean(axis=(2, 3)), a), 0)


def _gradcampp(a, g):
    g2, g3 = g ** 2, g ** 3
    denom = 2 * g2 + a.sum(axis=(2, 3), keepdims=True) * g3
    alpha = np.where(g != 0, g2 / np.where(denom != 0, denom, 1e-7), 0)
    w = (alpha * np.maximum(g, 0)).sum(axis=(2, 3))
    return np.maximum(np.einsum("nc,nchw->nhw", w, a), 0)


def _layercam(a, g):
    return np.maximum((np.maximum(g, 0) * a).sum(axis=1), 0)


@pytest.mark.parametrize("method,formula", [("gradcam", _gradcam), ("gradcam++", _gradcampp), ("layercam", _layercam)])
def test_gradient_cams_match_numpy(client, tiny, x, method, formula):
    cam = client.grad_cam(tiny, x, method=method)
    assert cam.layer == LAYER and cam.method == method
    logits = client.activations(tiny, x, ["logits"])["logits"]
    np.testing.assert_array_equal(cam.target_index, logits.argmax(axis=1))
    assert cam.labels == [CLASSES[k] for k in cam.target_index]
    a, g = _reference(client, tiny, x, LAYER, cam.target_index.tolist())
    want = formula(a, g)
    assert want.max() > 0
    np.testing.assert_allclose(cam.cam, want, rtol=1e-4, atol=1e-5 * want.max())
    np.testing.assert_allclose(cam.heatmap, _heatmap(cam.cam.astype(np.float64), (16, 16)), atol=1e-5)
    assert cam.heatmap.shape == (3, 16, 16) and cam.weights.shape == (3, 6)
    np.testing.assert_array_equal(cam.input, x)


def test_gradcam_explicit_class_and_named_node(client, tiny, x):
    """A given class (not the top-1) and the layer named by its node ("relu2")."""
    cam = client.grad_cam(tiny, x, [1, 2, 3], layer="relu2")
    np.testing.assert_array_equal(cam.target_index, [1, 2, 3])
    a, g = _reference(client, tiny, x, LAYER, [1, 2, 3])
    np.testing.assert_allclose(cam.weights, g.mean(axis=(2, 3)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cam.cam, _gradcam(a, g), rtol=1e-4, atol=1e-5)
    # an earlier layer at a higher resolution
    early = client.grad_cam(tiny, x, [1, 2, 3], layer="r1")
    a1, g1 = _reference(client, tiny, x, "r1", [1, 2, 3])
    assert early.cam.shape == (3, 16, 16)
    np.testing.assert_allclose(early.cam, _gradcam(a1, g1), rtol=1e-4, atol=1e-5)


def test_cam_uses_head_weights(client, tiny, x):
    cam = client.grad_cam(tiny, x, method="cam")
    w = client.filters(tiny, "fc")["weight"].astype(np.float64)  # [5, 6]
    a = client.activations(tiny, x, [LAYER])[LAYER].astype(np.float64)
    np.testing.assert_allclose(cam.weights, w[cam.target_index], rtol=1e-6)
    want = np.maximum(np.einsum("nc,nchw->nhw", w[cam.target_index], a), 0)
    np.testing.assert_allclose(cam.cam, want, rtol=1e-4, atol=1e-5)
    # for a GAP + linear head, Grad-CAM's weights are the head weights / (h * w)
    grad = client.grad_cam(tiny, x, cam.target_index.tolist())
    np.testing.assert_allclose(grad.weights * 64, cam.weights, rtol=1e-4, atol=1e-6)


def test_cam_refuses_a_head_without_global_pooling(client, tiny, x):
    flat = client.load_model(tiny_model_bytes("flatten"), "loc_tiny_flatten", config={"preset": "raw255"})
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam(flat, x, method="cam")
    assert "method" in e.value.details and "flatten" in e.value.details
    # Grad-CAM still works there (the default layer is the flattened feature map)
    assert client.grad_cam(flat, x).layer == LAYER
    swish = client.load_model(tiny_model_bytes("gap_swish"), "loc_tiny_swish", config={"preset": "raw255"})
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam(swish, x, method="cam")
    assert "'sigmoid' (Sigmoid), 'swish' (Mul)" in e.value.details and "Grad-CAM works on any head" in e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam(tiny, x, method="cam", layer="r1")
    assert "layer" in e.value.details


def test_default_layer_of_a_tf2onnx_flatten_head_is_the_channels_first_map(client, x):
    """tf2onnx writes Keras's Flatten as Transpose(NCHW -> NHWC) then Reshape: the default layer was
    the NHWC tensor [N, 8, 8, 6], read as 8 channels of 8 x 6 maps (every CAM and occlusion's feature
    map meaningless); it is the NCHW map before the Transpose."""
    model = client.load_model(tiny_model_bytes("tf_flatten"), "loc_tiny_tf_flatten", config={"preset": "raw255"})
    res = client.grad_cam(model, x)
    assert res.layer == LAYER and res.weights.shape == (3, 6)
    named = client.grad_cam(model, x, layer=LAYER)
    np.testing.assert_allclose(res.cam, named.cam, rtol=1e-6)
    assert client.occlusion(model, x, patch=8, stride=8).layer == LAYER
    with pytest.raises(InvalidArgument) as e:   # named, the NHWC view is refused, naming the map
        client.grad_cam(model, x, layer="feat_nhwc")
    assert "is channels-last [N, H, W, C]" in e.value.details and f"e.g. {LAYER!r}" in e.value.details


def test_default_layer_is_a_traced_map_with_the_images_apart(client):
    """Behind a tf2onnx Keras LayerNormalization the default layer was [1, N*H*W, C, 1] (the batch folded
    in: Grad-CAM all zeros for one image of two, occlusion INTERNAL) or the NHWC map read as [N, H, W, C];
    it is the last map traced to [N, C, H, W] now, and the folded tensor, named, is refused."""
    x = np.random.default_rng(3).uniform(0, 255, (2, 3, 16, 16)).astype(np.float32)
    proto = onnx.load_from_string(tiny_model_bytes("tf_layernorm"))
    for value in (proto.graph.input[0], proto.graph.output[0]):   # a free batch, as tf2onnx exports
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    model = client.load_model(proto.SerializeToString(), "loc_tiny_tf_layernorm", config={"preset": "raw255"})
    res = client.grad_cam(model, x)
    assert res.layer == LAYER and res.cam.shape == (2, 8, 8)
    assert client.occlusion(model, x, patch=8, stride=8).layer == LAYER
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam(model, x, layer="normed")
    assert "its first axis is not the images' batch" in e.value.details


def test_guided_gradcam_is_guided_backprop_times_heatmap(client, tiny, x):
    cam = client.grad_cam(tiny, x, method="guided_gradcam")
    guided = client.gradient(tiny, x, cam.target_index.tolist(), rule_set="guided").gradient
    np.testing.assert_allclose(cam.attribution, guided * cam.heatmap[:, None], rtol=1e-4, atol=1e-6)
    plain = client.grad_cam(tiny, x, cam.target_index.tolist())
    np.testing.assert_allclose(cam.heatmap, plain.heatmap, atol=1e-6)


def test_scorecam_matches_masked_forward_passes(client, tiny, x):
    """Each channel's weight is the class probability of the input masked by that
    channel's upsampled, min-max normalized activation (input masking, as the paper)."""
    progress = []
    cam = client.score_cam(tiny, x, batch=5, on_progress=progress.append)
    a = client.activations(tiny, x, [LAYER])[LAYER].astype(np.float64)
    want = np.zeros((3, 6))
    for n in range(3):
        masks = []
        for c in range(6):
            up = np.einsum("Hh,hw,Ww->HW", _bilinear(8, 16), a[n, c], _bilinear(8, 16))
            masks.append((up - up.min()) / (up.max() - up.min()) if up.max() > up.min() else None)
        batch = np.stack([x[n] * m[None] for m in masks if m is not None]).astype(np.float32)
        logits = client.activations(tiny, batch, ["logits"])["logits"].astype(np.float64)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        want[n, [c for c in range(6) if masks[c] is not None]] = p[:, cam.target_index[n]]
    np.testing.assert_allclose(cam.weights, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cam.cam, np.maximum(np.einsum("nc,nchw->nhw", want, a), 0), rtol=1e-4, atol=1e-5)
    total = int((a.max(axis=(2, 3)) > a.min(axis=(2, 3))).sum())
    assert progress and progress[-1].done == progress[-1].total == total
    assert len(progress) >= -(-total // 5)


def test_ablationcam_matches_zeroed_channels(client, tiny, x):
    """Ablation-CAM replays only the graph after the layer; check it against the head in numpy."""
    cam = client.grad_cam(tiny, x, method="ablationcam")
    assert cam.result.text["replay"].startswith("layer separates")
    a = client.activations(tiny, x, [LAYER])[LAYER].astype(np.float64)
    f = client.filters(tiny, "fc")
    w, b = f["weight"].astype(np.float64), f["bias"].astype(np.float64)
    k = cam.target_index
    pooled = a.mean(axis=(2, 3))                             # [N, C]
    y = (pooled * w[k]).sum(axis=1) + b[k]
    y_k = y[:, None] - pooled * w[k]                         # channel c zeroed
    want = (y[:, None] - y_k) / y[:, None]
    np.testing.assert_allclose(cam.weights, want, rtol=1e-3, atol=1e-5)


def test_gradcam_channel_target(client, tiny, x):
    """Gradient variants accept any target, e.g. a channel of the layer itself."""
    cam = client.grad_cam(tiny, x, Target.channel("r1", 2), layer="r1")
    a, g = _reference(client, tiny, x, "r1", Target.channel("r1", 2))
    np.testing.assert_allclose(cam.cam, _gradcam(a, g), rtol=1e-4, atol=1e-5)
    assert cam.labels is None


def test_bad_requests(client, tiny, x):
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam(tiny, x, method="gradcam+++")
    assert "method" in e.value.details and "gradcam++" in e.value.details
    with pytest.raises(NotFound) as e:
        client.grad_cam(tiny, x, layer="relu3")
    assert "relu2" in e.value.details  # a suggestion
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam(tiny, x, layer="logits")
    assert "layer" in e.value.details and "4-D" in e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam(tiny, x, 7)
    assert "index" in e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.score_cam(tiny, x, Target.channel("r1", 0))
    assert "target" in e.value.details
    assert client.grad_cam(tiny, x).cam.shape == (3, 8, 8)  # still serving


def test_scorecam_cancel(client, tiny):
    """Cancel after the first progress message: the client gets Cancelled, the server keeps serving."""
    big = np.random.default_rng(2).uniform(0, 255, (40, 3, 16, 16)).astype(np.float32)
    cancel = threading.Event()
    seen = []

    def on_progress(p):
        seen.append(p)
        cancel.set()

    with pytest.raises(Cancelled):
        client.score_cam(tiny, big, batch=1, on_progress=on_progress, cancel=cancel)
    assert seen and seen[0].total > 1
    assert client.grad_cam(tiny, big[:2]).heatmap.shape == (2, 16, 16)


def test_a_map_that_is_zero_everywhere_says_why(client, x):
    """Class 0's head weights all negative: its weighted sum of (non-negative) maps is <= 0 at every
    position, and CAM / Grad-CAM gave a blank map without a word; the result names those images."""
    model = onnx.load_from_string(tiny_model_bytes())
    fc = next(i for i in model.graph.initializer if i.name == "fc_w")
    w = numpy_helper.to_array(fc).copy()
    w[0] = -np.abs(w[0]) - 0.1
    fc.CopyFrom(numpy_helper.from_array(w, "fc_w"))
    m = client.load_model(model.SerializeToString(), "loc_tiny_negative", config={"preset": "raw255"})
    try:
        for method in ("cam", "gradcam"):
            cam = client.grad_cam(m, x, [0, 1, 0], method=method)
            assert not cam.cam[0].any() and not cam.cam[2].any()
            assert cam.note.startswith("image(s) [0, 2]: the weighted sum of the layer's maps is <= 0 at every position")
        assert client.grad_cam(m, x, [1, 1, 1], method="cam").note == ""
    finally:
        client.unload(m.id)


def test_render(client, tiny, x, tmp_path):
    pytest.importorskip("matplotlib")
    cam = client.grad_cam(tiny, x)
    img = cam.render(0, tmp_path / "cam.png")
    assert (tmp_path / "cam.png").is_file() and img.ndim == 3 and img.shape[1] > img.shape[0]


def test_default_layer_is_computed_from_the_input_not_a_weight_made_in_the_graph(client):
    """light_inception_v1 keeps its classifier weight as a 4-D ConstantOfShape output reshaped
    before the Gemm; the default layer is the last feature map before the pooling instead."""
    from _graph_helpers import load

    proto = load("light:inception_v1")
    model = client.load_model(proto.SerializeToString(), "inception_v1_cam")
    x = np.random.default_rng(4).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    cam = client.grad_cam(model, x)
    assert cam.cam.shape == (2, 6, 6)
    maps = client.activations(model, x, [cam.layer])[cam.layer]
    assert maps.shape == (2, 1024, 6, 6)  # per image, unlike the weight's [1, 1, 1000, 1024]
