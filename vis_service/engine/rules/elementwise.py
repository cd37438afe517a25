"""Broadcasting arithmetic, variadic Sum/Mean/Max/Min, unary math, steps (zero gradient), pass-through ops."""
from __future__ import annotations

from ..context import RuleContext
from ..registry import rule


def _out_shape(ctx: RuleContext, node):
    return ctx.shape(node.output[0])


@rule("Add", "Sum")
def add_backward(ctx: RuleContext, node, grad_outputs):
    g = grad_outputs[0]
    shape = _out_shape(ctx, node)
    return [ctx.sum_to(g, x, shape) if ctx.needs_grad(node, i) else None for i, x in enumerate(node.input)]


@rule("Sub")
def sub_backward(ctx: RuleContext, node, grad_outputs):
    g = grad_outputs[0]
    shape = _out_shape(ctx, node)
    grads = [None, None]
    if ctx.needs_grad(node, 0):
        grads[0] = ctx.sum_to(g, node.input[0], shape)
    if ctx.needs_grad(node, 1):
        grads[1] = ctx.sum_to(ctx.make_node("Neg", [g]), node.input[1], shape)
    return grads


@rule("Mean")
def mean_backward(ctx: RuleContext, node, grad_outputs):
    y = node.output[0]
    g = ctx.make_node("Mul", [grad_outputs[0], ctx.scalar(1.0 / len(node.input), y)])
    shape = _out_shape(ctx, node)
    return [ctx.sum_to(g, x, shape) if ctx.needs_grad(node, i) else None for i, x in enumerate(node.input)]


def _per_channel(ctx: RuleContext, factor: str, x: str) -> bool:
    """factor is static and shaped [C, 1, ..] or [1, C, 1, ..] against x [N, C, ..]."""
    if not ctx.is_static(factor):
        return False
    x_shape, f_shape = ctx.shape(x), ctx.shape(factor)
    if len(x_shape) < 3 or not isinstance(x_shape[1], int):
        return False
    trailing = [1] * (len(x_shape) - 2)
    return list(f_shape) in ([x_shape[1]] + trailing, [1, x_shape[1]] + trailing)


@rule("Mul")
def mul_backward(ctx: RuleContext, node, grad_outputs):
    a, b = node.input[0], node.input[1]
    g = grad_outputs[0]
    shape = _out_shape(ctx, node)
    grads = [None, None]
    for i, (x, factor) in enumerate(((a, b), (b, a))):
        if ctx.needs_grad(node, i) and not ctx.needs_grad(node, 1 - i) and _per_channel(ctx, factor, x) \
                and tuple(ctx.shape(x)) == tuple(shape):
            # a per-channel constant scale (e.g. an unfolded BatchNorm): foldable, see scale_channels
            flat = ctx.make_node("Reshape", [factor, ctx.ints([-1])])
            grads[i] = ctx.scale_channels(g, flat, x)
            return grads
    if ctx.needs_grad(node, 0):
        grads[0] = ctx.sum_to(ctx.make_node("Mul", [g, b]), a, shape)
    if ctx.needs_grad(node, 1):
        grads[1] = ctx.sum_to(ctx.make_node("Mul", [g, a]), b, shape)
    return grads


@rule("Div")
def div_backward(ctx: RuleContext, node, grad_outputs):
    a, b, y = node.input[0], node.input[1], node.output[0]
    g = grad_outputs[0]
    shape = _out_shape(ctx, node)
    grads = [None, None]
    g_over_b = ctx.make_node("Div", [g, b])
    if ctx.needs_grad(node, 0):
        grads[0] = ctx.sum_to(g_over_b, a, shape)
    if ctx.needs_grad(node, 1):
        grads[1] = ctx.sum_to(ctx.make_node("Neg", [ctx.make_node("Mul", [g_over_b, y])]), b, shape)
    return grads


@rule("Pow")
def pow_backward(ctx: RuleContext, node, grad_outputs):
    a, b, y = node.input[0], node.input[1], node.output[0]
    g = grad_outputs[0]
    shape = _out_shape(ctx, node)
    grads = [None, None]
    if ctx.needs_grad(node, 0):
        exponent = b if ctx.elem_type(b) == ctx.elem_type(a) else ctx.make_node("Cast", [b], to=ctx.elem_type(a))
        slope = ctx.make_node("Mul", [exponent, ctx.make_node("Pow", [a, ctx.make_node("Sub", [exponent, ctx.scalar(1.0, a)])])])
        grads[0] = ctx.sum_to(ctx.make_node("Mul", [g, slope]), a, shape)
    if ctx.needs_grad(node, 1):
        # defined for a > 0
        grads[1] = ctx.sum_to(ctx.make_node("Mul", [g, ctx.make_node("Mul", [y, ctx.make_node("Log", [a])])]), b, shape)
    return grads


def _extremum_backward(ctx: RuleContext, node, grad_outputs, losing_comparison: str):
    """Max/Min: the inputs equal to the result share the gradient equally (k tied inputs get 1/k
    each, as torch.maximum does)."""
    y, g = node.output[0], grad_outputs[0]
    shape = _out_shape(ctx, node)
    # x is a winner where not (x < y) for Max, not (x > y) for Min
    hits = [ctx.not_mask(losing_comparison, x, y, y) for x in node.input]
    share = g if len(hits) == 1 else ctx.make_node("Div", [g, ctx.make_node("Sum", hits)])
    grads = []
    for i, (x, hit) in enumerate(zip(node.input, hits)):
        grads.append(ctx.sum_to(ctx.make_node("Mul", [share, hit]), x, shape) if ctx.needs_grad(node, i) else None)
    return grads


@rule("Max")
def max_backward(ctx: RuleContext, node, grad_outputs):
    return _extremum_backward(ctx, node, grad_outputs, "Less")


@rule("Min")
def min_backward(ctx: RuleContext, node, grad_outputs):
    return _extremum_backward(ctx, node, grad_outputs, "Greater")


@rule("Sqrt")
def sqrt_backward(ctx: RuleContext, node, grad_outputs):
    y = node.output[0]
    return [ctx.make_node("Div", [ctx.make_node("Mul", [grad_outputs[0], ctx.scalar(0.5, y)]), y])]


@rule("Exp")
def exp_backward(ctx: RuleContext, node, grad_outputs):
    return [ctx.make_node("Mul", [grad_outputs[0], node.output[0]])]


@rule("Log")
def log_backward(ctx: RuleContext, node, grad_outputs):
    return [ctx.make_node("Div", [grad_outputs[0], node.input[0]])]


@rule("Reciprocal")
def reciprocal_backward(ctx: RuleContext, node, grad_outputs):
    y = node.output[0]
    return [ctx.make_node("Neg", [ctx.make_node("Mul", [grad_outputs[0], ctx.make_node("Mul", [y, y])])])]


@rule("Sin")
def sin_backward(ctx: RuleContext, node, grad_outputs):
    return [ctx.make_node("Mul", [grad_outputs[0], ctx.make_node("Cos", [node.input[0]])])]


@rule("Cos")
def cos_backward(ctx: RuleContext, node, grad_outputs):
    return [ctx.make_node("Neg", [ctx.make_node("Mul", [grad_outputs[0], ctx.make_node("Sin", [node.input[0]])])])]


@rule("Atan")
def atan_backward(ctx: RuleContext, node, grad_outputs):
    x = node.input[0]
    return [ctx.make_node("Div", [grad_outputs[0], ctx.make_node("Add", [ctx.scalar(1.0, x), ctx.make_node("Mul", [x, x])])])]


@rule("Sign", "Floor", "Ceil", "Round", "Hardmax")
def step_backward(ctx: RuleContext, node, grad_outputs):
    """Piecewise constant: the gradient is zero (at the steps too, as torch takes it). No gradient
    flows on, and nothing is emitted: the other terms of x's gradient stand alone (LPPool's and
    softshrink's exports multiply by Sign(x)), and a wrt tensor reached through such ops only gets
    zeros (backward.py)."""
    return [None]


@rule("Neg")
def neg_backward(ctx: RuleContext, node, grad_outputs):
    return [ctx.make_node("Neg", [grad_outputs[0]])]


@rule("Abs")
def abs_backward(ctx: RuleContext, node, grad_outputs):
    x = node.input[0]
    zero = ctx.scalar(0.0, x)
    sign = ctx.make_node("Sub", [ctx.mask("Greater", x, zero, x), ctx.mask("Less", x, zero, x)])
    return [ctx.make_node("Mul", [grad_outputs[0], sign])]


@rule("Identity")
def identity_backward(ctx: RuleContext, node, grad_outputs):
    return [grad_outputs[0]]


@rule("Dropout")
def dropout_backward(ctx: RuleContext, node, grad_outputs):
    # inference: identity (ratio / training_mode inputs get no gradient)
    return [grad_outputs[0]] + [None] * (len(node.input) - 1)


@rule("Cast")
def cast_backward(ctx: RuleContext, node, grad_outputs):
    # only reached for float -> float casts (integer tensors carry no gradient)
    return [ctx.make_node("Cast", [grad_outputs[0]], to=ctx.elem_type(node.input[0]))]


@rule("Where")
def where_backward(ctx: RuleContext, node, grad_outputs):
    condition, a, b = node.input
    g = grad_outputs[0]
    shape = _out_shape(ctx, node)
    zero = ctx.scalar(0.0, node.output[0])
    grads = [None, None, None]
    if ctx.needs_grad(node, 1):
        grads[1] = ctx.sum_to(ctx.make_node("Where", [condition, g, zero]), a, shape)
    if ctx.needs_grad(node, 2):
        grads[2] = ctx.sum_to(ctx.make_node("Where", [condition, zero, g]), b, shape)
    return grads


@rule("Expand")
def expand_backward(ctx: RuleContext, node, grad_outputs):
    return [ctx.sum_to(grad_outputs[0], node.input[0], _out_shape(ctx, node)), None]
