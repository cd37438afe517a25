"""Image priors as (value per image, gradient) pairs in numpy.

Each function takes images [B, C, H, W] and returns (values [B], gradient of
values.sum() w.r.t. the images). Weights are applied by the caller.
"""
from __future__ import annotations

import numpy as np


def l2(d: np.ndarray, center: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """mean((d - center)^2) per image (L2 decay towards mid-grey)."""
    r = d - center
    n = r[0].size
    return (r.reshape(len(r), -1) ** 2).sum(axis=1) / n, 2.0 * r / n


def alpha_norm(z: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """sum(|z|^alpha) / (H W) per image (Mahendran & Vedaldi's bounded-range prior; z = u / B)."""
    hw = z.shape[-2] * z.shape[-1]
    a = np.abs(z)
    vals = (a.reshape(len(z), -1) ** alpha).sum(axis=1) / hw
    grad = alpha * a ** (alpha - 1.0) * np.sign(z) / hw
    return vals, grad


def _diffs(x: np.ndarray):
    # forward differences, zero at the last row / column (replicated border)
    dy = np.zeros_like(x)
    dx = np.zeros_like(x)
    dy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    dx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return dy, dx


def _diffs_adjoint(gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    g = np.zeros_like(gy)
    g[..., 1:, :] += gy[..., :-1, :]
    g[..., :-1, :] -= gy[..., :-1, :]
    g[..., :, 1:] += gx[..., :, :-1]
    g[..., :, :-1] -= gx[..., :, :-1]
    return g


def total_variation(x: np.ndarray, beta: float = 2.0, norm: float = 1.0, eps: float = 1e-8,
                    denominator: str = "hw") -> tuple[np.ndarray, np.ndarray]:
    """TV^beta: sum over c, i, j of ((dx^2 + dy^2) / norm^2 + eps)^(beta / 2), divided by H W
    ("hw", Mahendran & Vedaldi) or by C H W ("chw", a per-pixel mean)."""
    dy, dx = _diffs(x)
    s = (dy ** 2 + dx ** 2) / norm ** 2 + eps
    den = x.shape[-2] * x.shape[-1] * (x.shape[-3] if denominator == "chw" else 1)
    vals = (s.reshape(len(x), -1) ** (beta / 2.0)).sum(axis=1) / den
    ds = (beta / 2.0) * s ** (beta / 2.0 - 1.0) / den / norm ** 2  # d/ds
    return vals, _diffs_adjoint(2.0 * ds * dy, 2.0 * ds * dx)


def gram_diversity(acts: np.ndarray) -> tuple[float, np.ndarray]:
    """Lucid's diversity: sum over i != j of <G_i, G_j> / B with G_b the L2-normalized Gram
    matrix of the channels of acts[b] ([B, C, H, W]). Numpy reference of the graph head
    in `objectives.py` (the loop uses the head; this checks it)."""
    b, c = acts.shape[:2]
    f = acts.reshape(b, c, -1).astype(np.float64)
    g = np.einsum("bcp,bdp->bcd", f, f).reshape(b, -1)
    norm = np.sqrt((g ** 2).sum(axis=1, keepdims=True) + 1e-10)
    gn = g / norm
    s = gn @ gn.T
    off = 1.0 - np.eye(b)
    value = float((s * off).sum() / b)
    dgn = 2.0 * (off @ gn) / b                       # d value / d gn (s symmetric)
    dg = (dgn - gn * (dgn * gn).sum(axis=1, keepdims=True)) / norm
    dg = dg.reshape(b, c, c)
    df = np.einsum("bcd,bdp->bcp", dg + dg.transpose(0, 2, 1), f)
    return value, df.reshape(acts.shape)
