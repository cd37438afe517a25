"""Data for the embedded ``digits`` default model (shared by the training script and tests).

scikit-learn's ``load_digits`` images are 8x8, intensity 0..16 with ink = high, i.e. a
white-ish digit on a black background.  Here each image is scaled to 0..255, upsampled to
32x32 with a deterministic bilinear filter (half-pixel centres, edge clamp) and rounded to
``uint8``.  The network input is exactly ``(u8 / 255 - mean) / std``, so a 32x32 grayscale
PNG of these pixels, preprocessed with ``config.json``, reproduces the training input
bit for bit.
"""
from __future__ import annotations

import numpy as np

SIZE = 32
SPLIT_SEED = 0
TEST_SIZE = 0.25


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] interpolation matrix (align_corners=False, clamp at the edges)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    m[np.arange(n_out), i0] += 1.0 - w
    m[np.arange(n_out), i1] += w
    return m


def load_digits_u8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (images uint8 [N, 32, 32], labels int64 [N])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float64) * (255.0 / 16.0)  # [N, 8, 8], 0..255
    a = _bilinear_matrix(8, SIZE)
    up = np.einsum("oi,nij,pj->nop", a, x, a)
    u8 = np.clip(np.rint(up), 0, 255).astype(np.uint8)
    return u8, d.target.astype(np.int64)


def split_indices(n_or_labels: np.ndarray, *, seed: int = SPLIT_SEED,
                  test_size: float = TEST_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test index split (fixed seed) over the labels array."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(n_or_labels)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_size, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(te)


def load_split() -> dict[str, np.ndarray]:
    """{'x_train','y_train','idx_train','x_test','y_test','idx_test'}; x are uint8 [N,32,32]."""
    u8, y = load_digits_u8()
    tr, te = split_indices(y)
    return {"x_train": u8[tr], "y_train": y[tr], "idx_train": tr,
            "x_test": u8[te], "y_test": y[te], "idx_test": te}


def to_input(u8: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 [N, 32, 32] -> float32 NCHW network input, (x/255 - mean)/std."""
    x = u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(mean)) / np.float32(std)
    return x[:, None, :, :].astype(np.float32)
