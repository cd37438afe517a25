"""SmoothGrad (Smilkov et al. 2017) and VarGrad (Adebayo et al. 2018).

The gradient is averaged (or, VarGrad, its population variance taken) over `samples`
noisy copies x + sigma * eps of each image, sigma = noise * (max(x_i) - min(x_i)).
The copies are stacked along the batch dimension, `chunk` rows per onnxruntime run.

Noise (reproducible from outside, see `noise_for`): the same for every image of the request,
``np.random.default_rng(seed).standard_normal((samples, C, H, W), dtype=np.float32)`` drawn
channels-first (moved to the input's layout for an NHWC model); row s of that array is eps for
sample s, and the noisy input is computed in float32 as ``x[i] + np.float32(sigma_i) * eps[s]``.
So an image's map depends neither on where it sits in the batch nor on the model's layout: the
same image alone, twice in one batch, or through an NHWC twin of the model gets the same noise.

attribution = mean (or variance) of the gradients; map = max over channels of |attribution|.
"""
from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument
from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from . import limits
from .attribution_common import (AttributionInput, accumulate_rows, attribution_result, gradient_rows, reduce_channels,
                                 rows_per_run)
from .progress import NO_PROGRESS, MethodResult, Progress

DEFAULT_SAMPLES = 25
DEFAULT_NOISE = 0.15
MAX_SAMPLES = 100_000  # per image; the noise is drawn run by run, so memory does not grow with it
MAX_NOISE = 100.0   # sigma 100 times the image's value range already drowns the image  # per image; the noise is drawn run by run, so memory does not grow with it


def noise_sigma(x: np.ndarray, noise: float) -> np.ndarray:
    """Per-image sigma: `noise` times the image's value range (max - min)."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    return noise * (flat.max(axis=1) - flat.min(axis=1))


def _draw(rng: np.random.Generator, count: int, sample_shape: tuple, channel_axis: int | None) -> np.ndarray:
    """count standard normal samples of `sample_shape`, drawn channels-first: a channels-last
    input gets the same numbers as its channels-first twin, transposed."""
    if channel_axis is None or channel_axis == 1:
        return rng.standard_normal((count,) + sample_shape, dtype=np.float32)
    axis = channel_axis - 1   # within a sample
    first = (sample_shape[axis],) + sample_shape[:axis] + sample_shape[axis + 1:]
    return np.moveaxis(rng.standard_normal((count,) + first, dtype=np.float32), 1, channel_axis)


def noise_for(x_i: np.ndarray, samples: int, seed: int, channel_axis: int | None = 1) -> np.ndarray:
    """eps [samples, ...] of any image of the request (standard normal, float32); `channel_axis`
    of the batched input (3 for NHWC)."""
    return _draw(np.random.default_rng(int(seed)), samples, x_i.shape, channel_axis)


class _NoiseStream:
    """noise_for's rows, drawn run by run in row order instead of [samples, ...] at once (100 000
    samples of a 224x224 image would be 60 GB). numpy's generators give the same numbers drawn
    in consecutive pieces as in one call, so the noise is still exactly noise_for's."""

    def __init__(self, x: np.ndarray, samples: int, seed: int, channel_axis: int | None = 1):
        self.x, self.samples, self.seed, self.channel_axis = x, samples, seed, channel_axis
        self.image, self.next_sample, self.rng = -1, 0, None

    def rows(self, ks: np.ndarray):
        """(image, eps) of rows ks: consecutive rows, continuing where the last call stopped."""
        ks = np.asarray(ks)
        start = 0
        while start < len(ks):
            i, s = divmod(int(ks[start]), self.samples)
            count = min(len(ks) - start, self.samples - s)
            if i != self.image:
                self.image, self.next_sample = i, 0
                self.rng = np.random.default_rng(int(self.seed))   # every image: the same noise
            if s != self.next_sample:
                raise AssertionError(f"noise rows drawn out of order: sample {s} of image {i}, "
                                     f"expected {self.next_sample}")
            eps = _draw(self.rng, count, self.x.shape[1:], self.channel_axis)
            self.next_sample += count
            for e in eps:
                yield i, e
            start += count


def smoothgrad(runtime: Runtime, model: LoadedModel, ai: AttributionInput, samples: int = DEFAULT_SAMPLES,
               noise: float = DEFAULT_NOISE, vargrad: bool = False, seed: int = 0, batch: int = 0,
               progress: Progress = NO_PROGRESS, max_batch: int = limits.DEFAULT_SERVER_MAX_BATCH) -> MethodResult:
    """`batch`: rows per onnxruntime run (0 = default); runs never take more than the server's
    `max_batch` rows (the API refuses a larger `batch`)."""
    if not 1 <= samples <= MAX_SAMPLES:
        raise InvalidArgument("smoothgrad.samples", f"must be in [1, {MAX_SAMPLES}], got {samples}")
    if not np.isfinite(noise) or not 0 <= noise <= MAX_NOISE:
        raise InvalidArgument("smoothgrad.noise", f"must be in [0, {MAX_NOISE:g}] (a fraction of the input range), "
                                                  f"got {noise}")
    x = ai.x
    n = ai.batch
    sigma = noise_sigma(x, noise)
    rows = np.repeat(np.arange(n), samples)   # row k = image k // samples, sample k % samples
    stream = _NoiseStream(x, samples, seed, ai.channel_axis)

    def make_inputs(ks: np.ndarray) -> np.ndarray:
        out = np.empty((len(ks),) + x.shape[1:], x.dtype)
        for j, (i, eps) in enumerate(stream.rows(ks)):
            out[j] = x[i] + np.float32(sigma[i]) * eps
        return out

    total = np.zeros(x.shape, np.float64)
    total_sq = np.zeros(x.shape, np.float64)

    def consume(ks, grads, _objective):
        g = grads.astype(np.float64)
        accumulate_rows(total, rows[ks], g)
        accumulate_rows(total_sq, rows[ks], g * g)

    def consume_sum(ks, summed, _objective):  # the mean needs only each run's sum, made in the graph
        total[rows[ks[0]]] += summed[0]

    chunk = rows_per_run(model, x, batch, 0, max_batch)
    # VarGrad needs every row's square; SmoothGrad only sums
    gradient_rows(runtime, model, ai, rows, make_inputs, chunk, progress=progress,
                  stage="vargrad" if vargrad else "smoothgrad", consume=consume if vargrad else consume_sum,
                  summed_weights=None if vargrad else np.ones(len(rows)))
    mean = total / samples
    attribution = np.maximum(total_sq / samples - mean * mean, 0.0) if vargrad else mean
    heat = reduce_channels(attribution, ai.channel_axis, "max_abs")
    text = {"map": "max over channels of |" + ("variance" if vargrad else "mean") + " of the gradients|",
            "noise": f"sigma = {noise:g} x (max - min) of each image; {samples} samples; seed {seed}; "
                     f"{chunk} rows per run"}
    return attribution_result(ai, attribution, heat, text, sigma=sigma.astype(np.float32))
