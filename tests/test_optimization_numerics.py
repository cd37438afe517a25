"""Gradients and adjoints of the optimization loops' numpy parts (pure numpy, fast).

Every regularizer gradient is checked against central finite differences, every
linear map (parameterizations before the sigmoid, the pixel map, the transforms)
with the adjoint identity <A v, w> = <v, A^T w>, and the full parameterization
chains (with the sigmoid) against directional differences.
"""
from __future__ import annotations

import numpy as np
import pytest

from vis_service.methods.optimization import regularizers
from vis_service.methods.optimization.optimizers import Optimizer, OptimizerSettings, learning_rate
from vis_service.methods.optimization.parameterization import (FourierImage, PixelImage, PixelMap, RawImage,
                                                               gaussian_blur)
from vis_service.methods.optimization.transforms import TransformSettings
from vis_service.models.config import ImageSpec

RNG = np.random.default_rng(0)


def _fd_check(fn, x, grad, n=12, eps=1e-6, rtol=1e-5):
    """Central differences of sum(fn(x)) at n random coordinates vs grad."""
    rng = np.random.default_rng(1)
    for _ in range(n):
        idx = tuple(rng.integers(0, s) for s in x.shape)
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num = (fn(xp).sum() - fn(xm).sum()) / (2 * eps)
        assert num == pytest.approx(grad[idx], rel=rtol, abs=1e-7), idx


def _directional(fn, x, grad, eps=1e-6):
    v = np.random.default_rng(2).standard_normal(x.shape)
    num = (fn(x + eps * v) - fn(x - eps * v)) / (2 * eps)
    assert num == pytest.approx(float((grad * v).sum()), rel=1e-5)


def test_l2_gradient():
    d = RNG.random((2, 3, 5, 6))
    _, g = regularizers.l2(d)
    _fd_check(lambda v: regularizers.l2(v)[0], d, g)


@pytest.mark.parametrize("alpha", [6.0, 2.0, 1.5])
def test_alpha_norm_gradient(alpha):
    z = RNG.standard_normal((2, 3, 5, 6))
    vals, g = regularizers.alpha_norm(z, alpha)
    assert vals[0] == pytest.approx((np.abs(z[0]) ** alpha).sum() / 30)
    _fd_check(lambda v: regularizers.alpha_norm(v, alpha)[0], z, g)


@pytest.mark.parametrize("beta,norm,den", [(2.0, 1.0, "hw"), (1.0, 1.0, "chw"), (2.0, 0.3, "hw"), (1.5, 2.0, "hw")])
def test_tv_beta_gradient(beta, norm, den):
    x = RNG.standard_normal((2, 3, 6, 7))
    vals, g = regularizers.total_variation(x, beta, norm=norm, denominator=den)
    # independent value: explicit loops over pixels
    ref = 0.0
    for i in range(6):
        for j in range(7):
            dy = x[0, :, i + 1, j] - x[0, :, i, j] if i < 5 else np.zeros(3)
            dx = x[0, :, i, j + 1] - x[0, :, i, j] if j < 6 else np.zeros(3)
            ref += (((dy ** 2 + dx ** 2) / norm ** 2 + 1e-8) ** (beta / 2)).sum()
    assert vals[0] == pytest.approx(ref / (42 * (3 if den == "chw" else 1)))
    _fd_check(lambda v: regularizers.total_variation(v, beta, norm=norm, denominator=den)[0], x, g)


def test_gram_diversity_gradient():
    acts = RNG.random((3, 4, 3, 3))
    value, g = regularizers.gram_diversity(acts)
    # value: mean cosine similarity of Gram matrices, times (B - 1)
    grams = [a.reshape(4, -1) @ a.reshape(4, -1).T for a in acts]
    cos = [[(gi * gj).sum() / np.linalg.norm(gi) / np.linalg.norm(gj) for gj in grams] for gi in grams]
    assert value == pytest.approx((np.sum(cos) - np.trace(cos)) / 3, rel=1e-6)
    _fd_check(lambda v: np.array([regularizers.gram_diversity(v)[0]]), acts, g)


def _adjoint(apply, adjoint, in_shape, out_shape, rel=1e-9):
    v = RNG.standard_normal(in_shape)
    w = RNG.standard_normal(out_shape)
    assert float((apply(v) * w).sum()) == pytest.approx(float((v * adjoint(w)).sum()), rel=rel)


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (6, 5)])
def test_fourier_linear_part_adjoint(h, w):
    p = FourierImage(2, 3, h, w, np.random.default_rng(0), decay=1.0)
    _adjoint(p.pre_sigmoid_linear, p.pre_sigmoid_linear_adjoint, p.params.shape, (2, 3, h, w))


@pytest.mark.parametrize("cls,decorrelate", [(FourierImage, True), (FourierImage, False), (PixelImage, True),
                                             (PixelImage, False), (RawImage, False)])
def test_parameterization_chain_rule(cls, decorrelate):
    kw = {} if cls is RawImage else {"decorrelate": decorrelate}
    p = cls(2, 3, 6, 7, np.random.default_rng(0), std=0.5, **kw)
    target = RNG.random((2, 3, 6, 7))

    def loss(params):
        p.params = params
        return float(((p.image() - target) ** 2).sum())

    params = p.params.copy()
    d = p.image()
    g = p.backward(2 * (d - target))
    _directional(loss, params, g)
    assert d.min() >= 0 and d.max() <= 1 or cls is RawImage


def test_fourier_blur_is_the_image_blur():
    p = FourierImage(1, 3, 16, 12, np.random.default_rng(0), std=1.0, decorrelate=False)
    before = p.pre_sigmoid_linear(p.params)
    p.blur(1.5)
    np.testing.assert_allclose(p.pre_sigmoid_linear(p.params), gaussian_blur(before, 1.5), atol=1e-10)


@pytest.mark.parametrize("layout,color,invert", [("NCHW", "BGR", False), ("NHWC", "RGB", False),
                                                 ("NCHW", "GRAY", True)])
def test_pixel_map_adjoint_and_values(layout, color, invert):
    c = 1 if color == "GRAY" else 3
    spec = ImageSpec("x", layout, color, (5, 4), "stretch", 5, (0.0, 255.0), (10.0, 20.0, 30.0)[:c],
                     (2.0, 3.0, 4.0)[:c], invert)
    pm = PixelMap(spec)
    d = RNG.random((2, c, 5, 4))
    x = pm.to_model(d).astype(np.float64)
    # independent: pixel -> (inversion) -> colour order -> value range -> mean / std
    px = d * 255.0
    if invert:
        px = 255.0 - px
    if color == "BGR":
        px = px[:, ::-1]
    ref = (px - np.array(spec.mean).reshape(1, -1, 1, 1)) / np.array(spec.std).reshape(1, -1, 1, 1)
    if layout == "NHWC":
        ref = ref.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(pm.from_model(x), d, atol=1e-5)
    offset = pm.to_model(np.zeros_like(d)).astype(np.float64)
    _adjoint(lambda v: pm.to_model(v).astype(np.float64) - offset, pm.to_model_adjoint, d.shape, x.shape, rel=1e-6)  # model space is FP32


@pytest.mark.parametrize("settings", [TransformSettings(jitter=3), TransformSettings(scale=0.2),
                                      TransformSettings(rotate=15), TransformSettings(4, 0.1, 10)])
def test_transform_adjoint(settings):
    draw = settings.draw(np.random.default_rng(3), 2, 9, 11)
    _adjoint(draw.apply, draw.adjoint, (2, 3, 9, 11), (2, 3, 9, 11))


def test_transforms_keep_constant_images_and_shift_exactly():
    draw = TransformSettings(0, 0.1, 20).draw(np.random.default_rng(0), 1, 10, 10)
    np.testing.assert_allclose(draw.apply(np.full((1, 2, 10, 10), 0.3)), 0.3)  # weights sum to 1
    d = RNG.random((1, 1, 6, 6))
    draw = TransformSettings(jitter=2).draw(np.random.default_rng(5), 1, 6, 6)
    np.testing.assert_array_equal(draw.apply(d)[0, 0], np.roll(d[0, 0], tuple(draw.shifts[0]), axis=(0, 1)))


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optimizers_minimize_a_quadratic(name):
    a = np.array([[1.0, 10.0, 0.1]])
    p = np.array([[3.0, -2.0, 5.0]])
    opt = Optimizer(OptimizerSettings(name=name, lr=0.05, schedule="cosine"))
    start = float((a * p ** 2).sum())
    for t in range(300):
        p = opt.step(p, 2 * a * p, learning_rate(opt.s, t, 300))
    assert float((a * p ** 2).sum()) < 0.05 * start


def test_adam_step_is_the_textbook_update():
    """The in-place Adam equals Kingma & Ba's update written out, step after step, and leaves
    the caller's arrays alone."""
    rng = np.random.default_rng(3)
    s = OptimizerSettings(name="adam", lr=0.05, beta1=0.8, beta2=0.95)
    opt = Optimizer(s)
    p = rng.standard_normal((2, 3, 4))
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t in range(1, 6):
        g = rng.standard_normal(p.shape)
        g_before, p_before = g.copy(), p.copy()
        m = s.beta1 * m + (1 - s.beta1) * g
        v = s.beta2 * v + (1 - s.beta2) * g * g
        expected = p - 0.05 * (m / (1 - s.beta1 ** t)) / (np.sqrt(v / (1 - s.beta2 ** t)) + 1e-8)
        p_in = p
        p = opt.step(p_in, g, 0.05)
        np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(g, g_before)
        np.testing.assert_array_equal(p_in, p_before)


def test_learning_rate_schedules():
    s = OptimizerSettings(lr=1.0, schedule="step")
    assert [learning_rate(s, t, 10) for t in (0, 5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.01])
    s = OptimizerSettings(lr=1.0, schedule="cosine")
    assert learning_rate(s, 0, 10) == 1.0 and learning_rate(s, 5, 10) == pytest.approx(0.5)
    assert learning_rate(OptimizerSettings(lr=2.0, schedule="linear"), 5, 10) == pytest.approx(1.0)
