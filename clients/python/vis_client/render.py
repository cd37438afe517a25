"""Turn activations, filters and attribution maps into images (needs the ``[render]`` extra:
pillow + matplotlib; matplotlib is used headless through its Agg canvas, never pyplot).

Every function returns the image as a ``uint8`` array (H, W, 3) and also writes a PNG when
``path`` is given. Grids are near-square with 1-pixel separators (``SEPARATOR`` grey).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["feature_map_grid", "rgb_filter_grid", "grey_filter_grid", "channel_filter_grid", "weight_matrix_image",
           "heatmap_overlay", "save_png", "grid_shape", "colorize", "SEPARATOR"]

SEPARATOR = 255  # separator grey level (white)


RENDER_EXTRA = "install the client's render extra: pip install './clients/python[render]' from the repository"


def _mpl():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"rendering needs matplotlib: {RENDER_EXTRA}") from e
    return matplotlib


def require_matplotlib() -> None:
    """ImportError naming the render extra where matplotlib is missing (before any file is written)."""
    _mpl()


def _pil_image():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"rendering needs pillow: {RENDER_EXTRA}") from e
    return Image


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid holding ``n`` tiles (cols >= rows)."""
    if n <= 0:
        return 0, 0
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def colorize(values: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Map values in [0, 1] through a matplotlib colormap to uint8 RGB."""
    try:
        cm = _mpl().colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from None
    rgba = cm(np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def _tile(tiles: np.ndarray, rows: int, cols: int, sep: int = 1) -> np.ndarray:
    """Lay out tiles [n, h, w, 3] in a rows x cols grid with ``sep``-pixel separators."""
    n, h, w = tiles.shape[:3]
    out = np.full((rows * h + (rows - 1) * sep, cols * w + (cols - 1) * sep, 3), SEPARATOR, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + sep):r * (h + sep) + h, c * (w + sep):c * (w + sep) + w] = tiles[i]
    return out


def _upscale(img: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour enlargement of [..., h, w, C] images by ``k``."""
    if k <= 1:
        return img
    return img.repeat(k, axis=-3).repeat(k, axis=-2)


def _finish(img: np.ndarray, path) -> np.ndarray:
    if path is not None:
        save_png(img, path)
    return img


def feature_map_grid(act: np.ndarray, path: str | os.PathLike | None = None, *, cmap: str = "viridis",
                     normalize: str = "per_map", max_maps: int = 64, upscale: int = 1) -> np.ndarray:
    """Grid of feature maps ``act[C, H, W]`` (a leading batch dim of 1 is dropped; a single
    [H, W] map is fine) as colour-mapped tiles.

    ``normalize``: ``"per_map"`` (each map min..max -> 0..1), ``"global"`` (one min..max for
    all maps shown) or ``"none"`` (values clipped to [0, 1]). Only the first ``max_maps``
    channels are shown; ``upscale`` repeats pixels (nearest) to enlarge small maps.
    """
    a = np.asarray(act, dtype=np.float64)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"feature_map_grid expects [C, H, W] (or [1, C, H, W] / [H, W]), got shape {act.shape}")
    if max_maps < 1:
        raise ValueError("max_maps must be >= 1")
    a = np.nan_to_num(a[:max_maps])
    if normalize == "per_map":
        lo = a.min(axis=(1, 2), keepdims=True)
        hi = a.max(axis=(1, 2), keepdims=True)
    elif normalize == "global":
        lo, hi = a.min(), a.max()
    elif normalize == "none":
        lo, hi = 0.0, 1.0
    else:
        raise ValueError(f"normalize must be 'per_map', 'global' or 'none', got {normalize!r}")
    span = np.where(np.asarray(hi - lo) > 0, hi - lo, 1.0)
    tiles = colorize((a - lo) / span, cmap)
    tiles = _upscale(tiles, int(upscale))
    rows, cols = grid_shape(len(tiles))
    return _finish(_tile(tiles, rows, cols), path)


def _symmetric(w: np.ndarray, axes) -> np.ndarray:
    """Scale to [-1, 1] by the max |w| over ``axes`` (0 stays 0)."""
    m = np.abs(w).max(axis=axes, keepdims=True)
    return w / np.where(m > 0, m, 1.0)


def rgb_filter_grid(weight: np.ndarray, path: str | os.PathLike | None = None, upscale: int = 8, *,
                    bgr: bool = False) -> np.ndarray:
    """First-layer filters ``weight[O, 3, kh, kw]`` as colour patches.

    Each filter is normalized symmetrically around 0 on its own: value / max|filter| is
    mapped linearly onto 0..255, so 0 is mid-grey (127.5) and the largest magnitude reaches 0
    or 255. Channels are read as RGB (``bgr=True`` for BGR models such as caffe ones).
    Patches are enlarged ``upscale`` times (nearest) and laid out in a near-square grid.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"rgb_filter_grid expects [O, 3, kh, kw], got shape {w.shape}")
    s = _symmetric(np.nan_to_num(w), (1, 2, 3))
    tiles = np.clip((s + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if bgr:
        tiles = tiles[..., ::-1]
    tiles = _upscale(np.ascontiguousarray(tiles), int(upscale))
    rows, cols = grid_shape(len(tiles))
    return _finish(_tile(tiles, rows, cols), path)


def grey_filter_grid(weight: np.ndarray, path: str | os.PathLike | None = None, upscale: int = 8) -> np.ndarray:
    """First-layer filters of a one-channel (greyscale) input, ``weight[O, 1, kh, kw]``, as grey
    patches: the one-channel counterpart of :func:`rgb_filter_grid`.

    Each filter is normalized symmetrically around 0 on its own (0 -> mid-grey, largest
    magnitude -> black or white). Patches are enlarged ``upscale`` times (nearest) and laid
    out in a near-square grid.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 1:
        raise ValueError(f"grey_filter_grid expects [O, 1, kh, kw], got shape {w.shape}")
    s = _symmetric(np.nan_to_num(w), (1, 2, 3))
    grey = np.clip((s[:, 0] + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    tiles = _upscale(np.repeat(grey[..., None], 3, axis=-1), int(upscale))
    rows, cols = grid_shape(len(tiles))
    return _finish(_tile(tiles, rows, cols), path)


def channel_filter_grid(weight: np.ndarray, path: str | os.PathLike | None = None, max_out: int = 32,
                        max_in: int = 16, *, upscale: int = 4) -> np.ndarray:
    """Deeper-layer filters ``weight[O, I, kh, kw]``: one grey tile per (out, in) pair, a row
    per output filter and a column per input channel (first ``max_out`` x ``max_in``).

    Each output filter is normalized symmetrically around 0 over all its input channels
    (0 -> mid-grey, largest magnitude -> black or white), so tiles in a row are comparable.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim == 3:
        w = w[:, :, None, :]
    if w.ndim != 4:
        raise ValueError(f"channel_filter_grid expects [O, I, kh, kw], got shape {w.shape}")
    if max_out < 1 or max_in < 1:
        raise ValueError("max_out and max_in must be >= 1")
    w = np.nan_to_num(w[:max_out, :max_in])
    o, i = w.shape[:2]
    s = _symmetric(w, (1, 2, 3))
    grey = np.clip((s + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    tiles = np.repeat(grey.reshape(o * i, *grey.shape[2:])[..., None], 3, axis=-1)
    tiles = _upscale(tiles, int(upscale))
    return _finish(_tile(tiles, o, i), path)


def weight_matrix_image(weight: np.ndarray, path: str | os.PathLike | None = None, *, cmap: str = "RdBu_r",
                        upscale: int = 1) -> np.ndarray:
    """A 2-D weight matrix (Gemm / MatMul) as one image, symmetric around 0 (0 = middle colour)."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weight_matrix_image expects a 2-D matrix, got shape {w.shape}")
    s = _symmetric(np.nan_to_num(w), None)
    return _finish(_upscale(colorize((s + 1.0) / 2.0, cmap), int(upscale)), path)


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3, 4):
        img = img.transpose(1, 2, 0)  # CHW -> HWC
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        what = f"a {type(image).__name__}" if img.ndim == 0 else f"shape {img.shape}"
        raise ValueError(f"expected an image [H, W], [H, W, 3|4] or [3, H, W] (array or PIL image), got {what}")
    img = img[..., :3]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.dtype != np.uint8:
        f = np.nan_to_num(img.astype(np.float64))
        if f.max(initial=0) <= 1.0 and f.min(initial=0) >= 0.0:
            f = f * 255.0
        img = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    return img


def _resize(heat: np.ndarray, h: int, w: int) -> np.ndarray:
    if heat.shape == (h, w):
        return heat
    Image = _pil_image()
    return np.asarray(Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32)).resize((w, h), Image.BILINEAR),
                      dtype=np.float64)


def heatmap_overlay(image_rgb_uint8: np.ndarray, heat: np.ndarray, path: str | os.PathLike | None = None,
                    cmap: str = "jet", alpha: float = 0.5, colorbar: bool = True, *,
                    vmin: float | None = None, vmax: float | None = None, label: str | None = None,
                    min_height: int = 128) -> np.ndarray:
    """Overlay a heat map on an image: ``(1 - alpha) * image + alpha * cmap(heat)``.

    ``heat[H', W']`` is resized (bilinear) to the image size and normalized by ``vmin``/``vmax``
    (default: its own min / max). Without a colour bar the result has the image's shape
    [H, W, 3]. With ``colorbar=True`` a matplotlib colour bar (in heat units, titled
    ``label``) is drawn to the right, so the result is wider; images lower than
    ``min_height`` are first enlarged by an integer factor so the labels fit.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be within [0, 1]")
    img = _to_rgb_uint8(image_rgb_uint8)
    hm = np.asarray(heat, dtype=np.float64)
    while hm.ndim > 2 and hm.shape[0] == 1:
        hm = hm[0]
    if hm.ndim != 2:
        raise ValueError(f"heat must be [H, W], got shape {np.shape(heat)}")
    hm = np.nan_to_num(_resize(hm, *img.shape[:2]))
    lo = float(hm.min()) if vmin is None else float(vmin)
    hi = float(hm.max()) if vmax is None else float(vmax)
    span = hi - lo if hi > lo else 1.0
    colours = colorize((hm - lo) / span, cmap).astype(np.float64)
    out = np.clip((1.0 - alpha) * img + alpha * colours + 0.5, 0, 255).astype(np.uint8)
    if colorbar:
        out = _with_colorbar(out, lo, hi if hi > lo else lo + 1.0, cmap, label, min_height)
    return _finish(out, path)


def _with_colorbar(img: np.ndarray, lo: float, hi: float, cmap: str, label: str | None,
                   min_height: int) -> np.ndarray:
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    k = max(1, math.ceil(min_height / img.shape[0]))
    img = _upscale(img, k)
    h, w = img.shape[:2]
    dpi = 100
    extra = 72 if label else 60
    total_w = w + extra
    fig = Figure(figsize=(total_w / dpi, h / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    fig.figimage(img, xo=0, yo=0, origin="upper")
    cax = fig.add_axes([(w + 6) / total_w, 0.06, 10 / total_w, 0.88])
    cb = fig.colorbar(ScalarMappable(norm=Normalize(lo, hi), cmap=cmap), cax=cax)
    cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.2g}"))
    cb.ax.tick_params(labelsize=7, length=2, pad=1)
    if label:
        cb.set_label(label, fontsize=7, labelpad=2)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an image array as PNG (uint8 [H, W], [H, W, 3] or [H, W, 4]; float images in
    [0, 1] are scaled to 0..255). Parent directories are created. Returns the path."""
    Image = _pil_image()
    a = np.asarray(array)
    if a.dtype != np.uint8:
        f = np.nan_to_num(a.astype(np.float64))
        if f.size and f.min() >= 0.0 and f.max() <= 1.0:
            f = f * 255.0
        a = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"save_png expects [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(p, format="PNG")
    return p
