"""Method requests at and past their limits, through the real server and the Python client.

Server limits (--max-batch, memory) are RESOURCE_EXHAUSTED naming the field and the limit;
values that are never allowed (an infinite weight, a huge blur, a position a 2-D layer
does not have, a weight named as a target) are INVALID_ARGUMENT naming the field; results
that would be inf / NaN (an input that overflows the network, a diverging optimization)
are errors, not NaN tensors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from vis_client import Client, Target
from vis_client.errors import InvalidArgument, ResourceExhausted
from vis_client.optimization import Objective
from conftest import SHARED_IMAGES, requires_shared

from vis_service.api.servicers import Limits
from vis_service.server import ServerConfig, start_server

SMALL_LIMIT = 8


@pytest.fixture(scope="module")
def images(digit_images):
    return [str(p) for p in digit_images]


@pytest.fixture(scope="module")
def small_client(repository):
    """A second server whose --max-batch (8) is below the methods' default rows per run (64, 32)."""
    running = start_server(ServerConfig(port=0, model_repository=repository, workers=2,
                                        limits=Limits(max_batch=SMALL_LIMIT)))
    try:
        with Client(running.address) as c:
            yield c
    finally:
        running.stop(grace=0)


# ----------------------------------------------------------------------------
# Integrated Gradients' blurred baseline


def reference_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [N, C, H, W] with mirrored edges (d c b a | a b c d), tap by tap."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = x.astype(np.float64)
    for axis in (2, 3):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(t, t + n), axis=axis) for t, w in enumerate(taps))
    return out


def _check_blurred(client, model, x, sigmas, largest):
    for sigma, expected in sigmas:
        ig = client.integrated_gradients(model, x, steps=1, baseline="blurred", blur_sigma=sigma)
        assert f"sigma {expected:.3g} px" in ig.text["baseline"]
        np.testing.assert_allclose(ig.extra["baseline"], reference_blur(ig.input, expected), rtol=1e-5, atol=1e-4)
    with pytest.raises(InvalidArgument) as e:
        client.integrated_gradients(model, x, steps=1, baseline="blurred", blur_sigma=1e10)
    assert "integrated_gradients.blur_sigma" in e.value.details and f"[0, {largest}]" in e.value.details


def test_blurred_baseline_is_a_gaussian_blur_and_sigma_is_bounded(client, digits, images):
    # 32x32: the default sigma (3.2 px), one wider than the image (mirrored more than once), the largest
    _check_blurred(client, digits, images[:2], [(0, 3.2), (1.5, 1.5), (20, 20), (32, 32)], 32)


@requires_shared
def test_blurred_baseline_on_a_224_model(client):
    # SqueezeNet 224x224 RGB: the default sigma (22.4 px) and a narrow one
    _check_blurred(client, "squeezenet", [str(SHARED_IMAGES / "skimage_chelsea_cat.png")],
                   [(0, 22.4), (4, 4)], 224)


# ----------------------------------------------------------------------------
# rows per run, copies per run, images and starts: the server's --max-batch


def test_rows_per_run_never_exceed_the_servers_limit(small_client, images):
    ig = small_client.integrated_gradients("digits", images[:1], steps=50)
    assert f"{SMALL_LIMIT} rows per run" in ig.text["rule"]      # not all 50 at once (the default allows 64)
    sg = small_client.smoothgrad("digits", images[:1], samples=20)
    assert f"{SMALL_LIMIT} rows per run" in sg.text["noise"]
    seen = []
    cam = small_client.grad_cam("digits", images[:1], method="ablationcam", on_progress=seen.append)
    dones = [p.done for p in seen if p.total]
    assert dones and all(b - a <= SMALL_LIMIT for a, b in zip([0] + dones, dones)) and dones[-1] == 32
    assert cam.cam.shape[0] == 1


def test_batches_past_the_servers_limit_are_resource_exhausted(client, digits, images):
    x = images[:1]
    calls = {
        "attribution": lambda: client.integrated_gradients(digits, x, steps=5000, batch=10 ** 6),
        "smoothgrad": lambda: client.smoothgrad(digits, x, batch=257),
        "occlusion": lambda: client.occlusion(digits, x, batch=257),
        "cam": lambda: client.grad_cam(digits, x, method="scorecam", batch=257),
        "maximize": lambda: client.maximize(digits, [Objective.channel("conv3", 0)], steps=1, batch=257),
        "invert": lambda: client.invert(digits, x, ["conv1"], steps=1, starts=257),
    }
    for name, call in calls.items():
        with pytest.raises(ResourceExhausted) as e:
            call()
        field = "starts" if name == "invert" else "batch"
        assert e.value.details.startswith(f"{field}: ") and "limit of 256" in e.value.details, name
    with pytest.raises(ResourceExhausted) as e:
        client.integrated_gradients(digits, x, steps=5, memory_budget_bytes=1 << 60)
    assert "integrated_gradients.memory_budget_bytes" in e.value.details and "physical memory" in e.value.details
    # at the limit: fine
    assert client.smoothgrad(digits, x, samples=3, batch=256).attribution.shape == (1, 1, 32, 32)


# ----------------------------------------------------------------------------
# optimization: finite weights, divergence


def test_infinite_weights_are_invalid(client, digits, images):
    term = [Objective.channel("conv3", 0)]
    for kwargs, field in [(dict(tv=math.inf), "tv"), (dict(l2=math.inf), "l2"),
                          (dict(batch=2, diversity=math.inf), "diversity")]:
        with pytest.raises(InvalidArgument) as e:
            client.maximize(digits, term, steps=2, **kwargs)
        assert e.value.details.startswith(f"{field}: ") and "finite number >= 0" in e.value.details
        assert "inf]" not in e.value.details
    with pytest.raises(InvalidArgument, match="l2: must be a finite"):
        client.class_model(digits, 3, steps=2, l2=math.inf)
    for name in ("lambda_tv", "lambda_alpha"):
        with pytest.raises(InvalidArgument) as e:
            client.invert(digits, images[0], ["conv1"], steps=2, **{name: math.inf})
        assert e.value.details.startswith(f"{name}: must be in [0, 1000000.0], got inf"), e.value.details


def test_a_diverging_loop_is_an_error_naming_lr(client, digits, images):
    with pytest.raises(InvalidArgument) as e:
        client.maximize(digits, [Objective.channel("conv1", 0)], steps=40, optimizer="sgd", lr=10,
                        parameterization="raw")
    assert e.value.details.startswith("optimizer.lr: the optimization diverged at step")
    assert "smaller lr" in e.value.details
    r = client.maximize(digits, [Objective.channel("conv1", 0)], steps=5, optimizer="sgd", lr=0.01,
                        parameterization="raw")
    assert np.isfinite(r.x).all()
    with pytest.raises(InvalidArgument) as e:
        client.invert(digits, images[0], ["conv1"], steps=40, lr=1e30)
    assert e.value.details.startswith("optimizer.lr: the optimization diverged at step")
    assert "of layer 'conv1'" in e.value.details


def test_huge_weights_blame_the_weights_not_lr(client, digits):
    """A loss that overflows on the starting image is the weights' doing: no update made it."""
    with pytest.raises(InvalidArgument) as e:
        client.maximize(digits, [Objective.channel("block1/add", 1, weight=1e38)], steps=1, lr=1e-6)
    assert e.value.details.startswith("objectives: ") and "smaller weights" in e.value.details


def test_maximize_batch_of_a_fixed_batch_model(client):
    """A model exported with a fixed batch of 2 runs only 2 images: INVALID_ARGUMENT naming batch,
    not onnxruntime's shape error as INTERNAL."""
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["r"])], "fixed2",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 1, 12, 12])],
                          [helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 4, 12, 12])], [w])
    m = client.load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
                          .SerializeToString(), name="fixed-batch-2")
    for batch in (1, 3):
        with pytest.raises(InvalidArgument) as e:
            client.maximize(m, [Objective.channel("r", 1)], steps=2, batch=batch)
        assert e.value.details.startswith("batch: ") and "exactly 2" in e.value.details
    assert client.maximize(m, [Objective.channel("r", 1)], steps=2, batch=2).x.shape == (2, 1, 12, 12)
    client.unload(m.id)


# ----------------------------------------------------------------------------
# inputs that overflow the network


def test_an_input_that_overflows_float32_is_invalid(client, digits):
    x = np.full((1, 1, 32, 32), 3e38, np.float32)
    calls = [lambda: client.saliency(digits, x), lambda: client.gradient(digits, x),
             lambda: client.gradient_x_input(digits, x, 3), lambda: client.guided_backprop(digits, x),
             lambda: client.smoothgrad(digits, x, samples=2, noise=0.0),
             lambda: client.integrated_gradients(digits, x, steps=2, baseline="zero"),
             lambda: client.grad_cam(digits, x), lambda: client.grad_cam(digits, x, method="layercam"),
             lambda: client.grad_cam(digits, x, method="cam"),
             lambda: client.grad_cam(digits, x, method="scorecam"),
             lambda: client.deconvnet(digits, x, "relu3", top_k=2),
             lambda: client.occlusion(digits, x, patch=16, fill="zero")]
    for call in calls:
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.details.startswith("input: the network overflowed float32 on this input")
        assert "non-finite values" in e.value.details
    assert np.isfinite(client.saliency(digits, np.ones((1, 1, 32, 32), np.float32)).map).all()


@requires_shared
def test_overflow_on_resnet20(client):
    x = np.full((1, 3, 32, 32), 3e38, np.float32)
    for call in (lambda: client.saliency("resnet20", x), lambda: client.grad_cam("resnet20", x)):
        with pytest.raises(InvalidArgument, match="input: the network overflowed float32"):
            call()


# ----------------------------------------------------------------------------
# targets: the top channel, neuron positions, weights


def test_channel_target_without_channel_is_each_samples_top_channel(client, digits, images):
    layer = "relu4"
    a = client.activations(digits, images, [layer])[layer]
    top = a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64).sum(axis=2).argmax(axis=1)
    assert len(set(top.tolist())) > 1       # the samples differ, so a per-sample choice shows
    g = client.gradient(digits, images, Target.channel(layer))
    np.testing.assert_array_equal(g.target_index, top)
    explicit = client.gradient(digits, images, Target.channel(layer, top.tolist()))
    np.testing.assert_array_equal(g.gradient, explicit.gradient)
    np.testing.assert_array_equal(client.saliency(digits, images, Target.channel(layer)).target_index, top)
    np.testing.assert_array_equal(client.grad_cam(digits, images, Target.channel(layer), layer="relu3").target_index,
                                  top)
    np.testing.assert_array_equal(client.deconvnet(digits, images, layer, target=Target.channel(layer)).channels[:, 0],
                                  top)


def test_neuron_positions_on_a_2d_layer_must_be_0(client, digits, images):
    for y, x, field in [(5, 7, "y"), (0, 7, "x")]:
        with pytest.raises(InvalidArgument) as e:
            client.gradient(digits, images[:1], Target.neuron("logits", 3, y, x))
        assert e.value.details.startswith(f"target.neuron.{field}: must be 0") and "2-D" in e.value.details
    g = client.gradient(digits, images[:1], Target.neuron("logits", 3, 0, 0))
    np.testing.assert_array_equal(g.gradient, client.gradient(digits, images[:1], 3).gradient)
    with pytest.raises(InvalidArgument) as e:
        client.gradient(digits, images[:1], Target.neuron("relu4", 3, 4, 0))
    assert e.value.details.startswith("target.neuron.y: must be in [0, 4)")
    with pytest.raises(InvalidArgument) as e:
        client.maximize(digits, [Objective.neuron("logits", 3, 5, 7)], steps=1)
    assert e.value.details.startswith("objectives[0].neuron.y: must be unset or 0") and "2-D" in e.value.details
    assert client.maximize(digits, [Objective.neuron("logits", 3, 0)], steps=1).objective.shape == (1,)


def test_cam_layer_after_the_target_names_layer(client, digits, images):
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam(digits, images[:1], Target.channel("relu1", 0), layer="relu4")
    assert e.value.details.startswith("layer: 'relu4' does not lie before the target's tensor 'relu1'")
    assert "wrt" not in e.value.details


@requires_shared
def test_cam_layer_after_the_scores_names_layer(client):
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam("squeezenet", [str(SHARED_IMAGES / "skimage_chelsea_cat.png")], layer="softmaxout_1")
    assert e.value.details.startswith("layer: 'softmaxout_1' does not lie before the target's tensor 'pool10_1'")
    assert "e.g. the default 'conv10_2'" in e.value.details


def test_a_weight_is_not_a_target(client, digits, images):
    with pytest.raises(InvalidArgument) as e:
        client.gradient(digits, images[:1], Target.channel("conv1/weight", 0))
    assert e.value.details.startswith("target.channel.layer: 'conv1/weight' is a weight (initializer)")
    with pytest.raises(InvalidArgument) as e:
        client.grad_cam(digits, images[:1], layer="conv1/weight")
    assert e.value.details.startswith("layer: 'conv1/weight' is a weight (initializer)")
    with pytest.raises(InvalidArgument) as e:
        client.maximize(digits, [Objective.channel("conv1/weight", 0)], steps=1)
    assert e.value.details.startswith("objectives[0].channel.layer: 'conv1/weight' is a weight (initializer)")


@requires_shared
def test_a_weight_is_not_a_target_on_resnet20(client):
    with pytest.raises(InvalidArgument) as e:
        client.gradient("resnet20", np.zeros((1, 3, 32, 32), np.float32), Target.channel("onnx::Conv_284", 0))
    assert e.value.details.startswith("target.channel.layer: 'onnx::Conv_284' is a weight (initializer), "
                                      "not an activation")


def test_overflow_from_a_request_field_names_that_field(client, digits):
    """A finite input with a field that makes the network overflow: the field is named, not `input`."""
    x = np.ones((1, 1, 32, 32), np.float32)
    with pytest.raises(InvalidArgument) as e:
        client.smoothgrad(digits, x, samples=2, noise=3e38)
    assert e.value.details.startswith("smoothgrad.noise: must be in [0, 100]"), e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.integrated_gradients(digits, x, steps=2, baseline="custom", baseline_tensor=np.full_like(x, 3e38))
    assert e.value.details.startswith("integrated_gradients.baseline_tensor: values must be at most 1e+06"), \
        e.value.details
    cotangent = np.full((1, 10), 3e38, np.float32)
    with pytest.raises(InvalidArgument) as e:
        client.gradient(digits, x, Target.tensor("logits", cotangent))
    assert e.value.details.startswith("target: the network overflowed float32 on this target"), e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.invert(digits, x, ["relu3"], steps=1, lambda_tv=3e38)
    assert e.value.details.startswith("lambda_tv: must be in [0, 1000000.0]"), e.value.details
    from vis_service.errors import InvalidArgument as ServerInvalidArgument
    from vis_service.methods.optimization.inversion import InvertSettings
    with pytest.raises(ServerInvalidArgument, match="tv_norm: must be 0 .default. or in"):
        InvertSettings(tv_norm=1e-30).validate()
