"""What the pixel-attribution methods share: the input tensor, the target's cotangent,
batched gradient runs over many perturbed copies, channel reductions and IG baselines.

Every method here differentiates one objective: <objective tensor, cotangent>, with the
cotangent fixed by the *unperturbed* input (the top-1 class of the clean image stays the
target for every noisy or interpolated copy of it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from ..errors import InvalidArgument
from ..gen import vis_pb2
from ..graph.loading import BATCH_DIM
from ..models.config import ImageSpec, resolve_image_spec
from ..models.inputs import image_dims_at
from ..models.preprocess import image_to_array
from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from . import batching, limits
from .batching import balanced_chunk, chunks  # noqa: F401 - used here and by the attribution methods
from .activations import compute_activations
from .gradient import (Objective, make_cotangent, objective_tensor_name, require_finite, resolve_wrt,
                       run_gradient)
from .progress import NO_PROGRESS, MethodResult, Progress
from .targets import require_from_image

MiB = 1 << 20
# ResNet-50 (torchvision): ~19 rows per run by the per-sample estimate, which counts ~2.3x what
# onnxruntime really holds (~0.8 GiB peak at 17 rows). Per-row time falls with the rows per run:
# 50-step IG measured 4-10 % faster at 17-25 rows than at 9 (and 20-25 % faster at 9 than at 1)
DEFAULT_MEMORY_BUDGET = 2048 * MiB
DEFAULT_MAX_BATCH = 64          # rows per onnxruntime run when the request gives no `batch`
# per-sample bytes of a forward+backward run when the graph's activation shapes are unknown
UNKNOWN_SHAPE_FACTOR = 64


@dataclass
class AttributionInput:
    """The preprocessed input batch and the target every copy of it is differentiated for."""

    feeds: dict[str, np.ndarray]
    image_input: str
    objective_tensor: str
    cotangent: np.ndarray | None     # [N, ...] shaped like the objective tensor; None = top-1, not yet known
    target_index: np.ndarray | None  # per-sample class / channel (None for tensor targets / not yet known)
    spec: ImageSpec | None           # image preprocessing that applies to the input, if any
    spec_note: str                   # why no spec applies ("" when one does)

    @property
    def x(self) -> np.ndarray:
        return self.feeds[self.image_input]

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def channel_axis(self) -> int | None:
        """Channel axis of the image input (None when it is not a 4-D image)."""
        return channel_axis_of(self.spec, self.x)


def channel_axis_of(spec: ImageSpec | None, x: np.ndarray) -> int | None:
    """Channel axis of a batched image input: from its preprocessing's layout (the model's config,
    or the input's shape where it is unambiguous); None when it is not 4-D."""
    if x.ndim != 4:
        return None
    layout = spec.layout if spec is not None else _guess_layout(x.shape)
    return 1 if layout == "NCHW" else 3


def _guess_layout(shape) -> str:
    return "NHWC" if shape[-1] in (1, 3) and shape[1] not in (1, 3) else "NCHW"


def image_spec(model: LoadedModel, preprocess: vis_pb2.Preprocessing | None, x: np.ndarray) -> tuple[ImageSpec | None, str]:
    """The preprocessing that applies to the image input (also for raw-tensor requests)."""
    name = model.image_input
    if x.ndim != 4:
        return None, f"input {name!r} is not a 4-D image tensor"
    try:   # at the images' size where the model's is free (it resolved only with a static size)
        return resolve_image_spec(model.config, preprocess, name, image_dims_at(model, x.shape)), ""
    except InvalidArgument as exc:
        return None, f"no image preprocessing applies to input {name!r} ({exc})"


def prepare(runtime: Runtime, model: LoadedModel, feeds: dict[str, np.ndarray], obj: Objective,
            preprocess: vis_pb2.Preprocessing | None) -> AttributionInput:
    x = feeds[model.image_input]
    if x.dtype.kind != "f":
        raise InvalidArgument("input", f"input {model.image_input!r} is {x.dtype}; attributions need a float input")
    # a map per image: the targets, and the copies SmoothGrad and IG stack, run along the batch dimension
    batching.require_batched_image(model, x, "attributions")
    tensor = objective_tensor_name(model, obj)
    # attributions are of the image input: a target it does not reach (another input's branch) was
    # refused by the engine naming `wrt`, which the request does not have
    require_from_image(model, tensor, "target.output.output" if obj.kind == "output" else f"target.{obj.kind}.layer",
                       obj.layer)
    spec, note = image_spec(model, preprocess, x)
    if obj.kind == "output" and not obj.index:  # top-1: resolved by the first gradient run (see ensure_target)
        return AttributionInput(feeds, model.image_input, tensor, None, None, spec, note)
    cot, target_index = make_cotangent(runtime, model, feeds, obj, tensor)
    return AttributionInput(feeds, model.image_input, tensor, cot, target_index, spec, note)


def ensure_target(runtime: Runtime, model: LoadedModel, ai: AttributionInput) -> None:
    """Fix a top-1 target before differentiating perturbed copies: they must all use the
    class of the clean image, not their own top-1."""
    if ai.cotangent is None:
        obj = Objective("output", ai.objective_tensor)
        ai.cotangent, ai.target_index = make_cotangent(runtime, model, ai.feeds, obj, ai.objective_tensor)


# ----------------------------------------------------------------------------
# batched gradient runs


def per_sample_bytes(model: LoadedModel, x: np.ndarray) -> int:
    """Rough bytes one sample costs in a forward+backward run: every float activation once.

    An upper bound in practice: onnxruntime keeps what the backward pass reads (mostly
    ReLU outputs) and frees each gradient once used, so ResNet-50 measures ~43 MiB per
    sample (peak RSS, batch 1 -> 8) where this counts ~100 MiB."""
    def estimate():
        total, unknown = 0, False
        for info in model.infos.values():
            shape = info.shape
            if not shape or shape[0] != BATCH_DIM or info.dtype is None or np.dtype(info.dtype).kind != "f":
                continue
            if not all(isinstance(d, int) for d in shape[1:]):
                unknown = True
                continue
            total += int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(info.dtype).itemsize
        return total, unknown

    total, unknown = model.memo("attribution_per_sample_bytes", estimate)
    sample = int(x[0].nbytes)
    if unknown:   # a free image size: the estimate at this size, where one exists
        at_size = limits.free_size_image_bytes(model, x)
        if at_size is not None:
            return max(total, at_size, sample)
    return max(total, sample * UNKNOWN_SHAPE_FACTOR if unknown or total == 0 else 0, sample)


def rows_per_run(model: LoadedModel, x: np.ndarray, batch: int, memory_budget: int,
                 max_batch: int = limits.DEFAULT_SERVER_MAX_BATCH) -> int:
    """Rows per onnxruntime run: the memory budget's share, capped by `batch` (0 = default) and
    by the server's `max_batch`, which bounds the rows of a run like the images of a request
    (callers refuse a larger `batch` with limits.check_batch)."""
    fixed = batching.fixed_batch(model)
    if fixed:  # the model runs no other number of rows (the request's images are that many too)
        return fixed
    budget = memory_budget if memory_budget > 0 else DEFAULT_MEMORY_BUDGET
    rows = max(1, budget // per_sample_bytes(model, x))
    return int(max(1, min(rows, batch if batch > 0 else DEFAULT_MAX_BATCH, max_batch)))


def gradient_rows(runtime: Runtime, model: LoadedModel, ai: AttributionInput, rows: np.ndarray,
                  make_inputs: Callable[[np.ndarray], np.ndarray], chunk: int, rule_set: str = "gradient",
                  progress: Progress = NO_PROGRESS, stage: str = "",
                  consume: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
                  summed_weights: np.ndarray | None = None) -> None:
    """Differentiate many input rows, `chunk` rows per run of the cached gradient graph.

    `rows[k]` is the image index of row k; `make_inputs(ks)` returns the image-input values
    of rows `ks`; other batched model inputs and the cotangent are copied from image `rows[k]`
    (inputs without a batch dimension are fed unchanged; a fixed batch pads each run, see batching).
    `consume(ks, gradients, objective values)` receives each run's results.

    `summed_weights` (one per row): the caller wants only sum_k weights[k] * gradient[k] per
    image. Each run then holds rows of one image, their weights scale the cotangent (the
    gradient is linear in it), and the graph returns the weighted sum ([1, ...]): the layers
    next to the input run once per run instead of once per row, and one row comes back, not
    `chunk`. The objective values passed to `consume` then include the weights.
    """
    ensure_target(runtime, model, ai)
    wrt_map = resolve_wrt(model, ["input"])
    total = len(rows)
    progress.update(0, total, stage)
    if summed_weights is None:
        runs = [np.arange(sl.start, sl.stop) for sl in chunks(total, balanced_chunk(total, chunk))]
    else:  # rows are image-major: split each image's rows
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        ends = np.r_[starts[1:], total]
        runs = [np.arange(a + sl.start, a + sl.stop) for a, b in zip(starts, ends)
                for sl in chunks(int(b - a), balanced_chunk(int(b - a), chunk))]
    done = 0
    for ks in runs:
        images = rows[ks]
        feeds = batching.row_feeds(model, ai.feeds, images, make_inputs(ks))
        cot = np.ascontiguousarray(ai.cotangent[images])
        if summed_weights is not None:
            cot = (cot * summed_weights[ks].reshape((-1,) + (1,) * (cot.ndim - 1))).astype(cot.dtype)
        # padded rows get a zero cotangent: nothing of theirs enters a batch-summed gradient
        res = run_gradient(runtime, model, feeds, ai.objective_tensor, batching.padded(model, cot, zeros=True),
                           wrt_map, rule_set, batch_summed=summed_weights is not None)
        if consume is not None:
            grads = res.gradients["input"]
            consume(ks, grads if summed_weights is not None else grads[:len(ks)], res.objective[:len(ks)])
        done += len(ks)
        progress.update(done, total, stage)


def objective_rows(runtime: Runtime, model: LoadedModel, ai: AttributionInput, rows: np.ndarray,
                   inputs: np.ndarray, chunk: int) -> np.ndarray:
    """The objective <cotangent, objective tensor> of each row, from forward runs only (no gradient).

    `rows[k]` is the image index of row k and `inputs[k]` its image-input value; other model
    inputs and the cotangent come from image `rows[k]` (as in gradient_rows). Float64, summed
    like run_gradient's objective.
    """
    ensure_target(runtime, model, ai)
    out = np.zeros(len(rows))
    for sl in chunks(len(rows), balanced_chunk(len(rows), chunk)):
        images = rows[sl]
        feeds = batching.row_feeds(model, ai.feeds, images, inputs[sl])
        values = compute_activations(runtime, model, feeds, [ai.objective_tensor])[ai.objective_tensor]
        values = values[:len(images)]  # without a fixed batch's padding
        require_finite(f"tensor {ai.objective_tensor!r}", values)
        flat = values.reshape(len(images), -1).astype(np.float64)
        out[sl] = (flat * ai.cotangent[images].reshape(len(images), -1)).sum(axis=1)
    return out


def accumulate_rows(total: np.ndarray, images: np.ndarray, values: np.ndarray,
                    weights: np.ndarray | None = None) -> None:
    """total[images[k]] += weights[k] * values[k] for every row k, summed in float64.

    One weighted sum per distinct image (np.tensordot) instead of np.add.at, which adds
    element by element (measured ~25 ms per 16 ResNet-sized rows, ~10x slower).
    """
    for image in np.unique(images):
        sel = np.flatnonzero(images == image)
        w = np.ones(len(sel)) if weights is None else np.asarray(weights, np.float64)[sel]
        total[image] += np.tensordot(w, values[sel], axes=1)


def single_gradient(runtime: Runtime, model: LoadedModel, ai: AttributionInput, rule_set: str = "gradient"):
    """Gradient and objective values of the batch as given (one run)."""
    res = run_gradient(runtime, model, ai.feeds, ai.objective_tensor, ai.cotangent,
                       resolve_wrt(model, ["input"]), rule_set)
    if ai.target_index is None:  # a top-1 target, found in this run
        ai.target_index = res.target_index
    return res.gradients["input"], res.objective


# ----------------------------------------------------------------------------
# channel reductions (attribution [N, ...] -> map [N, H, W])


def reduce_channels(a: np.ndarray, axis: int | None, how: str) -> np.ndarray:
    """`how`: "max_abs" (max over channels of |a|), "sum" (signed sum over channels),
    "signed_max_abs" (the signed value of the channel where |a| is largest)."""
    if axis is None:  # not an image: the map is the attribution itself (|.| where asked)
        return np.abs(a) if how == "max_abs" else a
    if how == "max_abs":
        return np.abs(a).max(axis=axis)
    if how == "sum":
        return a.sum(axis=axis)
    if how == "signed_max_abs":
        idx = np.expand_dims(np.abs(a).argmax(axis=axis), axis)
        return np.take_along_axis(a, idx, axis=axis).squeeze(axis)
    raise ValueError(how)


# ----------------------------------------------------------------------------
# baselines


def black_value(ai: AttributionInput) -> tuple[np.ndarray, str]:
    """The model-space value of a black image, broadcastable to the input, and how it was made.

    The black image goes through the same preprocessing as requests' images (invert,
    colour order, value range, mean/std), so it is exactly what a black PNG would give.
    """
    x = ai.x
    if ai.spec is None:
        return np.zeros((1,) + x.shape[1:], x.dtype), f"zeros ({ai.spec_note})"
    spec = ai.spec
    mode = "L" if spec.color == "GRAY" else "RGB"
    black = image_to_array(Image.new(mode, (spec.size[1], spec.size[0]), 0), spec)
    axis = ai.channel_axis
    pixel = black[:, 0, 0] if spec.layout == "NCHW" else black[0, 0, :]
    shape = [1] * x.ndim
    shape[axis] = pixel.size
    value = np.broadcast_to(pixel.reshape(shape), (1,) + x.shape[1:]).astype(x.dtype)
    vals = ", ".join(f"{v:.4g}" for v in pixel)
    return value, f"black image in model space (per channel: {vals})"


def max_blur_sigma(h: int, w: int) -> float:
    """The largest blur_sigma: the image's larger side. A wider Gaussian blurs the (mirrored) image
    into about its mean already, and the kernel's length (6 sigma + 1 taps) stays bounded."""
    return float(max(h, w))


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur along one axis with mirrored ('reflect') edges: d c b a | a b c d | d c b a.

    The mirrored signal repeats with period 2n, so the kernel is first folded onto 2n taps
    (tap r gathers the weights of all offsets = r mod 2n); the matrix then has 2 n^2
    contributions, made at once with np.bincount, whatever sigma is.
    """
    if sigma <= 0:
        return np.eye(n)
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (offsets / sigma) ** 2)
    w /= w.sum()
    period = 2 * n
    folded = np.bincount(np.mod(offsets, period), weights=w, minlength=period)
    rows = np.repeat(np.arange(n), period)
    taps = np.tile(np.arange(period), n)
    j = np.mod(rows + taps, period)
    j = np.where(j >= n, period - 1 - j, j)  # reflect about the edges
    return np.bincount(rows * n + j, weights=folded[taps], minlength=n * n).reshape(n, n)


def blurred(ai: AttributionInput, sigma: float) -> tuple[np.ndarray, str]:
    x = ai.x
    axis = ai.channel_axis
    if axis is None:
        raise InvalidArgument("integrated_gradients.baseline", "'blurred' needs a 4-D image input")
    h_axis, w_axis = (2, 3) if axis == 1 else (1, 2)
    h, w = x.shape[h_axis], x.shape[w_axis]
    limit = max_blur_sigma(h, w)
    if not 0 <= sigma <= limit:  # NaN fails too
        raise InvalidArgument("integrated_gradients.blur_sigma",
                              f"must be in [0, {limit:g}] pixels (at most the image's larger side; 0 = default, "
                              f"10% of the smaller side), got {sigma}")
    sigma = float(sigma) if sigma > 0 else 0.1 * min(h, w)
    mh, mw = gaussian_matrix(h, sigma), gaussian_matrix(w, sigma)
    xf = x.astype(np.float64)
    if axis == 3:
        xf = np.moveaxis(xf, 3, 1)
    # two matrix products over [N, C] stacks (a three-operand einsum without optimize loops over
    # every (i, j, k, l) term: 7.7 s for one 224x224 RGB image, against ~20 ms)
    out = mh @ xf @ mw.T
    if axis == 3:
        out = np.moveaxis(out, 1, 3)
    return np.ascontiguousarray(out, dtype=x.dtype), f"Gaussian blur of the input, sigma {sigma:.3g} px"


def custom(ai: AttributionInput, value: np.ndarray | None) -> tuple[np.ndarray, str]:
    x = ai.x
    field = "integrated_gradients.baseline_tensor"
    if value is None:
        raise InvalidArgument(field, "required for baseline 'custom'")
    b = np.asarray(value)
    if b.shape == x.shape[1:]:
        b = b[None]
    if b.shape != x.shape and not (b.ndim == x.ndim and b.shape[0] == 1 and b.shape[1:] == x.shape[1:]):
        raise InvalidArgument(field, f"shape {list(b.shape)} not allowed; the input has shape {list(x.shape)} "
                                     "(batch dim optional)")
    if b.dtype.kind != "f" or not np.isfinite(b).all():
        raise InvalidArgument(field, "must be a finite floating-point tensor")
    if b.size and np.abs(b).max() > MAX_BASELINE_VALUE:   # no model's inputs lie out there; the network would overflow
        raise InvalidArgument(field, f"values must be at most {MAX_BASELINE_VALUE:g} in magnitude, got "
                                     f"{float(np.abs(b).max()):g}")
    return b.astype(x.dtype), "custom tensor"


BASELINES = ("black", "zero", "blurred", "custom")
MAX_BASELINE_VALUE = 1e6


def baseline(ai: AttributionInput, kind: str, blur_sigma: float = 0.0,
             tensor: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """The baseline [N or 1, ...] and a sentence saying what it is."""
    kind = kind or "black"
    if kind == "black":
        return black_value(ai)
    if kind == "zero":
        return np.zeros((1,) + ai.x.shape[1:], ai.x.dtype), "zeros"
    if kind == "blurred":
        return blurred(ai, blur_sigma)
    if kind == "custom":
        return custom(ai, tensor)
    raise InvalidArgument("integrated_gradients.baseline", f"unknown baseline {kind!r}; allowed: {', '.join(BASELINES)}")


# ----------------------------------------------------------------------------
# results


def attribution_result(ai: AttributionInput, attribution: np.ndarray, heat: np.ndarray,
                       text: dict[str, str] | None = None, **extra: np.ndarray) -> MethodResult:
    """The common result tensors: attribution, map, input, target_index (+ method extras)."""
    tensors = {"attribution": attribution.astype(ai.x.dtype, copy=False),
               "map": heat.astype(ai.x.dtype, copy=False), "input": ai.x}
    if ai.target_index is not None:
        tensors["target_index"] = ai.target_index.astype(np.int64)
    tensors.update(extra)
    info = {"objective_tensor": ai.objective_tensor}
    if ai.spec is not None:
        info["input_layout"] = ai.spec.layout
        info["input_color"] = ai.spec.color
    info.update(text or {})
    return MethodResult(tensors=tensors, text=info)
