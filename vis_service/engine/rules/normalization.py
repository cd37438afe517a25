"""BatchNormalization (inference), Instance/Layer/Group/RMSNormalization, MeanVarianceNormalization,
LpNormalization, LRN."""
from __future__ import annotations

from ...errors import Unimplemented
from ..context import RuleContext, attr, normalize_axis
from ..registry import rule


@rule("BatchNormalization")
def batch_norm_backward(ctx: RuleContext, node, grad_outputs):
    """Inference mode: y = (x - mean) * scale / sqrt(var + eps) + bias, per channel.

    The statistics and parameters are usually constants; where they are computed from the input
    (tf2onnx writes Keras' LayerNormalization with epsilon >= 1.001e-5 as a BatchNormalization fed
    the moments of a reshaped input) each gets its own gradient, which flows on to x through them
    (dropping them gave a silently wrong input gradient)."""
    if attr(node, "training_mode", 0):
        raise Unimplemented(f"BatchNormalization node {node.name!r} in training mode has no backward rule")
    x, scale, bias, mean, var = node.input[:5]
    g = grad_outputs[0]
    std = ctx.make_node("Sqrt", [ctx.make_node("Add", [var, ctx.scalar(attr(node, "epsilon", 1e-5), x)])])
    factor = ctx.make_node("Div", [scale, std])
    grads: list = [None] * len(node.input)
    if ctx.rank(scale) == 1 and ctx.is_static(scale) and ctx.is_static(var):
        grads[0] = ctx.scale_channels(g, factor, x) if ctx.needs_grad(node, 0) else None
    else:
        grads[0] = ctx.make_node("Mul", [g, _per_channel(ctx, factor, x, scale)]) if ctx.needs_grad(node, 0) else None
    if not any(ctx.needs_grad(node, i) for i in range(1, 5)):
        return grads
    # parameters [C] broadcast over the batch and the spatial axes, [C, D1, ...] (opset < 9,
    # spatial=0) over the batch: their gradients sum over those axes
    rank = ctx.rank(x)
    axes = [0] + list(range(2, rank)) if ctx.rank(scale) == 1 else [0]
    centered = ctx.make_node("Sub", [x, _per_channel(ctx, mean, x, mean)])
    inverse = ctx.make_node("Reciprocal", [std])
    if ctx.needs_grad(node, 1):
        normalized = ctx.make_node("Mul", [centered, _per_channel(ctx, inverse, x, var)])
        grads[1] = ctx.reduce("ReduceSum", ctx.make_node("Mul", [g, normalized]), axes, keepdims=False)
    if ctx.needs_grad(node, 2):
        grads[2] = ctx.reduce("ReduceSum", g, axes, keepdims=False)
    if ctx.needs_grad(node, 3):
        summed = ctx.reduce("ReduceSum", g, axes, keepdims=False)
        grads[3] = ctx.make_node("Neg", [ctx.make_node("Mul", [summed, factor])])
    if ctx.needs_grad(node, 4):
        # d/dvar of scale * (x - mean) * (var + eps)^(-1/2) = -1/2 * scale * (x - mean) / std^3
        summed = ctx.reduce("ReduceSum", ctx.make_node("Mul", [g, centered]), axes, keepdims=False)
        cubed = ctx.make_node("Mul", [ctx.make_node("Mul", [inverse, inverse]), inverse])
        grads[4] = ctx.make_node("Mul", [ctx.make_node("Mul", [summed, scale]),
                                         ctx.make_node("Mul", [cubed, ctx.scalar(-0.5, x)])])
    return grads


def _per_channel(ctx: RuleContext, value: str, x: str, like: str) -> str:
    """A BatchNormalization parameter (of the rank of forward input `like`) broadcastable against x:
    [C] -> [C, 1, ...]; [C, D1, ...] as is."""
    extra = ctx.rank(x) - 2
    return ctx.unsqueeze(value, list(range(1, 1 + extra))) if ctx.rank(like) == 1 and extra > 0 else value


def _normalized_backward(ctx: RuleContext, x: str, g_scaled: str, axes: list[int], epsilon: float,
                         dtype_of: str | None = None) -> str:
    """Jᵀ of x -> (x - mean) / sqrt(var + eps) over `axes`, applied to g_scaled.

    dx = (g - mean(g) - x̂ mean(g x̂)) / std. `dtype_of`: a forward tensor of x's type, where x
    is a tensor the rule made (its type is not recorded).
    """
    mean = ctx.reduce("ReduceMean", x, axes, keepdims=True)
    centered = ctx.make_node("Sub", [x, mean])
    var = ctx.reduce("ReduceMean", ctx.make_node("Mul", [centered, centered]), axes, keepdims=True)
    std = ctx.make_node("Sqrt", [ctx.make_node("Add", [var, ctx.scalar(epsilon, dtype_of or x)])])
    normalized = ctx.make_node("Div", [centered, std])
    g_mean = ctx.reduce("ReduceMean", g_scaled, axes, keepdims=True)
    gx_mean = ctx.reduce("ReduceMean", ctx.make_node("Mul", [g_scaled, normalized]), axes, keepdims=True)
    numerator = ctx.make_node("Sub", [ctx.make_node("Sub", [g_scaled, g_mean]),
                                      ctx.make_node("Mul", [normalized, gx_mean])])
    return ctx.make_node("Div", [numerator, std])


@rule("InstanceNormalization")
def instance_norm_backward(ctx: RuleContext, node, grad_outputs):
    x, scale = node.input[0], node.input[1]
    rank = ctx.rank(x)
    if ctx.needs_grad(node, 1) or ctx.needs_grad(node, 2):
        raise Unimplemented(f"gradient w.r.t. scale/bias of InstanceNormalization node {node.name!r} is not supported")
    per_channel = ctx.unsqueeze(scale, list(range(1, rank - 1)))
    g_scaled = ctx.make_node("Mul", [grad_outputs[0], per_channel])
    dx = _normalized_backward(ctx, x, g_scaled, list(range(2, rank)), attr(node, "epsilon", 1e-5))
    return [dx, None, None]


@rule("LayerNormalization")
def layer_norm_backward(ctx: RuleContext, node, grad_outputs):
    x, scale = node.input[0], node.input[1]
    rank = ctx.rank(x)
    if ctx.needs_grad(node, 1) or ctx.needs_grad(node, 2):
        raise Unimplemented(f"gradient w.r.t. scale/bias of LayerNormalization node {node.name!r} is not supported")
    axes = list(range(normalize_axis(attr(node, "axis", -1), rank), rank))
    g_scaled = ctx.make_node("Mul", [grad_outputs[0], scale])
    dx = _normalized_backward(ctx, x, g_scaled, axes, attr(node, "epsilon", 1e-5))
    return [dx] + [None] * (len(node.input) - 1)


@rule("GroupNormalization")
def group_norm_backward(ctx: RuleContext, node, grad_outputs):
    """y = scale * (x - mean) / sqrt(var + eps) + bias, the statistics over each group of C / G
    channels and every spatial position (what torch.onnx's exporter emits for GroupNorm from opset
    21). The scale is per group at opset 18 ([G]: each repeated over its group's channels), per
    channel from opset 21 ([C])."""
    x, scale = node.input[0], node.input[1]
    if ctx.needs_grad(node, 1) or ctx.needs_grad(node, 2):
        raise Unimplemented(f"gradient w.r.t. scale/bias of GroupNormalization node {node.name!r} is not supported")
    rank = ctx.rank(x)
    groups = attr(node, "num_groups")
    channels = ctx.static_dims(x, [1], f"GroupNormalization node {node.name!r} backward")[0]
    per_channel = scale
    if ctx.opset < 21 and groups != channels:
        repeated = ctx.make_node("Expand", [ctx.unsqueeze(scale, [1]), ctx.ints([groups, channels // groups])])
        per_channel = ctx.make_node("Reshape", [repeated, ctx.ints([channels])])
    g_scaled = ctx.make_node("Mul", [grad_outputs[0], ctx.unsqueeze(per_channel, list(range(1, rank - 1)))])
    by_group = ctx.ints([0, groups, -1])
    grouped = [ctx.make_node("Reshape", [t, by_group]) for t in (x, g_scaled)]
    dx = _normalized_backward(ctx, grouped[0], grouped[1], [2], attr(node, "epsilon", 1e-5), dtype_of=x)
    return [ctx.reshape_like(dx, x), None, None]


@rule("RMSNormalization")
def rms_norm_backward(ctx: RuleContext, node, grad_outputs):
    """y = scale * x / sqrt(mean(x^2) + eps) over axis..end (opset 23; torch's nn.RMSNorm).

    With r = 1 / sqrt(mean(x^2) + eps) and gs = g * scale: dx = r * (gs - x * r^2 * mean(gs * x)).
    """
    x, scale = node.input[0], node.input[1]
    if ctx.needs_grad(node, 1):
        raise Unimplemented(f"gradient w.r.t. the scale of RMSNormalization node {node.name!r} is not supported")
    rank = ctx.rank(x)
    axes = list(range(normalize_axis(attr(node, "axis", -1), rank), rank))
    g_scaled = ctx.make_node("Mul", [grad_outputs[0], scale])
    mean_square = ctx.reduce("ReduceMean", ctx.make_node("Mul", [x, x]), axes, keepdims=True)
    inv_rms = ctx.make_node("Reciprocal", [ctx.make_node("Sqrt", [ctx.make_node(
        "Add", [mean_square, ctx.scalar(attr(node, "epsilon", 1e-5), x)])])])
    along = ctx.reduce("ReduceMean", ctx.make_node("Mul", [g_scaled, x]), axes, keepdims=True)
    correction = ctx.make_node("Mul", [x, ctx.make_node("Mul", [along, ctx.make_node("Mul", [inv_rms, inv_rms])])])
    return [ctx.make_node("Mul", [inv_rms, ctx.make_node("Sub", [g_scaled, correction])])] + [None] * (len(node.input) - 1)


@rule("MeanVarianceNormalization")
def mean_variance_norm_backward(ctx: RuleContext, node, grad_outputs):
    """y = (x - mean) / (std + 1e-9) over `axes` (default [0, 2, 3]): the normalized rule with the
    epsilon moved under the root (a difference of order 1e-9 / std; a constant input still gets a
    finite gradient)."""
    x = node.input[0]
    rank = ctx.rank(x)
    axes = sorted(normalize_axis(a, rank) for a in attr(node, "axes", [0, 2, 3]))
    return [_normalized_backward(ctx, x, grad_outputs[0], axes, 1e-18)]


@rule("LpNormalization")
def lp_norm_backward(ctx: RuleContext, node, grad_outputs):
    """y = x / ||x||_p along `axis` (p 1 or 2); onnxruntime gives y = 0 where the norm is 0.

    dx = (g - s * sum(g * y)) / n with s = y for p = 2 and sign(x) for p = 1; 0 where n = 0 (y is
    the constant 0 there in onnxruntime's forward).
    """
    x, y, g = node.input[0], node.output[0], grad_outputs[0]
    p = attr(node, "p", 2)
    if p not in (1, 2):
        raise Unimplemented(f"LpNormalization node {node.name!r}: p={p} (ONNX allows 1 or 2)")
    axis = [normalize_axis(attr(node, "axis", -1), ctx.rank(x))]
    norm = ctx.reduce("ReduceL2" if p == 2 else "ReduceL1", x, axis, keepdims=True)
    if p == 2:
        direction = y
    else:
        zero = ctx.scalar(0.0, x)
        direction = ctx.make_node("Sub", [ctx.mask("Greater", x, zero, x), ctx.mask("Less", x, zero, x)])
    along = ctx.reduce("ReduceSum", ctx.make_node("Mul", [g, y]), axis, keepdims=True)
    dx = ctx.make_node("Div", [ctx.make_node("Sub", [g, ctx.make_node("Mul", [direction, along])]), norm])
    zero_norm = ctx.make_node("Equal", [norm, ctx.scalar(0.0, x)])
    return [ctx.make_node("Where", [zero_norm, ctx.scalar(0.0, x), dx])]


@rule("LRN")
def lrn_backward(ctx: RuleContext, node, grad_outputs):
    """y = x d^-β, d = bias + α/size Σ_window x² over channels.

    dx = g d^-β - (2αβ/size) x Σ_window(g x d^(-β-1)); the channel window sum (odd size,
    symmetric) is an AveragePool over a unit axis, times size.
    """
    x, g = node.input[0], grad_outputs[0]
    size = attr(node, "size")
    alpha, beta, bias = attr(node, "alpha", 1e-4), attr(node, "beta", 0.75), attr(node, "bias", 1.0)
    rank = ctx.rank(x)
    half = (size - 1) // 2
    zeros = [0] * (rank - 2)
    pool = dict(kernel_shape=[size] + [1] * (rank - 2), pads=[half] + zeros + [size - 1 - half] + zeros,
                count_include_pad=1)

    def channel_window_mean(t: str) -> str:
        pooled = ctx.make_node("AveragePool", [ctx.unsqueeze(t, [1])], **pool)
        return ctx.squeeze(pooled, [1])

    d = ctx.make_node("Add", [ctx.scalar(bias, x),
                              ctx.make_node("Mul", [channel_window_mean(ctx.make_node("Mul", [x, x])), ctx.scalar(alpha, x)])])
    d_pow = ctx.make_node("Pow", [d, ctx.scalar(-beta, x)])
    direct = ctx.make_node("Mul", [g, d_pow])
    through_d = ctx.make_node("Div", [ctx.make_node("Mul", [direct, x]), d])     # g x d^(-β-1)
    spread = channel_window_mean(through_d)                                         # Σ_window / size
    correction = ctx.make_node("Mul", [ctx.make_node("Mul", [x, spread]), ctx.scalar(2.0 * alpha * beta, x)])
    return [ctx.make_node("Sub", [direct, correction])]


@rule("LRN", rule_set="deconvnet")
def lrn_deconvnet(ctx: RuleContext, node, grad_outputs):
    """Zeiler & Fergus's deconvnet does not invert contrast normalization: pass the signal on."""
    return [grad_outputs[0]]
