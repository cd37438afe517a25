"""Gemm, MatMul and Einsum (both operands may be on the data path, e.g. attention)."""
from __future__ import annotations

from ...errors import Unimplemented
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
    """numpy's broadcast of two shapes; None where it is not known statically (two different
    symbols: either may be 1 at run time, and sum_to then reduces by run-time shapes)."""
    rank = max(len(a), len(b))
    a = [1] * (rank - len(a)) + a
    b = [1] * (rank - len(b)) + b
    return [x if x == y else y if x == 1 else x if y == 1 else None if not (isinstance(x, int) and isinstance(y, int))
            else max(x, y) for x, y in zip(a, b)]


# ---- Einsum ---------------------------------------------------------------------------------------
ELLIPSIS = "..."


def einsum_terms(equation: str) -> tuple[list[str], str]:
    """Input subscripts and output subscripts of an Einsum equation, the implicit output written out
    (numpy's convention, which ONNX follows: the ellipsis first, then the letters used once, sorted)."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if not arrow:
        letters = "".join(t.replace(ELLIPSIS, "") for t in terms)
        once = sorted(c for c in set(letters) if letters.count(c) == 1)
        rhs = (ELLIPSIS if any(ELLIPSIS in t for t in terms) else "") + "".join(once)
    return terms, rhs


def _axes(term: str, rank: int) -> list[str]:
    """One label per axis of a tensor with subscripts `term`: its letters, and "0", "1", ... for the
    axes the ellipsis stands for, numbered from the right (numpy aligns broadcast ellipses right)."""
    if ELLIPSIS not in term:
        return list(term)
    before, _, after = term.partition(ELLIPSIS)
    count = rank - len(before) - len(after)
    return list(before) + [str(count - 1 - i) for i in range(count)] + list(after)


def _maybe_broadcast(ctx: RuleContext, x_axes: list[str], x_shape, operands) -> bool:
    """Whether an axis of x whose size is not a number may meet another size in the other operands or
    the output ((subscripts, forward tensor, rank) each): a symbol of its own, e.g. a free batch of 1
    against the images' batch."""
    seen: dict[str, set] = {}
    for term, tensor, rank in operands:
        for label, dim in zip(_axes(term, rank), ctx.shape(tensor)):
            seen.setdefault(label, set()).add(dim)
    return any(not isinstance(dim, int) and seen.get(label, {dim}) != {dim} for label, dim in zip(x_axes, x_shape))


@rule("Einsum")
def einsum_backward(ctx: RuleContext, node, grad_outputs):
    """y = Einsum(x_1, ..., x_n): linear in each operand, so dx_k = Einsum(g, the other operands) with
    x_k's subscripts as output. What the output cannot name is put right afterwards: axes that only
    x_k has (summed in the forward: the gradient is constant along them, Unsqueeze + Expand), and
    axes where x_k was broadcast (size 1 against a larger size, or an ellipsis shorter than the
    others: ReduceSum). An operand with a repeated subscript (a diagonal) is unimplemented."""
    terms, rhs = einsum_terms(attr(node, "equation"))
    g = grad_outputs[0]
    grads: list = [None] * len(node.input)
    for k, x in enumerate(node.input):
        if not ctx.needs_grad(node, k):
            continue
        letters = terms[k].replace(ELLIPSIS, "")
        if len(set(letters)) != len(letters):
            raise Unimplemented(f"Einsum node {node.name!r} ({attr(node, 'equation')!r}): gradient w.r.t. an operand "
                                "with a repeated subscript (a diagonal) is not supported")
        sources = [(rhs, g, ctx.rank(node.output[0]))] + [
            (terms[j], node.input[j], ctx.rank(node.input[j])) for j in range(len(node.input)) if j != k]
        named = {label for term, _, rank in sources for label in _axes(term, rank)}
        x_axes = _axes(terms[k], ctx.rank(x))
        source_ellipsis = max((len(_axes(t, r)) - len(t.replace(ELLIPSIS, "")) for t, _, r in sources
                               if ELLIPSIS in t), default=None)
        # the gradient Einsum's output: x's letters that the sources name, with an ellipsis wherever a
        # source has one (onnxruntime refuses an ellipsis summed away); leading if x has none
        kept = "".join(c for c in letters if c in named)
        if source_ellipsis is None:
            out = kept
        elif ELLIPSIS in terms[k]:
            out = "".join(c for c in terms[k].replace(ELLIPSIS, "|") if c in named or c == "|").replace("|", ELLIPSIS)
        else:
            out = ELLIPSIS + kept
        dx = ctx.make_node("Einsum", [s for _, s, _ in sources],
                           equation=",".join(t for t, _, _ in sources) + "->" + out)
        out_axes = _axes(out, len(out.replace(ELLIPSIS, "")) + (source_ellipsis or 0))
        # sum what x does not have (ellipsis axes beyond its own) and where x was broadcast (size 1)
        x_shape = ctx.shape(x)
        size_of = dict(zip(x_axes, x_shape))
        summed = [i for i, label in enumerate(out_axes) if label not in size_of or size_of[label] == 1]
        if summed:
            dx = ctx.reduce("ReduceSum", dx, summed, keepdims=True)
            extra = [i for i in summed if out_axes[i] not in size_of]
            if extra:
                dx = ctx.squeeze(dx, extra)
        missing = [i for i, label in enumerate(x_axes) if label not in out_axes]
        if missing:
            dx = ctx.expand_like(ctx.unsqueeze(dx, missing), x)
        if _maybe_broadcast(ctx, x_axes, x_shape, [(rhs, node.output[0], sources[0][2])] + sources[1:]):
            # a size of x not known statically may be 1 against a larger one: reduce by run-time shapes
            dx = ctx.sum_to(dx, x, [None] * len(x_axes))
        grads[k] = dx
    return grads
