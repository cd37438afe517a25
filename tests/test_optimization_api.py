"""OptimizationService end to end: real server, real onnxruntime, the digits model (and SqueezeNet).

Results are checked against independent computations from the basic calls
(Activations on the returned model-space images, random images as a baseline).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from vis_client.errors import Cancelled, InvalidArgument, NotFound
from vis_client.optimization import Objective
from conftest import SHARED_IMAGES, requires_shared

LAYER = "conv3"          # pre-ReLU conv output of the digits model, [N, 32, 8, 8]
MEAN, STD = 0.3052, 0.3236


def _random_images(n, seed=0):
    """Random pixel images (uniform 0..255) in the digits model's input space."""
    px = np.random.default_rng(seed).random((n, 1, 32, 32))
    return ((px - MEAN) / STD).astype(np.float32)


def _channel_mean(client, model, x, layer, c):
    return client.activations(model, x, [layer])[layer][:, c].mean(axis=(1, 2))


def _rises(history):
    k = max(1, len(history) // 10)
    return float(np.mean(history[-k:])) > float(np.mean(history[:k]))


def test_channel_maximization_rises_and_beats_random_images(client, digits):
    steps = []
    r = client.maximize(digits, [Objective.channel(LAYER, 5)], steps=48, batch=2, on_step=steps.append)
    assert [p.done for p in steps] == list(range(1, 49)) and steps[-1].total == 48
    assert {"loss", "objective", "l2", "tv", "diversity", "lr"} <= set(steps[0].values)
    assert r.images.shape == (2, 32, 32, 3) and r.images.dtype == np.uint8
    assert r.x.shape == (2, 1, 32, 32)
    assert _rises(r.losses["objective"])
    assert r.text["redirected_steps"] == "0"   # the exact gradient throughout
    # independent check: the Activations call on the returned model-space images
    got = _channel_mean(client, digits, r.x, LAYER, 5)
    np.testing.assert_allclose(r.terms[:, 0], got, rtol=1e-4, atol=1e-4)
    baseline = _channel_mean(client, digits, _random_images(16), LAYER, 5)
    spread = baseline.max() - baseline.min()
    assert got.min() > baseline.max() + 3 * spread
    # the sigmoid keeps every pixel in the valid range [0, 255]
    px = r.x * STD + MEAN
    assert px.min() >= -1e-5 and px.max() <= 1 + 1e-5


def test_class_model_makes_the_class_win(client, digits):
    r = client.class_model(digits, 3, steps=40)
    logits = client.activations(digits, r.x, ["logits"])["logits"]
    assert int(logits[0].argmax()) == 3
    assert r.objective[0] == pytest.approx(float(logits[0, 3]), rel=1e-4)
    base = client.activations(digits, _random_images(16), ["logits"])["logits"][:, 3]
    assert logits[0, 3] > base.max() + 3 * (base.max() - base.min())
    assert _rises(r.losses["objective"])


@pytest.mark.parametrize("objective", [
    Objective.neuron(LAYER, 7, 4, 4), Objective.layer_l2("conv4"),
    Objective.class_score(8, probability=True),
    Objective.direction(LAYER, np.linspace(-1, 1, 32)),
])
def test_each_objective_kind_rises(client, digits, objective):
    r = client.maximize(digits, objective, steps=24, parameterization="pixel", jitter=1, rotate=0, scale=0)
    assert _rises(r.losses["objective"]), r.losses["objective"]
    if objective.WhichOneof("kind") == "class_score":
        probs = client.activations(digits, r.x, ["logits"])["logits"]
        p = np.exp(probs - probs.max()) / np.exp(probs - probs.max()).sum()
        assert r.terms[0, 0] == pytest.approx(float(p[0, 8]), rel=1e-3)


def test_terms_apply_to_their_images_and_diversity_runs(client, digits):
    terms = [Objective.channel(LAYER, 1, images=0), Objective.channel(LAYER, 2, images=[1])]
    r = client.maximize(digits, terms, steps=16, batch=2, diversity=10.0, seed=3)
    assert np.isnan(r.terms[1, 0]) and np.isnan(r.terms[0, 1])
    assert np.isfinite(r.terms[0, 0]) and np.isfinite(r.terms[1, 1])
    assert r.losses["diversity"].max() > 0


def test_fixed_seed_gives_identical_results(client, digits):
    kw = dict(steps=12, batch=2, seed=7, jitter=2, scale=0.1, rotate=10, tv=0.1, blur_every=4)
    a = client.maximize(digits, Objective.channel(LAYER, 3), **kw)
    b = client.maximize(digits, Objective.channel(LAYER, 3), **kw)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.losses["loss"], b.losses["loss"])
    c = client.maximize(digits, Objective.channel(LAYER, 3), **{**kw, "seed": 8})
    assert not np.array_equal(a.x, c.x)


def test_snapshots_stream_before_their_step(client, digits):
    events = []
    r = client.maximize(digits, Objective.channel(LAYER, 0), steps=6, snapshot_every=2,
                        on_step=lambda p: events.append(("step", p.done)),
                        on_snapshot=lambda s: events.append(("snap", s.step, s.images.shape)))
    snaps = [e for e in events if e[0] == "snap"]
    assert snaps == [("snap", k, (1, 32, 32, 3)) for k in (2, 4, 6)]
    for k in (2, 4, 6):
        assert events.index(("snap", k, (1, 32, 32, 3))) == events.index(("step", k)) - 1
    np.testing.assert_array_equal(r.snapshots[-1].images, r.images)


def test_cancellation_stops_the_loop_and_the_server_keeps_serving(client, digits):
    cancel = threading.Event()
    seen = []

    def on_step(p):
        seen.append(p.done)
        if p.done == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        client.maximize(digits, Objective.channel(LAYER, 0), steps=100_000, on_step=on_step, cancel=cancel)
    assert max(seen) < 1000
    r = client.maximize(digits, Objective.channel(LAYER, 0), steps=2)
    assert r.losses["loss"].shape == (2,)


def test_bad_requests(client, digits):
    with pytest.raises(NotFound, match="no_such_layer"):
        client.maximize(digits, Objective.channel("no_such_layer", 0), steps=2)
    with pytest.raises(InvalidArgument, match=r"objectives\[1\]\.weight"):
        client.maximize(digits, [Objective.channel(LAYER, 0), Objective.channel(LAYER, 1, weight=-2)], steps=2)
    with pytest.raises(InvalidArgument, match="steps"):
        client.maximize(digits, Objective.channel(LAYER, 0), steps=-1)
    with pytest.raises(InvalidArgument, match=r"objectives\[0\]\.channel\.channel"):
        client.maximize(digits, Objective.channel(LAYER, 99), steps=2)
    with pytest.raises(InvalidArgument, match="parameterization"):
        client.maximize(digits, Objective.channel(LAYER, 0), steps=2, parameterization="wavelet")
    with pytest.raises(InvalidArgument, match="optimizer.name"):
        client.maximize(digits, Objective.channel(LAYER, 0), steps=2, optimizer="lbfgs")
    with pytest.raises(InvalidArgument, match="starts"):
        client.invert(digits, _random_images(1), LAYER, starts=-1)
    with pytest.raises(InvalidArgument, match="lambda_tv"):
        client.invert(digits, _random_images(1), LAYER, lambda_tv=-1.0)
    with pytest.raises(NotFound):
        client.invert(digits, _random_images(1), "no_such_layer", steps=2)
    # still serving
    assert client.maximize(digits, Objective.channel(LAYER, 0), steps=1).images.shape == (1, 32, 32, 3)


def test_inversion_sweep_on_digits(client, digits, digit_images):
    inv = client.invert(digits, digit_images[0], ["conv1", "conv4"], steps=60, starts=2, snapshot_every=30,
                        optimizer="adam")
    assert [li.layer for li in inv.layers] == ["conv1", "conv4"]
    assert inv.feature_error.shape == (2, 2) and inv["conv1"].images.shape == (2, 32, 32, 3)
    assert [(s.layer, s.step) for s in inv.snapshots] == [("conv1", 30), ("conv1", 60), ("conv4", 30), ("conv4", 60)]
    # independent feature error from the Activations call
    ref = client.activations(digits, digit_images[0], ["conv1"])["conv1"]
    rec = client.activations(digits, inv["conv1"].x, ["conv1"])["conv1"]
    err = np.linalg.norm((rec - ref).reshape(2, -1), axis=1) / np.linalg.norm(ref)
    np.testing.assert_allclose(inv["conv1"].feature_error, err, rtol=1e-3)
    assert inv["conv1"].feature_error.max() < 0.1
    assert inv["conv1"].pixel_error.max() < inv["conv4"].pixel_error.min()
    assert _rises(-inv["conv1"].losses["loss"])


@requires_shared
def test_squeezenet_inversion_early_layer_reconstructs(client):
    model = client.model("squeezenet")
    cat = SHARED_IMAGES / "skimage_chelsea_cat.png"
    # conv1 is cheap (the graph stops there); the class scores need the whole net, so fewer steps
    early = client.invert(model, cat, "conv1_2", steps=100)
    late = client.invert(model, cat, "pool10_1", steps=15)
    assert early.feature_error[0, 0] < 0.1
    assert early.pixel_error[0, 0] < 0.25 * late.pixel_error[0, 0]


@requires_shared
def test_squeezenet_maximization_few_steps(client):
    model = client.model("squeezenet")
    r = client.maximize(model, Objective.channel("fire6/expand3x3_1", 10), steps=12)
    assert r.images.shape == (1, 224, 224, 3)
    assert _rises(r.losses["objective"])
    got = _channel_mean(client, model, r.x, "fire6/expand3x3_1", 10)
    np.testing.assert_allclose(r.terms[:, 0], got, rtol=1e-3, atol=1e-3)


def _dead_at_start_model() -> bytes:
    """act[:, 0] = relu(sum of the 3x3x3 window - 16): 0 on a grey start (13.5 - 16) and on the
    loop's start images near it, positive on bright patches (up to 27 - 16); act[:, 1] an ordinary unit."""
    import onnx
    from onnx import helper, numpy_helper

    w = np.zeros((2, 3, 3, 3), np.float32)
    w[0] = 1.0
    w[1] = np.random.default_rng(5).standard_normal((3, 3, 3))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv"),
             helper.make_node("Relu", ["conv"], ["act"], name="relu"),
             helper.make_node("GlobalAveragePool", ["act"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["logits"], name="flatten")]
    graph = helper.make_graph(nodes, "dead", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-16.0, 0.0], np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def test_a_unit_inactive_at_the_start_is_still_maximized(client):
    """Lucid's redirected ReLU gradient: the channel is 0 on the start image, so its exact gradient
    is zero and the loop never moved (objective 0 after every step, a grey image: SqueezeNet's
    fire9/concat_1 channels from the README); the images whose gradient is zero take the
    redirected one until the unit is active, then the exact one."""
    model = client.load_model(_dead_at_start_model(), name="dead-at-start",
                              config={"input": {"value_range": [0, 1]}})
    try:
        start = client.activations(model, np.full((1, 3, 16, 16), 0.5, np.float32), ["act"])["act"]
        assert not start[:, 0].any()
        r = client.maximize(model, Objective.channel("act", 0), steps=40, batch=2)
        assert r.losses["objective"][0] == 0   # inactive on the loop's own start images
        assert (r.objective > 0).all()
        assert 0 < int(r.text["redirected_steps"]) <= 16   # until the unit is active, at most 16 steps (Lucid)
        got = _channel_mean(client, model, r.x, "act", 0)
        np.testing.assert_allclose(r.terms[:, 0], got, rtol=1e-4, atol=1e-4)
        assert _rises(r.losses["objective"])
    finally:
        client.unload(model.id)


def test_cli_maximize_classmodel_invert(server, tmp_path, digit_images):
    from vis_client.cli import main

    a = ["--address", server.address]
    assert main(a + ["maximize", "digits", "--layer", LAYER, "--channel", "2", "--steps", "4",
                     "--snapshot-every", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "conv3_2_00.png").is_file() and (tmp_path / "snapshots" / "conv3_2_00_step00004.png").is_file()
    assert len((tmp_path / "conv3_2_losses.csv").read_text().splitlines()) == 5
    assert main(a + ["classmodel", "digits", "--class", "4", "--steps", "3", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "class_4_00.png").is_file()
    assert main(a + ["invert", "digits", "--images", str(digit_images[0]), "--layers", "conv1", "conv4",
                     "--steps", "3", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "invert_conv4_00.png").is_file() and (tmp_path / "reference.png").is_file()
    assert main(a + ["maximize", "digits", "--layer", "nope", "--channel", "0", "--steps", "2",
                     "--out", str(tmp_path)]) == 1
