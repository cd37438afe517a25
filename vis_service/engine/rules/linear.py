"""Gemm and MatMul (both operands may be on the data path, e.g. attention)."""
from __future__ import annotations

from ..context import RuleContext, attr
from ..registry import rule


def _gemm(ctx: RuleContext, a: str, b: str, trans_a: int, trans_b: int, alpha: float, like: str) -> str:
    inputs = [a, b]
    if ctx.opset < 11:
        inputs.append(ctx.scalar(0.0, like))   # C is optional only from opset 11
    return ctx.make_node("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=float(alpha),
                         beta=0.0 if ctx.opset < 11 else None)


@rule("Gemm")
def gemm_backward(ctx: RuleContext, node, grad_outputs):
    """y = alpha * op(A) op(B) + beta * C."""
    a, b = node.input[0], node.input[1]
    y, g = node.output[0], grad_outputs[0]
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    grads: list = [None] * len(node.input)
    if ctx.needs_grad(node, 0):
        # d op(A) = alpha g op(B)ᵀ; transposed back if A was transposed
        grads[0] = (_gemm(ctx, b, g, trans_b, 1, alpha, y) if trans_a
                    else _gemm(ctx, g, b, 0, 1 - trans_b, alpha, y))
    if ctx.needs_grad(node, 1):
        # d op(B) = alpha op(A)ᵀ g
        grads[1] = (_gemm(ctx, g, a, 1, trans_a, alpha, y) if trans_b
                    else _gemm(ctx, a, g, 1 - trans_a, 0, alpha, y))
    if len(node.input) > 2 and ctx.needs_grad(node, 2):
        scaled = g if beta == 1.0 else ctx.make_node("Mul", [g, ctx.scalar(beta, y)])
        grads[2] = ctx.sum_to(scaled, node.input[2], ctx.shape(y))
    return grads


def _swap_last_two(ctx: RuleContext, x: str, rank: int) -> str:
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.make_node("Transpose", [x], perm=perm)


@rule("MatMul")
def matmul_backward(ctx: RuleContext, node, grad_outputs):
    """numpy matmul semantics: 1-D operands get a unit axis, batch axes broadcast."""
    a, b = node.input[0], node.input[1]
    g = grad_outputs[0]
    a_rank, b_rank = ctx.rank(a), ctx.rank(b)
    a_shape, b_shape = list(ctx.shape(a)), list(ctx.shape(b))
    a_mat, b_mat = a, b
    if a_rank == 1:
        g = ctx.unsqueeze(g, [-2 if b_rank > 1 else 0])
        a_mat, a_shape = ctx.unsqueeze(a, [0]), [1] + a_shape
    if b_rank == 1:
        g = ctx.unsqueeze(g, [-1])
        b_mat, b_shape = ctx.unsqueeze(b, [1]), b_shape + [1]
    batch = _broadcast(a_shape[:-2], b_shape[:-2])
    grads = [None, None]
    if ctx.needs_grad(node, 0):
        da = ctx.make_node("MatMul", [g, _swap_last_two(ctx, b_mat, len(b_shape))])
        da_shape = batch + a_shape[-2:]
        if a_rank == 1:
            da, da_shape = ctx.squeeze(da, [-2]), batch + a_shape[-1:]
        grads[0] = ctx.sum_to(da, a, da_shape)
    if ctx.needs_grad(node, 1):
        db = ctx.make_node("MatMul", [_swap_last_two(ctx, a_mat, len(a_shape)), g])
        db_shape = batch + b_shape[-2:]
        if b_rank == 1:
            db, db_shape = ctx.squeeze(db, [-1]), batch + b_shape[:1]
        grads[1] = ctx.sum_to(db, b, db_shape)
    return grads


def _broadcast(a: list, b: list) -> list:
    rank = max(len(a), len(b))
    a = [1] * (rank - len(a)) + a
    b = [1] * (rank - len(b)) + b
    return [y if x == 1 else x for x, y in zip(a, b)]
