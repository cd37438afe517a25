"""Image parameterizations and the map from display pixels to the model's input space.

Spaces (all arrays NCHW internally):
- display units d = pixel / 255, RGB order (grey models: one channel), nominally [0, 1];
- model space x = the model input, obtained from d by the model's preprocessing
  (inversion, colour order, value range, mean, std, layout) -- a per-channel affine map,
  so its adjoint is a per-channel scale.

A parameterization owns the optimized parameters and maps them to d; `backward`
applies the chain rule (the adjoint of its Jacobian) to dLoss/dd.
- `FourierImage`: Lucid's 1/f-scaled spectrum -> irfft2 -> decorrelated colour -> sigmoid.
- `PixelImage`: one parameter per pixel -> decorrelated colour -> sigmoid.
- `RawImage`: d itself (unbounded; Simonyan et al.'s class models).
"""
from __future__ import annotations

import numpy as np

from ...models.config import ImageSpec

# Lucid's colour correlation (square root of the ImageNet RGB covariance), columns normalized
# so the largest has norm 1: a decorrelated, whitened parameter becomes correlated RGB.
_COLOR_SVD_SQRT = np.array([[0.26, 0.09, 0.02],
                            [0.27, 0.00, -0.05],
                            [0.27, -0.09, 0.03]], dtype=np.float64)
COLOR_CORRELATION = _COLOR_SVD_SQRT / np.max(np.linalg.norm(_COLOR_SVD_SQRT, axis=0))


class PixelMap:
    """d (RGB display units, NCHW) <-> model space (the model input's layout)."""

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        c = spec.channels
        lo, hi = spec.value_range
        mean = np.broadcast_to(np.asarray(spec.mean or (0.0,), np.float64), (c,))
        std = np.broadcast_to(np.asarray(spec.std or (1.0,), np.float64), (c,))
        # model channel k (in model colour order) = scale[k] * d[src[k]] + offset[k]
        sign = -1.0 if spec.invert else 1.0
        self.src = np.arange(c)[::-1].copy() if spec.color == "BGR" else np.arange(c)
        self.scale = sign * (hi - lo) / std
        self.offset = (lo + (hi - lo) * (1.0 if spec.invert else 0.0) - mean) / std
        self.channels = c
        self.size = spec.size

    def _bc(self, v):
        return v.reshape(1, -1, 1, 1)

    def to_model(self, d: np.ndarray) -> np.ndarray:
        x = self._bc(self.scale) * d[:, self.src] + self._bc(self.offset)
        if self.spec.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_model_adjoint(self, g: np.ndarray) -> np.ndarray:
        """dL/dd from dL/dx (x = to_model(d))."""
        g = np.asarray(g, np.float64)
        if self.spec.layout == "NHWC":
            g = g.transpose(0, 3, 1, 2)
        gd = np.empty_like(g)
        gd[:, self.src] = g * self._bc(self.scale)
        return gd

    def from_model(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.spec.layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
        d = np.empty_like(x)
        d[:, self.src] = (x - self._bc(self.offset)) / self._bc(self.scale)
        return d

    @staticmethod
    def to_uint8(d: np.ndarray) -> np.ndarray:
        """[B, C, H, W] display units -> UINT8 [B, H, W, 3] (grey repeated)."""
        px = np.clip(np.rint(np.asarray(d) * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        if px.shape[-1] == 1:
            px = np.repeat(px, 3, axis=-1)
        return np.ascontiguousarray(px)


def _as_complex(p: np.ndarray) -> np.ndarray:
    """[..., 2] (re, im) -> complex [...], a view where the memory allows it."""
    if p.dtype == np.float64 and p.flags.c_contiguous:
        return p.view(np.complex128)[..., 0]
    return p[..., 0] + 1j * p[..., 1]


def sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # overflow-free


def _decorrelate(t: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return np.einsum("cd,bdhw->bchw", matrix, t)


def _gaussian_transfer(h: int, w: int, sigma: float) -> np.ndarray:
    """Fourier transfer function of a circular Gaussian blur (rfft2 layout)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.exp(-2.0 * np.pi ** 2 * sigma ** 2 * (fx ** 2 + fy ** 2))


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Circular Gaussian blur of [..., H, W] (exactly what the Fourier blur does)."""
    h, w = img.shape[-2:]
    return np.fft.irfft2(np.fft.rfft2(img) * _gaussian_transfer(h, w, sigma), s=(h, w))


class _Squashed:
    """Shared tail: t (pre-colour) -> optional decorrelation -> sigmoid."""

    def __init__(self, channels: int, decorrelate: bool):
        self.matrix = COLOR_CORRELATION if (decorrelate and channels == 3) else None

    def _finish(self, t):
        if self.matrix is not None:
            t = _decorrelate(t, self.matrix)
        d = sigmoid(t)
        self._d = d
        return d

    def _finish_backward(self, gd, d):
        gt = gd * d * (1.0 - d)
        if self.matrix is not None:
            gt = _decorrelate(gt, self.matrix.T)
        return gt


class FourierImage(_Squashed):
    """Lucid's `fft_image`: spectrum parameters [B, C, H, W//2+1, 2] (re, im)."""

    kind = "fourier"

    def __init__(self, batch, channels, h, w, rng: np.random.Generator, std=0.01, decay=1.0, decorrelate=True):
        super().__init__(channels, decorrelate)
        self.h, self.w = h, w
        fy = np.fft.fftfreq(h)[:, None]
        fx = np.fft.rfftfreq(w)[None, :]
        freqs = np.sqrt(fx ** 2 + fy ** 2)
        # 1/f^decay: all frequencies start with about equal energy per octave (natural-image statistics)
        self.spectrum_scale = (1.0 / np.maximum(freqs, 1.0 / max(h, w)) ** decay) * np.sqrt(h * w)
        self.params = rng.normal(0.0, std, size=(batch, channels, h, w // 2 + 1, 2))
        # irfft2's adjoint counts the columns that stand for a conjugate pair twice
        pair = np.full(w // 2 + 1, 2.0)
        pair[0] = 1.0
        if w % 2 == 0:
            pair[-1] = 1.0
        # both directions' constant factors, made once (the /4 is exact: a power of two)
        self._forward_scale = self.spectrum_scale / 4.0
        self._adjoint_scale = pair / (h * w) / 4.0 * self.spectrum_scale

    def pre_sigmoid_linear(self, p: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(_as_complex(p) * self._forward_scale, s=(self.h, self.w))

    def pre_sigmoid_linear_adjoint(self, g: np.ndarray) -> np.ndarray:
        z = np.fft.rfft2(g)
        z *= self._adjoint_scale
        return z.view(z.real.dtype).reshape(z.shape + (2,))  # (re, im) pairs, no copy

    def image(self) -> np.ndarray:
        return self._finish(self.pre_sigmoid_linear(self.params))

    def backward(self, gd: np.ndarray) -> np.ndarray:
        return self.pre_sigmoid_linear_adjoint(self._finish_backward(gd, self._d))

    def blur(self, sigma: float) -> None:
        self.params = self.params * _gaussian_transfer(self.h, self.w, sigma)[..., None]


class PixelImage(_Squashed):
    """One parameter per pixel and channel, [B, C, H, W]."""

    kind = "pixel"

    def __init__(self, batch, channels, h, w, rng: np.random.Generator, std=0.01, decorrelate=True):
        super().__init__(channels, decorrelate)
        self.params = rng.normal(0.0, std, size=(batch, channels, h, w))

    def image(self) -> np.ndarray:
        return self._finish(self.params)

    def backward(self, gd: np.ndarray) -> np.ndarray:
        return self._finish_backward(gd, self._d)

    def blur(self, sigma: float) -> None:
        self.params = gaussian_blur(self.params, sigma)


class RawImage:
    """d itself, initialized at mid-grey plus noise; unbounded (clipped only for display)."""

    kind = "raw"

    def __init__(self, batch, channels, h, w, rng: np.random.Generator, std=0.01, center=0.5):
        self.params = center + rng.normal(0.0, std, size=(batch, channels, h, w))

    def image(self) -> np.ndarray:
        return self.params

    def backward(self, gd: np.ndarray) -> np.ndarray:
        return gd

    def blur(self, sigma: float) -> None:
        self.params = gaussian_blur(self.params, sigma)


PARAMETERIZATIONS = ("fourier", "pixel", "raw")


def make_parameterization(kind: str, batch: int, channels: int, h: int, w: int, rng, *, std: float,
                          decay: float, decorrelate: bool):
    if kind == "fourier":
        return FourierImage(batch, channels, h, w, rng, std, decay, decorrelate)
    if kind == "pixel":
        return PixelImage(batch, channels, h, w, rng, std, decorrelate)
    return RawImage(batch, channels, h, w, rng, std)
