"""Integrated Gradients (Sundararajan et al. 2017).

attribution = (x - b) * integral_0^1 grad f(b + a (x - b)) da, approximated by a
quadrature over `steps` points; f = the target's objective (class score). Each
image's interpolated inputs are stacked along the batch dimension and run in chunks
that fit a memory budget; the graph returns each chunk's weighted gradient sum
(weights folded into the cotangent, see attribution_common.gradient_rows). Completeness says sum(attribution) = f(x) - f(b);
"completeness_gap" = |sum(attribution) - (f(x) - f(b))| measures the quadrature error.

Quadratures (`rule`): "riemann_trapezoid" (steps points 0..1 incl. both ends, weights
1/(steps-1) halved at the ends: the trapezoid rule, whose weights sum to 1; Captum's
riemann_trapezoid weighs 1/steps, summing to (steps-1)/steps, so its attributions are
(steps-1)/steps of these), "riemann_middle" (midpoints (k + 1/2) / steps), "gausslegendre"
(Captum's default). f(x) and f(b) come from forward-only runs (no gradient rows spent on them).
"""
from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument
from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from . import attribution_common as common
from . import limits
from .attribution_common import AttributionInput, attribution_result, gradient_rows, reduce_channels, rows_per_run
from .progress import NO_PROGRESS, MethodResult, Progress

DEFAULT_STEPS = 50
MAX_STEPS = 100_000
# Gauss-Legendre nodes come from an eigenproblem of size steps (numpy's leggauss: 0.07 s at
# 1024, 3.4 s at 4096, memory steps^2); far past where the quadrature error stops mattering
MAX_GAUSS_LEGENDRE_STEPS = 1024
RULES = ("riemann_middle", "riemann_trapezoid", "gausslegendre")
# the default rule: on the ReLU nets we test (ResNet-20, SqueezeNet, digits) the
# integrand is piecewise constant and the midpoint rule gives the smallest gap
DEFAULT_RULE = "riemann_middle"


def quadrature(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) on [0, 1] with sum(weights) = 1."""
    if rule == "riemann_middle":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    if rule == "riemann_trapezoid":
        if steps == 1:
            return np.array([1.0]), np.array([1.0])
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] *= 0.5
        return np.linspace(0.0, 1.0, steps), w
    if rule == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, w / 2
    raise InvalidArgument("integrated_gradients.rule", f"unknown rule {rule!r}; allowed: {', '.join(RULES)}")


def integrated_gradients(runtime: Runtime, model: LoadedModel, ai: AttributionInput, steps: int = DEFAULT_STEPS,
                         baseline: str = "black", baseline_tensor: np.ndarray | None = None,
                         blur_sigma: float = 0.0, rule: str = "", memory_budget: int = 0, batch: int = 0,
                         progress: Progress = NO_PROGRESS,
                         max_batch: int = limits.DEFAULT_SERVER_MAX_BATCH) -> MethodResult:
    """`batch`: rows per onnxruntime run (0 = default); runs never take more than the server's
    `max_batch` rows (the API refuses a larger `batch`). `memory_budget`: bytes per run (0 = default
    2 GiB), at most the machine's physical memory (RESOURCE_EXHAUSTED)."""
    rule = rule or DEFAULT_RULE
    limit = MAX_GAUSS_LEGENDRE_STEPS if rule == "gausslegendre" else MAX_STEPS
    if not 1 <= steps <= limit:
        raise InvalidArgument("integrated_gradients.steps",
                              f"must be in [1, {limit}]{' for rule gausslegendre' if rule == 'gausslegendre' else ''}, "
                              f"got {steps}")
    if memory_budget < 0:
        raise InvalidArgument("integrated_gradients.memory_budget_bytes", f"must be >= 0, got {memory_budget}")
    limits.check_memory_budget("integrated_gradients.memory_budget_bytes", memory_budget)
    alphas, weights = quadrature(steps, rule)
    x = ai.x
    n = ai.batch
    base, base_text = common.baseline(ai, baseline, blur_sigma, baseline_tensor)
    base = np.broadcast_to(base, x.shape)
    diff = x.astype(np.float64) - base.astype(np.float64)
    per_image = steps
    rows = np.repeat(np.arange(n), per_image)
    # path points b + a (x - b) in float32 (float64 inputs: float64), in place: float64
    # temporaries made this ~36 ms per 17-row ResNet-50 run (3 % of IG-50). Inner points may
    # differ from correctly rounded ones by an ulp; the ends are b and x exactly, so that ties
    # in x (flat image regions meeting a max-pool) route the gradient as at x itself.
    work = np.promote_types(x.dtype, np.float32)
    base_w, diff_w, alphas_w = (np.ascontiguousarray(v, dtype=work) for v in (base, diff, alphas))

    def make_inputs(ks: np.ndarray) -> np.ndarray:
        i, j = rows[ks], ks % per_image
        out = diff_w[i]  # a copy (fancy index), scaled and shifted in place
        out *= alphas_w[j].reshape((-1,) + (1,) * (x.ndim - 1))
        out += base_w[i]
        out = out.astype(x.dtype, copy=False)
        for end, value in ((0.0, base), (1.0, x)):
            at_end = alphas[j] == end
            out[at_end] = value[i[at_end]]
        return out

    total = np.zeros(x.shape, np.float64)

    def consume(ks, summed, _objective):  # the quadrature's weighted sum, made in the graph
        total[rows[ks[0]]] += summed[0]

    chunk = common.balanced_chunk(per_image, rows_per_run(model, x, batch, memory_budget, max_batch))
    gradient_rows(runtime, model, ai, rows, make_inputs, chunk, progress=progress,
                  stage="integrated gradients", consume=consume,
                  summed_weights=weights[np.arange(len(rows)) % per_image])
    # the ends of the path, f(b) and f(x), need no gradient: forward runs only
    ends = common.objective_rows(runtime, model, ai, np.concatenate([np.arange(n), np.arange(n)]),
                                 np.concatenate([np.ascontiguousarray(base, dtype=x.dtype), x]), chunk)
    f_base, f_input = ends[:n], ends[n:]
    attribution = diff * total
    delta = f_input - f_base
    gap = np.abs(attribution.reshape(n, -1).sum(axis=1) - delta)
    heat = reduce_channels(attribution, ai.channel_axis, "sum")
    text = {"map": "sum over channels of the attribution",
            "baseline": f"{baseline or 'black'}: {base_text}",
            "rule": f"{rule}, {steps} steps, {chunk} rows per run"}
    return attribution_result(ai, attribution, heat, text, completeness_gap=gap, delta=delta,
                              objective=f_input, objective_baseline=f_base,
                              baseline=np.ascontiguousarray(base))
