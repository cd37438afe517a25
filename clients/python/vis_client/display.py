"""Model inputs back to displayable images (numpy only; no rendering extra needed)."""
from __future__ import annotations

import numpy as np


def display_image(x: np.ndarray, color: str = "") -> np.ndarray:
    """A preprocessed model input ([C, H, W] or [H, W, C]) as uint8 RGB [H, W, 3].

    Model-space values are mapped back to 0..255 by one linear map per image
    (min -> 0, max -> 255): exact for any mean/std normalization up to contrast.
    BGR inputs are flipped to RGB; one-channel inputs become grey.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if color.upper() == "BGR":
        a = a[..., ::-1]
    lo, hi = a.min(), a.max()
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return (a * 255 + 0.5).astype(np.uint8)


def model_color(model, preset: str | None = None) -> str:
    """Channel order of a model's image input, from a preset or the model's config."""
    if preset:
        return "BGR" if preset == "caffe" else "RGB"
    config = getattr(model, "config", None) or {}
    color = str((config.get("input") or {}).get("color", "") or "").upper()
    return color or ("BGR" if config.get("preset") == "caffe" else "RGB")
