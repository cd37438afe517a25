"""Runs of stacked copies: what each model input gets per row, and models with a fixed batch.

SmoothGrad, IG, occlusion, Score-CAM, Ablation-CAM and deconvnet stack perturbed copies of the
request's images along the batch dimension, in runs of their own size. Two model properties decide
how a run is fed:

- an input other than the image input has the batch dimension only when its first dimension is the
  image input's (the same symbol or size; where not static, as long as the image batch): those get
  the row of each copy's image; the others (a scale of shape [1], a lookup table) have no batch
  dimension and every run gets them unchanged (copying them per row gave onnxruntime shapes the
  model does not take);
- an image input with a fixed batch (one other than 1 as exported; or 1 where `prepare_model`
  could not make it symbolic) runs exactly that many rows: each run is padded to it with copies of its
  last row (real inputs, so the padded rows compute nothing unusual) or, for a cotangent, zeros (so
  they add nothing to a gradient summed over the batch), and the padded rows' results are dropped.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import InvalidArgument
from ..models.inputs import first_dim
from ..models.store import LoadedModel


def fixed_batch(model: LoadedModel) -> int | None:
    """The image input's fixed batch, or None where the batch is free. A fixed 1 remains where
    `prepare_model` could not free a batch the exporter hard-coded (it then keeps the input at 1):
    such a model runs one row at a time."""
    info = model.infos.get(model.image_input)
    d = first_dim(model, model.image_input)
    return d if isinstance(d, int) and d >= 1 and len(info.shape) >= 2 else None


def run_size(model: LoadedModel, size: int) -> int:
    """Rows per run: the model's fixed batch where it has one, else `size`."""
    return fixed_batch(model) or size


def row_inputs(model: LoadedModel, feeds: dict[str, np.ndarray]) -> set[str]:
    """The inputs fed one row per image (see the module docstring), the image input included."""
    image = model.image_input
    n = feeds[image].shape[0]
    first = first_dim(model, image)
    out = {image}
    for name, v in feeds.items():
        if name == image or v.ndim == 0:
            continue
        d = first_dim(model, name)
        if (d is not None and d == first) or (not isinstance(d, int) and v.shape[0] == n):
            out.add(name)
    return out


def padded(model: LoadedModel, a: np.ndarray, zeros: bool = False) -> np.ndarray:
    """The rows of one run padded to the model's fixed batch (unchanged without one): copies of the
    last row, or `zeros` (cotangents)."""
    fixed = fixed_batch(model)
    if fixed is None or len(a) >= fixed:
        return a
    fill = np.zeros((fixed - len(a),) + a.shape[1:], a.dtype) if zeros else np.repeat(a[-1:], fixed - len(a), axis=0)
    return np.concatenate([a, fill])


def row_feeds(model: LoadedModel, feeds: dict[str, np.ndarray], rows: np.ndarray,
              image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds of one run: row `rows[k]` of each batched input (the image input's rows replaced by
    `image` where given), the other inputs unchanged; padded to a fixed batch."""
    per_row = row_inputs(model, feeds)
    out = {}
    for name, v in feeds.items():
        if name == model.image_input and image is not None:
            out[name] = padded(model, image)
        else:
            out[name] = padded(model, v[rows]) if name in per_row else v
    return out


def require_batched_image(model: LoadedModel, x: np.ndarray, method: str) -> None:
    """INVALID_ARGUMENT on `input` for an image input without a batch dimension (rank < 2: a model
    input's first dimension is its batch only from rank 2 on, as `prepare_model` reads it)."""
    if x.ndim < 2:
        raise InvalidArgument("input", f"input {model.image_input!r} has shape {list(x.shape)}, without a batch "
                                       f"dimension; {method} need a batch of images [N, ...] (an input of rank 2 "
                                       "or more)")


def balanced_chunk(total: int, chunk: int) -> int:
    """Rows per run for `total` rows at most `chunk` per run, spread evenly over the same number
    of runs (52 rows at <= 10 per run: 6 runs of 9, not 5 of 10 and one of 2)."""
    if total <= 0:
        return max(1, chunk)
    runs = -(-total // max(1, chunk))
    return -(-total // runs)


def chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(total, start + size))
