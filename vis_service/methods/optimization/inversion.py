"""Feature inversion (Mahendran & Vedaldi, CVPR 2015): an image whose features at a layer
match those of a reference image, under natural-image priors.

Variable z (per start), pixel P = 127.5 + B z (RGB, 0..255 nominal; the sigma
normalization: z is the image in units of the typical pixel norm B), model input
x = to_model(P / 255). Loss per start:
  ||Phi(x) - Phi0||^2 / ||Phi0||^2 + lambda_alpha * sum|z|^alpha / (H W)
  + lambda_tv * sum(((dz_x^2 + dz_y^2) (B / V)^2)^(beta / 2)) / (H W)
The feature term is a graph head ((Phi - phi0)^2, phi0 fed as an input), so a step is
one run of a cached forward+backward graph on a DAG of any shape; several random
starts run as one batch. A layer sweep inverts each layer in turn (its own cached
graph, which only goes as deep as that layer). A step whose loss, gradient or image is not
finite stops the loop with an error naming `optimizer.lr` (it diverged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ...errors import InvalidArgument
from ...graph.names import resolve_tensor
from ...models.config import ImageSpec
from ...models.store import LoadedModel
from ...runtime.sessions import Runtime
from .. import batching, limits
from ..activations import compute_activations
from ..gradient import require_finite
from ..progress import MethodResult, Progress
from ..targets import class_scores_tensor, require_activation, require_batch_first
from . import regularizers
from .objectives import GradientRun, Head, require_float_image, require_image_input_only
from .optimizers import Optimizer, OptimizerSettings, all_finite, diverged, learning_rate
from .parameterization import PixelMap

MAX_STEPS = 100_000
GREY = 127.5


@dataclass
class InvertSettings:
    layers: Sequence[str] = ()
    steps: int = 200
    starts: int = 1
    optimizer: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(
        name="sgd", lr=0.02, schedule="step"))
    alpha: float = 6.0
    beta: float = 2.0
    lambda_alpha: float = 1e-4
    lambda_tv: float = 5e-3
    pixel_norm: float = 80.0
    tv_norm: float = 0.0          # 0 = pixel_norm / 6.5
    init_std: float = 0.1
    seed: int = 0
    snapshot_every: int = 0

    def validate(self, max_batch: int | None = None) -> None:
        """`max_batch`: the server's limit on `starts` (RESOURCE_EXHAUSTED above it); None = no limit."""
        if not 1 <= self.steps <= MAX_STEPS:
            raise InvalidArgument("steps", f"must be in [1, {MAX_STEPS}], got {self.steps}")
        if self.starts < 1:
            raise InvalidArgument("starts", f"must be >= 1, got {self.starts}")
        if max_batch is not None:
            limits.check_batch("starts", self.starts, max_batch, "starts (one batch)")
        # weights past 1e6 (M&V use 1e-4 .. 0.05) make the regularizers alone overflow, which the
        # loop would report as a diverging optimizer.lr
        checks = [("alpha", self.alpha, 1, 16), ("beta", self.beta, 1, 4), ("lambda_alpha", self.lambda_alpha, 0, 1e6),
                  ("lambda_tv", self.lambda_tv, 0, 1e6), ("pixel_norm", self.pixel_norm, 1e-3, 1e4),
                  ("tv_norm", self.tv_norm, 0, 1e4), ("init_std", self.init_std, 0, 10),
                  ("snapshot_every", self.snapshot_every, 0, MAX_STEPS)]
        for name, v, lo, hi in checks:
            if not (lo <= v <= hi and math.isfinite(v)):  # an infinite weight makes every value NaN
                allowed = f"a finite number >= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
                raise InvalidArgument(name, f"must be {allowed}, got {v}")
        if 0 < self.tv_norm < 1e-3:   # 0 = default (pixel_norm / 6.5)
            raise InvalidArgument("tv_norm", f"must be 0 (default) or in [0.001, 10000], got {self.tv_norm}")
        self.optimizer.validate("optimizer")


def invert(runtime: Runtime, model: LoadedModel, spec: ImageSpec, reference: np.ndarray, s: InvertSettings,
           progress: Progress, on_snapshot: Callable[[str, np.ndarray, int], None] | None = None) -> MethodResult:
    """`reference`: the model-space reference input [1, ...]."""
    s.validate()
    require_image_input_only(model, "input.tensors[{input}]", "inversion")
    require_float_image(model, "input", "inversion")
    fixed = batching.fixed_batch(model)
    if fixed and (fixed > 1 or s.starts > 1):
        # one reference image and `starts` reconstructions: batches the model does not run
        raise InvalidArgument("input", f"input {model.image_input!r} takes exactly {fixed} images (the model's fixed "
                                       "batch); inversion runs one reference image and `starts` reconstructions, so "
                                       "it needs a model whose batch is free (export it with a dynamic batch or 1)")
    if reference.shape[0] != 1:
        raise InvalidArgument("input", f"send exactly one reference image, got a batch of {reference.shape[0]}")
    layers = [resolve_tensor(model.proto, name, kind="layer") for name in s.layers] or [class_scores_tensor(model)]
    for i, layer in enumerate(layers):
        field, name = (f"layers[{i}]", s.layers[i]) if s.layers else ("layers", "")
        require_activation(model, layer, field, name, differentiable=True)
        require_batch_first(model, layer, field, name)
    pmap = PixelMap(spec)
    h, w = spec.size
    c = pmap.channels
    limits.check_optimization_memory("starts", s.starts, (c, h, w), "starts")
    b_norm = s.pixel_norm
    v_norm = s.tv_norm or b_norm / 6.5
    p0 = pmap.from_model(reference) * 255.0                      # reference pixels [1, C, H, W]
    phi0 = compute_activations(runtime, model, {model.image_input: reference}, layers)
    for layer in layers:
        require_finite(f"tensor {layer!r}", phi0[layer])
    columns = ["loss", "feature", "alpha", "tv", "lr"]
    n_layers, S = len(layers), s.starts
    recon = np.zeros((n_layers, S) + tuple(reference.shape[1:]), np.float32)
    images = np.zeros((n_layers, S, h, w, 3), np.uint8)
    feat_err = np.zeros((n_layers, S))
    pix_err = np.zeros((n_layers, S))
    losses = np.zeros((n_layers, s.steps, len(columns)), np.float32)
    total = n_layers * s.steps
    for li, layer in enumerate(layers):
        ref = phi0[layer].astype(np.float32)
        ref_sq = float((ref.astype(np.float64) ** 2).sum())
        if ref_sq == 0:
            raise InvalidArgument("layers", f"the reference's features at {layer!r} are all zero; nothing to invert")
        head = Head("squared_difference", layer)
        feats = np.broadcast_to(ref, (S,) + ref.shape[1:]).copy()
        run = GradientRun(runtime, model, [head], {head.output: np.full((S,) + ref.shape[1:], 1.0 / ref_sq, np.float32)},
                          reference)
        extra = {head.reference_input: feats}
        rng = np.random.default_rng([s.seed, li])
        z = rng.normal(0.0, s.init_std, size=(S, c, h, w))
        opt = Optimizer(s.optimizer)
        for step in range(s.steps):
            d = (GREY + b_norm * z) / 255.0
            x = pmap.to_model(d)
            grad_x, fwd = run.run(x, extra)
            feature = fwd[head.output].reshape(S, -1).astype(np.float64).sum(axis=1) / ref_sq
            g = pmap.to_model_adjoint(grad_x) * (b_norm / 255.0)     # d feature term / dz
            pen_a = pen_t = 0.0
            if s.lambda_alpha > 0:
                v, ga = regularizers.alpha_norm(z, s.alpha)
                g = g + s.lambda_alpha * ga
                pen_a = s.lambda_alpha * float(v.mean())
            if s.lambda_tv > 0:
                v, gt = regularizers.total_variation(z, s.beta, norm=v_norm / b_norm)
                g = g + s.lambda_tv * gt
                pen_t = s.lambda_tv * float(v.mean())
            if not all_finite(feature, g):
                if step:
                    raise diverged(step, f" of layer {layer!r}")
                raise InvalidArgument("input", f"the feature loss at {layer!r} or its gradient is not finite on the "
                                               "starting image (float32 overflow in the network)")
            lr = learning_rate(s.optimizer, step, s.steps)
            z = opt.step(z, g, lr)
            row = [float(feature.mean()) + pen_a + pen_t, float(feature.mean()), pen_a, pen_t, lr]
            with np.errstate(over="ignore"):  # a diverging loss overflows float32 here; the check stops the loop
                losses[li, step] = row
            if not all_finite(losses[li, step], z):
                raise diverged(step, f" of layer {layer!r}")
            if on_snapshot is not None and s.snapshot_every and (step + 1) % s.snapshot_every == 0:
                on_snapshot(f"snapshot/{layer}/{step + 1}", PixelMap.to_uint8((GREY + b_norm * z) / 255.0),
                            li * s.steps + step + 1)
            progress.update(li * s.steps + step + 1, total, f"invert {layer}", **dict(zip(columns, row)))
        d = np.clip((GREY + b_norm * z) / 255.0, 0.0, 1.0)
        x = pmap.to_model(d)
        _, fwd = run.run(x, extra)
        feat_err[li] = np.sqrt(fwd[head.output].reshape(S, -1).astype(np.float64).sum(axis=1) / ref_sq)
        p = d * 255.0
        pix_err[li] = (np.sqrt(((p - p0) ** 2).reshape(S, -1).sum(axis=1))
                       / max(1e-12, float(np.sqrt(((p0 - GREY) ** 2).sum()))))
        recon[li] = x
        images[li] = PixelMap.to_uint8(d)
    tensors = {"reconstructions": recon, "images": images,
               "reference": PixelMap.to_uint8(np.clip(p0 / 255.0, 0, 1)),
               "feature_error": feat_err, "pixel_error": pix_err, "losses": losses}
    return MethodResult(tensors, labels={"layers": layers, "losses": columns})
