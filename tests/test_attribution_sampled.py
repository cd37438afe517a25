"""AttributionService: SmoothGrad / VarGrad, Integrated Gradients, progress streaming and cancellation."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import SHARED_IMAGES, requires_shared
from vis_client.errors import Cancelled


@pytest.fixture(scope="module")
def images(digit_images):
    return [str(p) for p in digit_images[:3]]


def _noisy_inputs(x, samples, noise, seed):
    """The documented SmoothGrad noise (vis_service/methods/smoothgrad.py), recomputed here."""
    out = []
    for i in range(x.shape[0]):
        sigma = noise * float(x[i].max().astype(np.float64) - x[i].min().astype(np.float64))
        eps = np.random.default_rng(seed).standard_normal((samples,) + x.shape[1:], dtype=np.float32)
        out.append(x[i] + np.float32(sigma) * eps)
    return np.stack(out)                                  # [N, S, ...]


def test_noise_stream_is_noise_for_in_any_chunking():
    """SmoothGrad draws its noise run by run; in whatever runs, the rows are noise_for's."""
    from vis_service.methods.smoothgrad import _NoiseStream, noise_for
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 4)).astype(np.float32)
    samples, seed = 7, 11
    expected = np.concatenate([noise_for(x[i], samples, seed) for i in range(3)])
    for sizes in ([21], [1] * 21, [5, 5, 5, 6], [7, 7, 7], [3, 10, 8]):
        stream, got, start = _NoiseStream(x, samples, seed), [], 0
        for size in sizes:
            got += [e for _, e in stream.rows(np.arange(start, start + size))]
            start += size
        np.testing.assert_array_equal(np.stack(got), expected)


def test_noise_stream_of_a_channels_last_input_is_the_channels_first_noise_transposed():
    from vis_service.methods.smoothgrad import _NoiseStream
    x = np.zeros((2, 3, 5, 4), np.float32)
    first = np.stack([e for _, e in _NoiseStream(x, 4, 9, 1).rows(np.arange(8))])
    last = np.stack([e for _, e in _NoiseStream(x.transpose(0, 2, 3, 1), 4, 9, 3).rows(np.arange(8))])
    np.testing.assert_array_equal(last, first.transpose(0, 2, 3, 1))


def test_smoothgrad_of_an_image_does_not_depend_on_its_batch(client, digits, images):
    """The noise is the request's, not the batch position's: an image alone, or twice in a batch
    with others, gets the same map."""
    kw = dict(samples=4, noise=0.2, seed=5)
    alone = client.smoothgrad(digits, [images[1]], **kw)
    batched = client.smoothgrad(digits, [images[0], images[1], images[2], images[1]], **kw)
    np.testing.assert_allclose(batched.attribution[1], alone.attribution[0], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(batched.attribution[3], alone.attribution[0], rtol=1e-5, atol=1e-8)


def test_smoothgrad_without_noise_is_the_gradient(client, digits, images):
    a = client.smoothgrad(digits, images, samples=3, noise=0.0, batch=2)
    g = client.gradient(digits, images).gradient
    np.testing.assert_allclose(a.attribution, g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.map, np.abs(g).max(axis=1), rtol=1e-5, atol=1e-7)


def test_smoothgrad_and_vargrad_match_a_loop_over_gradients(client, digits, images):
    samples, noise, seed = 6, 0.2, 7
    sg = client.smoothgrad(digits, images, samples=samples, noise=noise, seed=seed, batch=4)
    vg = client.smoothgrad(digits, images, samples=samples, noise=noise, seed=seed, vargrad=True, batch=5)
    noisy = _noisy_inputs(sg.input, samples, noise, seed)
    for i in range(len(images)):
        # the target stays the clean image's top-1 class for every noisy copy
        g = client.gradient(digits, noisy[i], int(sg.target_index[i])).gradient.astype(np.float64)
        np.testing.assert_allclose(sg.attribution[i], g.mean(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(vg.attribution[i], g.var(axis=0), rtol=1e-3, atol=1e-7)
    again = client.smoothgrad(digits, images, samples=samples, noise=noise, seed=seed, batch=3)
    np.testing.assert_array_equal(again.attribution, sg.attribution)     # fixed seed, any chunking
    other = client.smoothgrad(digits, images, samples=samples, noise=noise, seed=seed + 1)
    assert not np.allclose(other.attribution, sg.attribution)


def test_integrated_gradients_completeness_on_digits(client, digits, images):
    a = client.integrated_gradients(digits, images, steps=64, memory_budget_bytes=1 << 20)
    d, gap = a.extra["delta"], a.extra["completeness_gap"]
    np.testing.assert_allclose(gap, np.abs(a.attribution.reshape(3, -1).sum(1) - d), rtol=1e-4, atol=1e-5)
    # f(x) is the class score; f(black) comes from a black image through the model's preprocessing
    g = client.gradient(digits, images)
    np.testing.assert_allclose(a.extra["objective"], g.objective, rtol=1e-5)
    black = client.gradient(digits, np.broadcast_to(a.extra["baseline"][:1], a.input.shape).copy(),
                            list(g.target_index)).objective
    np.testing.assert_allclose(a.extra["objective_baseline"], black, rtol=1e-5, atol=1e-5)
    mean, std = digits.config["input"]["mean"][0], digits.config["input"]["std"][0]
    np.testing.assert_allclose(a.extra["baseline"], (0 - mean) / std, rtol=1e-6)
    assert "black" in a.text["baseline"]
    assert (gap <= 0.01 * np.abs(d) + 0.05).all(), (gap, d)   # small absolute gaps where f(x) ~ f(b)
    # zero baseline: delta is f(x) - f(0)
    z = client.integrated_gradients(digits, images, steps=8, baseline="zero")
    f0 = client.gradient(digits, np.zeros_like(a.input), list(g.target_index)).objective
    np.testing.assert_allclose(z.extra["delta"], g.objective - f0, rtol=1e-4, atol=1e-4)


def test_integrated_gradients_custom_and_blurred_baselines(client, digits, images):
    x = client.activations(digits, images, ["input"])["input"]
    custom = np.full(x.shape[1:], 0.5, np.float32)
    a = client.integrated_gradients(digits, x, steps=4, baseline_tensor=custom)
    np.testing.assert_array_equal(a.extra["baseline"], np.broadcast_to(custom, x.shape))
    b = client.integrated_gradients(digits, x, steps=4, baseline="blurred", blur_sigma=2.0)
    base = b.extra["baseline"]
    assert base.shape == x.shape and base.std() < x.std()                 # smoother than the input
    np.testing.assert_allclose(base.mean(axis=(2, 3)), x.mean(axis=(2, 3)), rtol=0.05, atol=0.05)


@requires_shared
@pytest.mark.parametrize("name", ["resnet20", "squeezenet"])
def test_integrated_gradients_completeness_on_trained_models(client, name):
    model = client.model(name)
    a = client.integrated_gradients(model, [str(SHARED_IMAGES / "skimage_chelsea_cat.png")], steps=64)
    d, gap = float(a.extra["delta"][0]), float(a.extra["completeness_gap"][0])
    assert abs(d) > 1.0
    assert gap <= 0.01 * abs(d), (gap, d)


def test_progress_streams_until_total(client, digits, images):
    seen = []
    client.smoothgrad(digits, images, samples=8, batch=4, on_progress=lambda p: seen.append((p.done, p.total)))
    assert len(seen) >= 3 and seen[-1] == (24, 24)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    seen.clear()
    client.integrated_gradients(digits, images, steps=10, batch=8, on_progress=lambda p: seen.append((p.done, p.total)))
    total = 3 * 10                           # path points; f(x) and f(baseline) come from forward runs
    assert seen[-1] == (total, total) and len(seen) >= total // 8


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_cancel_mid_call_stops_promptly(client, digits, images, method):
    cancel = threading.Event()

    def on_progress(p):
        if p.done > 0:
            cancel.set()

    kwargs = dict(samples=20000) if method == "smoothgrad" else dict(steps=20000)
    start = time.monotonic()
    with pytest.raises(Cancelled):
        getattr(client, method)(digits, images, batch=2, on_progress=on_progress, cancel=cancel, **kwargs)
    assert time.monotonic() - start < 10
    # the server's worker thread stops at its next progress update instead of running on
    deadline = time.monotonic() + 5
    while any(t.name == "vis-method" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "vis-method" for t in threading.enumerate())
    # the server is healthy and answers the next call
    assert client.smoothgrad(digits, images[:1], samples=2).map.shape == (1, 32, 32)


def test_rows_are_spread_evenly_over_runs():
    from vis_service.methods.attribution_common import balanced_chunk
    for total in range(1, 80):
        for chunk in range(1, 20):
            even = balanced_chunk(total, chunk)
            runs = -(-total // chunk)
            assert even <= chunk and -(-total // even) == runs, (total, chunk, even)
            assert even * runs - total < runs                    # the runs differ by at most one row
    assert balanced_chunk(52, 10) == 9


def test_integrated_gradients_the_same_at_any_rows_per_run(client, digits, images):
    one = client.integrated_gradients(digits, images, steps=17, batch=1)
    many = client.integrated_gradients(digits, images, steps=17, batch=10)
    assert "1 rows per run" in one.text["rule"] and "9 rows per run" in many.text["rule"]   # 51 rows: 6 runs of 8-9, not 5 of 10 + 1
    np.testing.assert_allclose(many.attribution, one.attribution, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_is_the_quadrature_of_gradients_on_the_path(client, digits, images, rule):
    """IG = (x - b) * sum_k w_k grad f(b + a_k (x - b)), the path gradients taken one call each."""
    from vis_service.methods.integrated_gradients import quadrature

    x = client.activations(digits, images[:2], ["input"])["input"]
    base = np.random.default_rng(3).uniform(-1, 1, x.shape[1:]).astype(np.float32)
    steps = 5
    ig = client.integrated_gradients(digits, x, [4, 7], steps=steps, baseline_tensor=base, rule=rule, batch=3)
    alphas, weights = quadrature(steps, rule)
    total = np.zeros(x.shape)
    for a, w in zip(alphas, weights):
        point = (base + a * (x.astype(np.float64) - base)).astype(np.float32)
        total += w * client.gradient(digits, point, [4, 7]).gradient
    np.testing.assert_allclose(ig.attribution, (x - base.astype(np.float64)) * total, rtol=1e-4, atol=1e-6)
