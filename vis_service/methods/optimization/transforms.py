"""Random transformations of the image before each step (Lucid's transformation robustness).

Applied in numpy to the display-space image d [B, C, H, W] before it is mapped to the
model's input space (the map is a per-channel affine one, so the order does not matter);
the gradient goes back through the exact adjoint of each transform:
- jitter: a circular shift by (dy, dx) per image; adjoint = the inverse shift;
- scale + rotation: one affine bilinear resampling about the image centre with
  edge clamping, out = S x where S is a sparse matrix with 4 entries per output pixel;
  adjoint = S^T g (a scatter-add, done with np.bincount).
Transforms stay out of the ONNX graph so the cached forward+backward graph is the
model's own and any image size works; their cost is small next to the network's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TransformDraw:
    """One step's random transform for a batch of images."""

    shifts: np.ndarray            # [B, 2] integer (dy, dx)
    sampling: list | None = None  # per image: (idx [4, HW], weights [4, HW]) or None for identity

    def apply(self, d: np.ndarray) -> np.ndarray:
        out = np.empty_like(d)
        b, c, h, w = d.shape
        for i in range(b):
            img = np.roll(d[i], tuple(self.shifts[i]), axis=(-2, -1))
            if self.sampling is not None and self.sampling[i] is not None:
                idx, wts = self.sampling[i]
                flat = img.reshape(c, h * w)
                img = (flat[:, idx] * wts).sum(axis=1).reshape(c, h, w)
            out[i] = img
        return out

    def adjoint(self, g: np.ndarray) -> np.ndarray:
        out = np.empty_like(g)
        b, c, h, w = g.shape
        n = h * w
        for i in range(b):
            img = g[i]
            if self.sampling is not None and self.sampling[i] is not None:
                idx, wts = self.sampling[i]
                # S^T g: every output pixel sends its gradient back to its 4 source pixels
                flat = img.reshape(c, 1, n) * wts  # [C, 4, HW]
                offs = (np.arange(c) * n)[:, None, None] + idx[None]
                img = np.bincount(offs.ravel(), weights=flat.ravel(), minlength=c * n).reshape(c, h, w)
            out[i] = np.roll(img, tuple(-s for s in self.shifts[i]), axis=(-2, -1))
        return out


def bilinear_affine(h: int, w: int, scale: float, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Sampling indices [4, HW] and weights [4, HW] for zoom by `scale` and rotation about the centre."""
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64) - cy, np.arange(w, dtype=np.float64) - cx, indexing="ij")
    a = np.deg2rad(angle_deg)
    # output pixel p samples the input at R(-a) p / scale (the inverse map)
    sy = (np.cos(a) * yy - np.sin(a) * xx) / scale + cy
    sx = (np.sin(a) * yy + np.cos(a) * xx) / scale + cx
    sy = np.clip(sy, 0, h - 1).ravel()
    sx = np.clip(sx, 0, w - 1).ravel()
    y0 = np.minimum(np.floor(sy).astype(np.int64), h - 2 if h > 1 else 0)
    x0 = np.minimum(np.floor(sx).astype(np.int64), w - 2 if w > 1 else 0)
    fy, fx = sy - y0, sx - x0
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    idx = np.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])
    wts = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    return idx, wts


@dataclass
class TransformSettings:
    jitter: int = 0        # max |shift| in pixels
    scale: float = 0.0     # zoom uniform in [1 - scale, 1 + scale]
    rotate: float = 0.0    # degrees, uniform in [-rotate, rotate]

    @property
    def active(self) -> bool:
        return self.jitter > 0 or self.scale > 0 or self.rotate > 0

    def draw(self, rng: np.random.Generator, batch: int, h: int, w: int) -> TransformDraw:
        j = int(self.jitter)
        shifts = rng.integers(-j, j + 1, size=(batch, 2)) if j > 0 else np.zeros((batch, 2), np.int64)
        sampling = None
        if self.scale > 0 or self.rotate > 0:
            sampling = []
            for _ in range(batch):
                s = 1.0 + rng.uniform(-self.scale, self.scale) if self.scale > 0 else 1.0
                a = rng.uniform(-self.rotate, self.rotate) if self.rotate > 0 else 0.0
                sampling.append(bilinear_affine(h, w, s, a))
        return TransformDraw(shifts, sampling)
