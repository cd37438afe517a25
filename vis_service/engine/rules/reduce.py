"""ReduceSum / ReduceMean / ReduceMax / ReduceMin / ReduceSumSquare / ReduceL2 / ReduceLogSumExp
(axes as attribute or input), and CumSum."""
from __future__ import annotations

import numpy as np

from ...errors import Unimplemented
from ..context import RuleContext, attr, normalize_axis
from ..registry import rule


def _reduced_axes(ctx: RuleContext, node) -> list[int] | None:
    """Normalized reduced axes; None means "no reduction" (noop_with_empty_axes)."""
    x = node.input[0]
    rank = ctx.rank(x)
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.constant_value(node.input[1])
        if value is None:
            raise Unimplemented(f"{node.op_type} node {node.name!r} has axes computed at run time; "
                                "its backward rule needs constant axes")
        axes = value.reshape(-1).tolist()
    if not axes:
        return None if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(normalize_axis(int(a), rank) for a in axes)


def _broadcastable(ctx: RuleContext, node, t: str, axes: list[int]) -> str:
    """Bring a reduced-shape tensor back to rank(x) (re-insert dropped axes)."""
    return t if attr(node, "keepdims", 1) else ctx.unsqueeze(t, axes)


@rule("ReduceSum", "ReduceMean")
def reduce_sum_backward(ctx: RuleContext, node, grad_outputs):
    x, g = node.input[0], grad_outputs[0]
    axes = _reduced_axes(ctx, node)
    if axes is None:
        return [g] + [None] * (len(node.input) - 1)
    g = _broadcastable(ctx, node, g, axes)
    if node.op_type == "ReduceMean":
        count = int(np.prod(ctx.static_dims(x, axes, "ReduceMean backward")))
        g = ctx.make_node("Mul", [g, ctx.scalar(1.0 / count, x)])
    return [ctx.expand_like(g, x)] + [None] * (len(node.input) - 1)


@rule("ReduceSumSquare")
def reduce_sum_square_backward(ctx: RuleContext, node, grad_outputs):
    x, g = node.input[0], grad_outputs[0]
    axes = _reduced_axes(ctx, node)
    if axes is not None:
        g = _broadcastable(ctx, node, g, axes)
    twice_x = ctx.make_node("Mul", [x, ctx.scalar(2.0, x)])
    return [ctx.make_node("Mul", [g, twice_x])] + [None] * (len(node.input) - 1)


@rule("ReduceMax", "ReduceMin")
def reduce_extremum_backward(ctx: RuleContext, node, grad_outputs):
    """The elements equal to the extremum share the gradient equally (a subgradient: each of k
    tied elements gets 1/k, as torch.amax does; giving each the whole would count it k times)."""
    x, y, g = node.input[0], node.output[0], grad_outputs[0]
    axes = _reduced_axes(ctx, node)
    if axes is None:
        return [g] + [None] * (len(node.input) - 1)
    g = _broadcastable(ctx, node, g, axes)
    y = _broadcastable(ctx, node, y, axes)
    hit = ctx.not_mask("Less" if node.op_type == "ReduceMax" else "Greater", x, y, x)
    share = ctx.make_node("Div", [hit, ctx.reduce("ReduceSum", hit, axes, keepdims=True)])
    return [ctx.make_node("Mul", [g, share])] + [None] * (len(node.input) - 1)


@rule("ReduceL2")
def reduce_l2_backward(ctx: RuleContext, node, grad_outputs):
    """y = sqrt(sum x^2): dx = x * g / y, with g / y taken as 0 where y == 0 (every x of that
    group is 0 there, or so small that x^2 underflowed; the subgradient 0, not 0 * inf = NaN).
    g / y is formed on the reduced shape (small), then broadcast against x. With
    noop_with_empty_axes and no axes, onnxruntime (and ONNX's reference) reduce over no axes:
    y = |x| elementwise, and the same formula gives g * sign(x)."""
    x, y, g = node.input[0], node.output[0], grad_outputs[0]
    axes = _reduced_axes(ctx, node)
    if axes is not None:
        g, y = _broadcastable(ctx, node, g, axes), _broadcastable(ctx, node, y, axes)
    zero = ctx.scalar(0.0, x)
    ratio = ctx.make_node("Where", [ctx.make_node("Equal", [y, zero]), zero, ctx.make_node("Div", [g, y])])
    return [ctx.make_node("Mul", [x, ratio])] + [None] * (len(node.input) - 1)


@rule("ReduceLogSumExp")
def reduce_log_sum_exp_backward(ctx: RuleContext, node, grad_outputs):
    """y = log(sum e^x): dx = g * e^(x - y), the softmax of x over the reduced axes; x - y <= 0,
    so the Exp cannot overflow. With noop_with_empty_axes and no axes y = x: dx = g."""
    x, y, g = node.input[0], node.output[0], grad_outputs[0]
    axes = _reduced_axes(ctx, node)
    if axes is None:
        return [g] + [None] * (len(node.input) - 1)
    g, y = _broadcastable(ctx, node, g, axes), _broadcastable(ctx, node, y, axes)
    softmax = ctx.make_node("Exp", [ctx.make_node("Sub", [x, y])])
    return [ctx.make_node("Mul", [softmax, g])] + [None] * (len(node.input) - 1)


@rule("CumSum")
def cumsum_backward(ctx: RuleContext, node, grad_outputs):
    """Each x element enters every output from its position on (up to it, with reverse=1; strictly, with
    exclusive=1): the adjoint sums g from each position the other way, i.e. CumSum of g with reverse
    flipped and exclusive kept. The axis input (constant or not) is the forward's own."""
    reverse = attr(node, "reverse", 0)
    return [ctx.make_node("CumSum", [grad_outputs[0], node.input[1]], exclusive=attr(node, "exclusive", 0),
                          reverse=1 - reverse), None]
