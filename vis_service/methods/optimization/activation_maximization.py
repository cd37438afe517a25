"""Activation maximization and class model visualization (Olah et al. 2017 / Lucid; Simonyan et al. 2014).

Maximizes sum_t w_t * term_t(T(image)) - penalties over an image parameterization,
where T is a fresh random jitter / scale / rotation per step and image. One step:
  d = param.image()                          display units [B, C, H, W]
  x = to_model(T(d))                         model space
  g_x, values = one run of the cached graph  d objective / dx
  g_d = T^T(to_model^T(g_x))                 exact adjoints in numpy
  g_loss = -g_d + penalty gradients          L2, TV (diversity is in the graph)
  params <- optimizer(params, param.backward(g_loss))
A step whose values, gradient or parameters are not finite stops the loop with an error:
`optimizer.lr` once an update was made (it diverged), the objective weights on the starting
image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ...errors import InvalidArgument
from ...models.config import ImageSpec
from ...models.store import LoadedModel
from ...runtime.sessions import Runtime
from .. import batching, limits
from ..progress import MethodResult, Progress
from . import regularizers
from .objectives import Term, compile_objective, require_float_image, require_image_input_only
from .optimizers import Optimizer, OptimizerSettings, all_finite, diverged, learning_rate
from .parameterization import PARAMETERIZATIONS, PixelMap, make_parameterization
from .transforms import TransformSettings

MAX_STEPS = 100_000
# (tensor name, images, the Progress.done of the step it belongs to)
SnapshotFn = Callable[[str, np.ndarray, int], None]


@dataclass
class MaximizeSettings:
    terms: list[Term]
    steps: int = 256
    batch: int = 1
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    parameterization: str = "fourier"
    decorrelate: bool = True
    fourier_decay: float = 1.0
    init_std: float = 0.01
    transforms: TransformSettings = field(default_factory=lambda: TransformSettings(8, 0.05, 5.0))
    l2: float = 0.0
    tv: float = 0.0
    tv_beta: float = 1.0
    blur_every: int = 0
    blur_sigma: float = 0.5
    diversity: float = 0.0
    diversity_layer: str = ""
    seed: int = 0
    snapshot_every: int = 0

    def validate(self, max_batch: int | None = None) -> None:
        """`max_batch`: the server's limit on `batch` (RESOURCE_EXHAUSTED above it); None = no limit."""
        if not self.terms:
            raise InvalidArgument("objectives", "give at least one objective term")
        for t in self.terms:
            if not (t.weight >= 0 and math.isfinite(t.weight)):
                raise InvalidArgument(f"{t.field}.weight", f"must be a finite number >= 0, got {t.weight}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise InvalidArgument("steps", f"must be in [1, {MAX_STEPS}], got {self.steps}")
        if self.batch < 1:
            raise InvalidArgument("batch", f"must be >= 1, got {self.batch}")
        if max_batch is not None:
            limits.check_batch("batch", self.batch, max_batch, "images")
        if self.parameterization not in PARAMETERIZATIONS:
            raise InvalidArgument("parameterization", f"unknown {self.parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}")
        checks = [("fourier_decay", self.fourier_decay, 0, 4), ("init_std", self.init_std, 0, 10),
                  ("jitter", self.transforms.jitter, 0, 1000), ("scale", self.transforms.scale, 0, 0.9),
                  ("rotate", self.transforms.rotate, 0, 180), ("l2", self.l2, 0, math.inf),
                  ("tv", self.tv, 0, math.inf), ("tv_beta", self.tv_beta, 0.5, 4),
                  ("blur_every", self.blur_every, 0, MAX_STEPS), ("blur_sigma", self.blur_sigma, 0, 100),
                  ("diversity", self.diversity, 0, math.inf), ("snapshot_every", self.snapshot_every, 0, MAX_STEPS)]
        for name, v, lo, hi in checks:
            if not (lo <= v <= hi and math.isfinite(v)):  # an infinite weight makes every value NaN
                allowed = f"a finite number >= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
                raise InvalidArgument(name, f"must be {allowed}, got {v}")
        self.optimizer.validate("optimizer")


def maximize(runtime: Runtime, model: LoadedModel, spec: ImageSpec, s: MaximizeSettings,
             progress: Progress, on_snapshot: SnapshotFn | None = None) -> MethodResult:
    s.validate()
    require_image_input_only(model, "model", "activation maximization")
    require_float_image(model, "model", "activation maximization")
    fixed = batching.fixed_batch(model)
    if fixed and fixed != s.batch:
        # a model exported with a fixed batch > 1 (batch 1 is made symbolic on load) runs no other
        raise InvalidArgument("batch", f"input {model.image_input!r} takes exactly {fixed} images; use batch={fixed}")
    pmap = PixelMap(spec)
    h, w = spec.size
    c = pmap.channels
    limits.check_optimization_memory("batch", s.batch, (c, h, w), "images")
    x_example = pmap.to_model(np.full((s.batch, c, h, w), 0.5))
    limits.check_input_fits(model, {model.image_input: x_example.shape}, "preprocess.size")
    # the images never pass the servicer's input checks (they are made here): a free-size model at a
    # large preprocess size took the server to all of its memory
    limits.check_free_size_input(model, {model.image_input: x_example}, "preprocess.size", images=s.batch)
    rng = np.random.default_rng(s.seed)
    param = make_parameterization(s.parameterization, s.batch, c, h, w, rng, std=s.init_std,
                                  decay=s.fourier_decay, decorrelate=s.decorrelate)
    compiled = compile_objective(runtime, model, s.terms, s.batch, x_example, s.diversity, s.diversity_layer)
    opt = Optimizer(s.optimizer)
    weights = compiled.weights
    columns = ["loss", "objective", "l2", "tv", "diversity", "lr"]
    losses = np.zeros((s.steps, len(columns)), np.float32)
    for step in range(s.steps):
        d = param.image()
        draw = s.transforms.draw(rng, s.batch, h, w) if s.transforms.active else None
        x = pmap.to_model(draw.apply(d) if draw else d)
        grad_x, values, div = compiled.evaluate(x)
        if not all_finite(grad_x, values[compiled.term_masks], div):
            if step:
                raise diverged(step)
            raise InvalidArgument("objectives", "the objective or its gradient is not finite on the starting image "
                                                "(float32 overflow in the network); use smaller term weights or "
                                                "diversity")
        gd = pmap.to_model_adjoint(grad_x)
        if draw:
            gd = draw.adjoint(gd)
        g_loss = -gd
        objective = np.nansum(values * weights, axis=1)          # per image
        pen_l2 = pen_tv = 0.0
        if s.l2 > 0:
            v, g = regularizers.l2(d)
            pen_l2 = s.l2 * float(v.mean())
            g_loss += s.l2 * g
        if s.tv > 0:
            v, g = regularizers.total_variation(d, s.tv_beta, denominator="chw")
            pen_tv = s.tv * float(v.mean())
            g_loss += s.tv * g
        lr = learning_rate(s.optimizer, step, s.steps)
        param.params = opt.step(param.params, param.backward(g_loss), lr)
        if s.blur_every and (step + 1) % s.blur_every == 0 and s.blur_sigma > 0:
            param.blur(s.blur_sigma)
        pen_div = s.diversity * div
        obj_mean = float(objective.mean())
        row = [-obj_mean + pen_l2 + pen_tv + pen_div / s.batch, obj_mean, pen_l2, pen_tv, pen_div, lr]
        with np.errstate(over="ignore"):  # a diverging loss overflows float32 here; the check stops the loop
            losses[step] = row
        if step == 0 and not all_finite(losses[step]):
            # the row is the starting image's: no update made it, the weights did
            with np.errstate(over="ignore"):
                field = next((f for f, v in (("objectives", obj_mean), ("l2", pen_l2), ("tv", pen_tv),
                                             ("diversity", pen_div)) if not np.isfinite(np.float32(v))), "objectives")
            raise InvalidArgument(field, "the weighted loss overflows float32 on the starting image; use smaller weights")
        if not all_finite(losses[step], param.params):
            raise diverged(step)
        if on_snapshot is not None and s.snapshot_every and (step + 1) % s.snapshot_every == 0:
            on_snapshot(f"snapshot/{step + 1}", PixelMap.to_uint8(param.image()), step + 1)
        progress.update(step + 1, s.steps, "maximize", **dict(zip(columns, row)))
    d = param.image()
    x = pmap.to_model(d)
    _, values, _ = compiled.evaluate(x)
    if not all_finite(values[compiled.term_masks]):
        raise diverged(s.steps - 1)
    shown = np.clip(d, 0.0, 1.0) if s.parameterization == "raw" else d
    tensors = {
        "images": PixelMap.to_uint8(shown),
        "x": x,
        "objective": np.nansum(values * weights, axis=1),
        "terms": values,
        "losses": losses,
    }
    return MethodResult(tensors, labels={"losses": columns},
                        text={"parameterization": s.parameterization, "optimizer": s.optimizer.name,
                              "layers": ",".join(dict.fromkeys(compiled.layers)),
                              # steps where an image's exact gradient was zero (see GradientRun)
                              "redirected_steps": str(compiled.run.redirected_steps)})
