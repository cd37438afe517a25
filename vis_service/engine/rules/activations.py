"""Pointwise nonlinearities, softmax, and the ReLU overrides of deconvnet / guided backprop."""
from __future__ import annotations

import math

import numpy as np

from ..context import RuleContext, attr, normalize_axis
from ..registry import rule

def _positive_mask(ctx: RuleContext, y: str) -> str:
    # mask read from the output (y > 0), so onnxruntime can still fuse Conv+Relu
    return ctx.mask("Greater", y, ctx.scalar(0.0, y), y)


def _ramp(ctx: RuleContext, y: str, scale: float, offset: float = 0.0) -> str:
    """Clip(scale * y + offset, 0, 1) as one HardSigmoid.

    Why HardSigmoid: onnxruntime runs the forward convolutions in its blocked NCHWc
    layout, where comparisons and Cast do not exist; a Greater/Cast mask forces the
    activation and the incoming gradient back to NCHW and the masked gradient into NCHWc
    again for the next backward Conv (three reorders per ReLU). A unary activation runs on
    the blocked tensor as it is (and the Mul of two blocked tensors stays blocked): one
    pass, cheaper than the per-channel 1x1 Conv+Clip that did this before (0.40-0.65 vs
    0.64-0.72 ms on an [8, 64, 56, 56] tensor, same values) and not limited to channel
    counts that fill NCHWc blocks.
    """
    return ctx.make_node("HardSigmoid", [y], alpha=float(scale), beta=float(offset))


def _positive_mask_ramp(ctx: RuleContext, y: str) -> str | None:
    """Float mask (y > 0) of y >= 0 as Clip(2^127 * y, 0, 1).

    Exact for every y that is 0 or at least 2^-127 (all normal floats); a positive
    denormal below that gets a fractional factor. float32 only (2^127 overflows float16,
    and float64 has normal numbers far below 2^-127).
    """
    if ctx.dtype(y) != np.float32:
        return None
    return _ramp(ctx, y, 2.0 ** 127)


def value_mask(ctx: RuleContext, node, values: str) -> str | None:
    """The 0/1 factor the exact rule of Relu / Clip `node` multiplies the gradient with, computed
    on `values`: a tensor holding values of the node's output (its output, or a max-pool of it).

    A function of the output value alone, so it commutes with routing by switches: a max-pool
    backward sends each window's gradient to an element equal to the window's maximum, which
    therefore gets the same factor as the maximum (see pooling.max_pool_backward). None for
    other op types and for a Clip without bounds (its gradient is the identity).
    """
    if node.op_type == "Relu":
        return _positive_mask_ramp(ctx, values) or _positive_mask(ctx, values)
    if node.op_type != "Clip":
        return None
    low, high = _clip_bounds(ctx, node)
    if low is not None and high is not None:
        if ctx.opset < 11:  # the bounds are attributes
            low_value, high_value = np.array(attr(node, "min")), np.array(attr(node, "max"))
        else:
            low_value, high_value = ctx.constant_value(low), ctx.constant_value(high)
        if low_value is not None and high_value is not None and low_value.size == 1 and high_value.size == 1:
            mask = _inside_mask_ramp(ctx, values, float(low_value), float(high_value))
            if mask is not None:
                return mask
    # strictly inside the bounds, judged on the output (lets onnxruntime fuse Conv+Clip);
    # both bounds combine with And so that only one Cast and one Mul touch the tensor
    inside = [ctx.make_node(op, [values, bound]) for op, bound in (("Greater", low), ("Less", high)) if bound is not None]
    if not inside:
        return None
    condition = inside[0] if len(inside) == 1 else ctx.make_node("And", inside)
    return ctx.make_node("Cast", [condition], to=ctx.elem_type(values))


@rule("Relu")
def relu_backward(ctx: RuleContext, node, grad_outputs):
    if ctx.premasked(grad_outputs[0], node):
        return [grad_outputs[0]]
    return [ctx.make_node("Mul", [grad_outputs[0], value_mask(ctx, node, node.output[0])])]


@rule("LeakyRelu")
def leaky_relu_backward(ctx: RuleContext, node, grad_outputs):
    alpha = attr(node, "alpha", 0.01)
    # sign(y) == sign(x) for alpha >= 0; read the output then (fusion), else the input
    probe = node.output[0] if alpha >= 0 else node.input[0]
    channels = _blocked_channels(ctx, probe)
    if channels:  # on the blocked tensor: a ramp, then alpha + (1 - alpha) * ramp as one depthwise Conv
        slope = _affine_blocked(ctx, _ramp(ctx, probe, 2.0 ** 127), 1.0 - alpha, alpha, channels)
        return [ctx.make_node("Mul", [grad_outputs[0], slope])]
    positive = _positive_mask(ctx, probe)
    slope = ctx.make_node("Add", [ctx.make_node("Mul", [positive, ctx.scalar(1.0 - alpha, probe)]),
                                  ctx.scalar(alpha, probe)])
    return [ctx.make_node("Mul", [grad_outputs[0], slope])]


@rule("PRelu")
def prelu_backward(ctx: RuleContext, node, grad_outputs):
    x, slope = node.input[0], node.input[1]
    g = grad_outputs[0]
    channels = _blocked_channels(ctx, x)
    slopes = ctx.folded_value(slope) if channels and not ctx.needs_grad(node, 1) else None
    # per-channel slopes broadcast as [C, 1, 1] or [1, C, 1, 1] (a [C] slope would run along W)
    if slopes is not None and (slopes.size == 1 or tuple(slopes.shape) in ((channels, 1, 1), (1, channels, 1, 1))):
        # a constant per-channel slope on a blocked tensor: (x > 0) as a ramp, then
        # slope_c + (1 - slope_c) * ramp as one depthwise Conv with per-channel weights
        a = np.broadcast_to(np.asarray(slopes, np.float64).reshape(-1), [channels])
        weight = ctx.const((1.0 - a).astype(np.float32).reshape(channels, 1, 1, 1), "prelu_slope_weight")
        bias = ctx.const(a.astype(np.float32), "prelu_slope_bias")
        factor = ctx.make_node("Conv", [_ramp(ctx, x, 2.0 ** 127), weight, bias], group=channels)
        return [ctx.make_node("Mul", [g, factor]), None]
    positive = ctx.mask("Greater", x, ctx.scalar(0.0, x), x)
    negative = ctx.make_node("Sub", [ctx.scalar(1.0, x), positive])
    grads = [None, None]
    if ctx.needs_grad(node, 0):
        factor = ctx.make_node("Add", [positive, ctx.make_node("Mul", [negative, slope])])
        grads[0] = ctx.make_node("Mul", [g, factor])
    if ctx.needs_grad(node, 1):
        per_element = ctx.make_node("Mul", [g, ctx.make_node("Mul", [x, negative])])
        grads[1] = ctx.sum_to(per_element, slope, ctx.shape(x))
    return grads


@rule("Elu")
def elu_backward(ctx: RuleContext, node, grad_outputs):
    x, y = node.input[0], node.output[0]
    alpha = attr(node, "alpha", 1.0)
    positive = ctx.mask("Greater", x, ctx.scalar(0.0, x), x)
    negative = ctx.make_node("Sub", [ctx.scalar(1.0, x), positive])
    # d/dx alpha*(exp(x)-1) = y + alpha
    negative_slope = ctx.make_node("Mul", [negative, ctx.make_node("Add", [y, ctx.scalar(alpha, x)])])
    return [ctx.make_node("Mul", [grad_outputs[0], ctx.make_node("Add", [positive, negative_slope])])]


def _clip_bounds(ctx: RuleContext, node) -> tuple[str | None, str | None]:
    """Names of (min, max) tensors, None where unbounded (attributes before opset 11)."""
    x = node.input[0]
    if ctx.opset < 11:
        low, high = attr(node, "min"), attr(node, "max")
        return (None if low is None else ctx.scalar(low, x)), (None if high is None else ctx.scalar(high, x))
    low = node.input[1] if len(node.input) > 1 and node.input[1] else None
    high = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return low, high


def _inside_mask_ramp(ctx: RuleContext, y: str, low: float, high: float) -> str | None:
    """Float mask (low < y < high) of y = clip(x, low, high) as two ramps (see _ramp).

    Clip(s*(y - low), 0, 1) * Clip(t*(high - y), 0, 1). The scales are powers of two,
    so s*y and t*y are exact; each ramp is 0 at its bound and >= 1 one float away from
    it (y - low and high - y are exact near the bound by Sterbenz, and far from it are
    large). Only for float32, low == 0 (no subtraction needed on that side) and a moderate high.
    """
    if ctx.dtype(y) != np.float32 or low != 0.0 or not 2.0 ** -20 <= high <= 2.0 ** 20:
        return None
    channels = _blocked_channels(ctx, y)
    if channels:
        return _inside_mask_fused(ctx, y, high, channels)
    # high - y >= ulp(high)/2 >= high * 2^-24 when y < high; scaled by 2^k it must reach 1
    # without high * 2^k overflowing: 2^k = 2^(26 - exponent(high))
    scale_high = 2.0 ** (26 - math.frexp(high)[1])
    return ctx.make_node("Mul", [_ramp(ctx, y, 2.0 ** 127), _ramp(ctx, y, -scale_high, high * scale_high)])


def _blocked_channels(ctx: RuleContext, y: str) -> int | None:
    """The channel count of a 4-D float32 tensor whose channels fill onnxruntime's NCHWc blocks
    (multiples of 8), else None: where a depthwise 1x1 Conv with an Add and an activation after it
    runs as one fused blocked Conv (see _inside_mask_fused); elsewhere they would be three ops."""
    shape = ctx.info(y).shape  # None where the rank is unknown: the general forms need no shape
    if ctx.dtype(y) != np.float32 or shape is None or len(shape) != 4 or not isinstance(shape[1], int) or shape[1] % 8:
        return None
    return shape[1]


def _affine_blocked(ctx: RuleContext, t: str, scale: float, shift: float, channels: int) -> str:
    """scale * t + shift as a depthwise 1x1 Conv: one pass that stays in onnxruntime's blocked
    NCHWc layout, where a Mul / Sub with a scalar would run in NCHW with reorders around it."""
    weight = ctx.const(np.full([channels, 1, 1, 1], scale, np.float32), "affine_weight")
    bias = ctx.const(np.full([channels], shift, np.float32), "affine_bias")
    return ctx.make_node("Conv", [t, weight, bias], group=channels)


def _inside_mask_fused(ctx: RuleContext, y: str, high: float, channels: int) -> str:
    """(0 < y < high) of y = clip(x, 0, high) in two passes over the tensor instead of three.

    u = (y > 0) as one ramp; then v = (high - y) * 2^-k + u - 1 as a depthwise 1x1 Conv of y
    (weight -2^-k, bias high * 2^-k - 1) plus u, and mask = Clip(2^30 * v, 0, 1): onnxruntime
    fuses the Conv, the Add and the HardSigmoid into one blocked NCHWc Conv (MobileNet's ReLU6
    masks: two ramps and their product were three passes). With 2^k >= high > 2^(k-1),
    high * 2^-k is in (1/2, 1]: v is 0 at y = 0 (high * 2^-k - 1 <= 0: the ramp gives 0), at least
    2^-24 for 0 < y < high, and exactly 0 at y = high: every term is a multiple of 2^-24 of
    magnitude <= 1 there, so the sums are exact in any order. Checked equal to (0 < y < high) on
    every normal float within 100 ulps of 0 and of high, and on random values, for several bounds
    (test_clip_mask_ramps_are_exact). 4-D tensors only (the NCHWc layout); a positive denormal y gets a factor in [0, 1).
    """
    mantissa, exponent = math.frexp(high)
    k = exponent - 1 if mantissa == 0.5 else exponent
    weight = ctx.const(np.full([channels, 1, 1, 1], -(2.0 ** -k), np.float32), "clip_mask_weight")
    bias = ctx.const(np.full([channels], high * 2.0 ** -k - 1.0, np.float32), "clip_mask_bias")
    # (y > 0) as in _positive_mask_ramp; y is float32 here, and may be a tensor made by a rule
    v = ctx.make_node("Add", [ctx.make_node("Conv", [y, weight, bias], group=channels), _ramp(ctx, y, 2.0 ** 127)])
    return _ramp(ctx, v, 2.0 ** 30)


@rule("Clip")
def clip_backward(ctx: RuleContext, node, grad_outputs):
    unused_bounds = [None] * (len(node.input) - 1)
    if ctx.premasked(grad_outputs[0], node):
        return [grad_outputs[0]] + unused_bounds
    mask = value_mask(ctx, node, node.output[0])
    if mask is None:  # unbounded: identity
        return [grad_outputs[0]] + unused_bounds
    return [ctx.make_node("Mul", [grad_outputs[0], mask])] + unused_bounds


# rules whose backward is the gradient times value_mask(node's output): a max-pool may apply it first
VALUE_MASK_RULES = (relu_backward, clip_backward)


@rule("Sigmoid")
def sigmoid_backward(ctx: RuleContext, node, grad_outputs):
    y = node.output[0]
    channels = _blocked_channels(ctx, y)
    one_minus_y = _affine_blocked(ctx, y, -1.0, 1.0, channels) if channels else ctx.make_node("Sub", [ctx.scalar(1.0, y), y])
    slope = ctx.make_node("Mul", [y, one_minus_y])
    return [ctx.make_node("Mul", [grad_outputs[0], slope])]


@rule("Tanh")
def tanh_backward(ctx: RuleContext, node, grad_outputs):
    y = node.output[0]
    square = ctx.make_node("Mul", [y, y])
    channels = _blocked_channels(ctx, y)
    slope = _affine_blocked(ctx, square, -1.0, 1.0, channels) if channels else ctx.make_node("Sub", [ctx.scalar(1.0, y), square])
    return [ctx.make_node("Mul", [grad_outputs[0], slope])]


@rule("HardSigmoid")
def hard_sigmoid_backward(ctx: RuleContext, node, grad_outputs):
    y = node.output[0]
    alpha = attr(node, "alpha", 0.2)
    channels = _blocked_channels(ctx, y)
    if channels:  # ramps on the blocked tensor; alpha as a channel scale a following Conv can take
        masked = ctx.make_node("Mul", [grad_outputs[0], _inside_mask_fused(ctx, y, 1.0, channels)])
        return [ctx.scale_channels(masked, ctx.const(np.full([channels], alpha, np.float32), "hard_sigmoid_slope"), y)]
    inside = ctx.make_node("Mul", [ctx.mask("Greater", y, ctx.scalar(0.0, y), y),
                                   ctx.mask("Less", y, ctx.scalar(1.0, y), y)])
    return [ctx.make_node("Mul", [grad_outputs[0], ctx.make_node("Mul", [inside, ctx.scalar(alpha, y)])])]


@rule("HardSwish")
def hard_swish_backward(ctx: RuleContext, node, grad_outputs):
    # y = x * clip(x/6 + 1/2, 0, 1): slope 0 below -3, 1 above 3, x/3 + 1/2 between
    x = node.input[0]
    channels = _blocked_channels(ctx, x)
    if channels:
        return [ctx.make_node("Mul", [grad_outputs[0], _hard_swish_slope_blocked(ctx, x, channels)])]
    inside = ctx.make_node("Mul", [ctx.mask("Greater", x, ctx.scalar(-3.0, x), x),
                                   ctx.mask("Less", x, ctx.scalar(3.0, x), x)])
    ramp = ctx.make_node("Add", [ctx.make_node("Mul", [x, ctx.scalar(1.0 / 3.0, x)]), ctx.scalar(0.5, x)])
    slope = ctx.make_node("Add", [ctx.make_node("Mul", [inside, ramp]),
                                  ctx.not_mask("Less", x, ctx.scalar(3.0, x), x)])
    return [ctx.make_node("Mul", [grad_outputs[0], slope])]


def _hard_swish_slope_blocked(ctx: RuleContext, x: str, channels: int) -> str:
    """HardSwish's slope t + x * m / 6, with t = clip(x/6 + 1/2, 0, 1) and m = (0 < t < 1), in five
    passes that all run on onnxruntime's blocked NCHWc tensors: a ramp (t), the inside mask (two,
    see _inside_mask_fused), a product, and a depthwise 1x1 Conv (1/6) with the Add of t fused.
    The comparisons and Casts of the general rule run in NCHW with layout reorders around them
    (a MobileNetV3-style [8, 64, 56, 56] layer: ~5.7 ms of backward -> ~1.5). The slope is 0 at
    x = -3 and 1 at x = 3, as in the general rule; where t rounds, x within an ulp or so of -3 or 3
    may take the other side's slope."""
    t = _ramp(ctx, x, 1.0 / 6.0, 0.5)
    inside = _inside_mask_fused(ctx, t, 1.0, channels)
    weight = ctx.const(np.full([channels, 1, 1, 1], 1.0 / 6.0, np.float32), "hard_swish_slope_weight")
    return ctx.make_node("Add", [ctx.make_node("Conv", [ctx.make_node("Mul", [x, inside]), weight], group=channels), t])


@rule("Erf")
def erf_backward(ctx: RuleContext, node, grad_outputs):
    x = node.input[0]
    gauss = ctx.make_node("Exp", [ctx.make_node("Neg", [ctx.make_node("Mul", [x, x])])])
    slope = ctx.make_node("Mul", [gauss, ctx.scalar(2.0 / math.sqrt(math.pi), x)])
    return [ctx.make_node("Mul", [grad_outputs[0], slope])]


@rule("Gelu")
def gelu_backward(ctx: RuleContext, node, grad_outputs):
    x = node.input[0]
    if attr(node, "approximate", "none") == "tanh":
        # y = x/2 (1 + tanh(u)), u = c (x + 0.044715 x^3)
        c = math.sqrt(2.0 / math.pi)
        x2 = ctx.make_node("Mul", [x, x])
        inner = ctx.make_node("Add", [ctx.scalar(1.0, x), ctx.make_node("Mul", [x2, ctx.scalar(0.044715, x)])])
        t = ctx.make_node("Tanh", [ctx.make_node("Mul", [ctx.make_node("Mul", [x, inner]), ctx.scalar(c, x)])])
        one_plus_t = ctx.make_node("Add", [ctx.scalar(1.0, x), t])
        du = ctx.make_node("Add", [ctx.scalar(c, x), ctx.make_node("Mul", [x2, ctx.scalar(3 * 0.044715 * c, x)])])
        sech2 = ctx.make_node("Sub", [ctx.scalar(1.0, x), ctx.make_node("Mul", [t, t])])
        second = ctx.make_node("Mul", [ctx.make_node("Mul", [x, sech2]), du])
        slope = ctx.make_node("Mul", [ctx.make_node("Add", [one_plus_t, second]), ctx.scalar(0.5, x)])
    else:
        # y = x Phi(x): slope Phi(x) + x phi(x)
        cdf = ctx.make_node("Mul", [ctx.make_node("Add", [
            ctx.scalar(1.0, x), ctx.make_node("Erf", [ctx.make_node("Mul", [x, ctx.scalar(1 / math.sqrt(2.0), x)])])]),
            ctx.scalar(0.5, x)])
        pdf = ctx.make_node("Mul", [ctx.make_node("Exp", [ctx.make_node("Mul", [ctx.make_node("Mul", [x, x]), ctx.scalar(-0.5, x)])]),
                                    ctx.scalar(1 / math.sqrt(2 * math.pi), x)])
        slope = ctx.make_node("Add", [cdf, ctx.make_node("Mul", [x, pdf])])
    return [ctx.make_node("Mul", [grad_outputs[0], slope])]


def _softmax_axes(ctx: RuleContext, node) -> list[int]:
    """Axes softmax normalizes over: one axis from opset 13, all axes from `axis` on before."""
    rank = ctx.rank(node.input[0])
    if ctx.opset >= 13:
        return [normalize_axis(attr(node, "axis", -1), rank)]
    return list(range(normalize_axis(attr(node, "axis", 1), rank), rank))


@rule("Softmax")
def softmax_backward(ctx: RuleContext, node, grad_outputs):
    y, g = node.output[0], grad_outputs[0]
    gy = ctx.make_node("Mul", [g, y])
    total = ctx.reduce("ReduceSum", gy, _softmax_axes(ctx, node), keepdims=True)
    return [ctx.make_node("Sub", [gy, ctx.make_node("Mul", [y, total])])]


@rule("LogSoftmax")
def log_softmax_backward(ctx: RuleContext, node, grad_outputs):
    y, g = node.output[0], grad_outputs[0]
    total = ctx.reduce("ReduceSum", g, _softmax_axes(ctx, node), keepdims=True)
    return [ctx.make_node("Sub", [g, ctx.make_node("Mul", [ctx.make_node("Exp", [y]), total])])]


# ---- smooth and thresholded activations (elementwise; the slope as a tensor, times g) ----------
@rule("Softplus")
def softplus_backward(ctx: RuleContext, node, grad_outputs):
    """d/dx log(1 + e^x) = sigmoid(x), one op, no overflow for any x. onnxruntime's Sigmoid is
    accurate absolutely (~1 ulp of 1; 0 below about -17 in float32), not relatively in its lower
    tail. It also has a float64 kernel, which Softplus itself lacks."""
    x = node.input[0]
    return [ctx.make_node("Mul", [grad_outputs[0], ctx.make_node("Sigmoid", [x])])]


@rule("Softsign")
def softsign_backward(ctx: RuleContext, node, grad_outputs):
    """d/dx x / (1 + |x|) = 1 / (1 + |x|)^2, from the input: (1 - |y|)^2 from the output would
    cancel where |x| is large."""
    x = node.input[0]
    d = ctx.make_node("Add", [ctx.make_node("Abs", [x]), ctx.scalar(1.0, x)])
    return [ctx.make_node("Div", [grad_outputs[0], ctx.make_node("Mul", [d, d])])]


@rule("Selu")
def selu_backward(ctx: RuleContext, node, grad_outputs):
    """y = gamma * x for x > 0, gamma * alpha * (e^x - 1) else: slope gamma, or gamma * alpha * e^x
    (the negative side at x = 0, as Elu's rule and torch take it). Where picks the side, so the
    e^x that overflows for large positive x is never used (a 0/1 mask times inf would be NaN);
    gamma * alpha * e^x rather than y + gamma * alpha, which cancels for very negative x."""
    x = node.input[0]
    # defaults of the ONNX spec (opset 6)
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    gamma = attr(node, "gamma", 1.05070102214813232421875)
    negative = ctx.make_node("Mul", [ctx.make_node("Exp", [x]), ctx.scalar(gamma * alpha, x)])
    slope = ctx.make_node("Where", [ctx.make_node("Greater", [x, ctx.scalar(0.0, x)]), ctx.scalar(gamma, x), negative])
    return [ctx.make_node("Mul", [grad_outputs[0], slope])]


@rule("Celu")
def celu_backward(ctx: RuleContext, node, grad_outputs):
    """y = max(0, x) + min(0, alpha * (e^(x/alpha) - 1)) (opset 12): slope 1 for x > 0 and
    e^(x/alpha) for x <= 0 (for either sign of alpha), i.e. e^(min(x, 0) / alpha) everywhere:
    one formula, no mask, no overflow on the positive side."""
    x = node.input[0]
    alpha = attr(node, "alpha", 1.0)
    clipped = ctx.make_node("Min", [x, ctx.scalar(0.0, x)])
    slope = ctx.make_node("Exp", [ctx.make_node("Div", [clipped, ctx.scalar(alpha, x)])])
    return [ctx.make_node("Mul", [grad_outputs[0], slope])]


@rule("ThresholdedRelu")
def thresholded_relu_backward(ctx: RuleContext, node, grad_outputs):
    """y = x where x > alpha, else 0: gradient g where x > alpha, else 0. Judged on the input: for
    alpha < 0 an x in (alpha, 0] passes with y == 0, so y alone cannot tell."""
    x = node.input[0]
    alpha = attr(node, "alpha", 1.0)
    return [ctx.make_node("Mul", [grad_outputs[0], ctx.mask("Greater", x, ctx.scalar(alpha, x), x)])]


@rule("Mish")
def mish_backward(ctx: RuleContext, node, grad_outputs):
    """y = x tanh(softplus(x)) (opset 18). With s = sigmoid(x), u = sigmoid(-x), D = 1 + u^2:
    e^softplus = 1/u, so t = tanh(softplus(x)) = (1 - u^2) / D = s (1 + u) / D and
    1 - t^2 = 4 u^2 / D^2; the slope t + x s (1 - t^2) is s ((1 + u) D + 4 x u^2) / D^2.

    Why this form: nothing cancels (1 - s for large x would, and 1 - t^2 from t near 1: an error
    of ~x ulp), so the slope is as accurate as onnxruntime's Sigmoid (~1 ulp of 1, absolutely),
    and only Sigmoid and arithmetic are used, which onnxruntime also runs in float64 (its
    Softplus has no float64 kernel).
    """
    x = node.input[0]
    s = ctx.make_node("Sigmoid", [x])
    u = ctx.make_node("Sigmoid", [ctx.make_node("Neg", [x])])
    u2 = ctx.make_node("Mul", [u, u])
    d = ctx.make_node("Add", [u2, ctx.scalar(1.0, x)])
    first = ctx.make_node("Mul", [ctx.make_node("Add", [u, ctx.scalar(1.0, x)]), d])
    second = ctx.make_node("Mul", [ctx.make_node("Mul", [x, u2]), ctx.scalar(4.0, x)])
    numerator = ctx.make_node("Mul", [s, ctx.make_node("Add", [first, second])])
    slope = ctx.make_node("Div", [numerator, ctx.make_node("Mul", [d, d])])
    return [ctx.make_node("Mul", [grad_outputs[0], slope])]


# ---- deconvnet and guided backprop -----------------------------------------------------------
@rule("Relu", "Clip", "LeakyRelu", rule_set="deconvnet")
def deconvnet_relu_backward(ctx: RuleContext, node, grad_outputs):
    """relu(upstream), whatever the forward activation was."""
    return [ctx.make_node("Relu", [grad_outputs[0]])] + [None] * (len(node.input) - 1)


@rule("Relu", "Clip", rule_set="redirected")
def redirected_relu_backward(ctx: RuleContext, node, grad_outputs):
    """Lucid's redirected ReLU / ReLU6 gradient (lucid/misc/redirected_relu_grad.py, which its
    render_vis takes for the first 16 steps; here the loops' GradientRun decides when): for an
    image whose exact gradient through this node is zero everywhere
    (every unit the objective reaches is inactive: a channel that is 0 on a grey or noise start),
    the upstream gradient passes, except where it would push a unit further below its floor (or
    above ReLU6's top). Elsewhere the exact gradient. Without it the optimization of such a unit
    never moves (activation maximization of most of SqueezeNet's fire9/concat_1 channels stayed
    at 0 from every start). Inactive means y at its bound (Lucid: x < 0), read from the output."""
    g = grad_outputs[0]
    exact = {"Relu": relu_backward, "Clip": clip_backward}[node.op_type](ctx, node, [g])[0]
    unused = [None] * (len(node.input) - 1)
    y = node.output[0]
    low, high = (ctx.scalar(0.0, y), None) if node.op_type == "Relu" else _clip_bounds(ctx, node)
    if exact == g or g is None:   # an unbounded Clip: the identity
        return [g] + unused
    zero = ctx.scalar(0.0, y)
    blocked = []   # at a bound, pushed beyond it
    if low is not None:
        blocked.append(ctx.make_node("And", [ctx.make_node("Not", [ctx.make_node("Greater", [y, low])]),
                                             ctx.make_node("Less", [g, zero])]))
    if high is not None:
        blocked.append(ctx.make_node("And", [ctx.make_node("Not", [ctx.make_node("Less", [y, high])]),
                                             ctx.make_node("Greater", [g, zero])]))
    stop = blocked[0] if len(blocked) == 1 else ctx.make_node("Or", blocked)
    redirected = ctx.make_node("Where", [stop, zero, g])
    magnitude = ctx.make_node("Abs", [exact])
    rank = ctx.rank(y)
    if rank > 1:   # per image: its largest exact gradient through this node
        magnitude = ctx.reduce("ReduceMax", magnitude, list(range(1, rank)), keepdims=True)
    flowing = ctx.make_node("Greater", [magnitude, zero])
    return [ctx.make_node("Where", [flowing, exact, redirected])] + unused


@rule("Relu", "Clip", "LeakyRelu", rule_set="guided")
def guided_relu_backward(ctx: RuleContext, node, grad_outputs):
    """The exact rule applied to relu(upstream): relu(g) * forward mask."""
    exact = {"Relu": relu_backward, "Clip": clip_backward, "LeakyRelu": leaky_relu_backward}[node.op_type]
    return exact(ctx, node, [ctx.make_node("Relu", [grad_outputs[0]])])
