"""Layout ops: Reshape family, Transpose, Concat/Split, Slice, Pad, Tile, DepthToSpace/SpaceToDepth, and indexing:
Gather, GatherElements, GatherND, ScatterElements, ScatterND, TopK (values)."""
from __future__ import annotations

import numpy as np
import onnx

from ...errors import Unimplemented
from ...graph.constants import slice_range
from ..context import INT64_MAX, INT64_MIN, RuleContext, attr, normalize_axis
from ..registry import rule


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape_backward(ctx: RuleContext, node, grad_outputs):
    x = node.input[0]
    return [ctx.reshape_like(grad_outputs[0], x)] + [None] * (len(node.input) - 1)


@rule("Transpose")
def transpose_backward(ctx: RuleContext, node, grad_outputs):
    perm = attr(node, "perm", None) or list(reversed(range(ctx.rank(node.input[0]))))
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return [ctx.make_node("Transpose", [grad_outputs[0]], perm=inverse)]


@rule("Concat")
def concat_backward(ctx: RuleContext, node, grad_outputs):
    rank = ctx.rank(node.output[0])
    axis = normalize_axis(attr(node, "axis"), rank)
    sizes = [ctx.static_dims(x, [axis], "Concat backward")[0] for x in node.input]
    parts = ctx.split(grad_outputs[0], axis, sizes)
    return [part if ctx.needs_grad(node, i) else None for i, part in enumerate(parts)]


@rule("Split")
def split_backward(ctx: RuleContext, node, grad_outputs):
    x = node.input[0]
    axis = normalize_axis(attr(node, "axis", 0), ctx.rank(x))
    parts = [g if g is not None else ctx.zeros_like(out) for g, out in zip(grad_outputs, node.output)]
    return [ctx.make_node("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)


def _constant_ints(ctx: RuleContext, node, index: int, what: str) -> list[int] | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    value = ctx.constant_value(node.input[index])
    if value is None:
        raise Unimplemented(f"{node.op_type} node {node.name!r} has {what} computed at run time; "
                            "its backward rule needs them constant")
    return [int(v) for v in value.reshape(-1)]


@rule("Slice")
def slice_backward(ctx: RuleContext, node, grad_outputs):
    """Place the slice back into zeros: undo negative steps, spread strided ones, then pad."""
    x, g = node.input[0], grad_outputs[0]
    rank = ctx.rank(x)
    if ctx.opset < 10:
        starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes", None), None
    else:
        axes = _constant_ints(ctx, node, 3, "axes")
        steps = _constant_ints(ctx, node, 4, "steps")
        if (ctx.constant_value(node.input[1]) is None or ctx.constant_value(node.input[2]) is None) and (
                ctx.opset >= 11 and not any(s != 1 for s in steps or [])):
            return [_pad_back_at_run_time(ctx, node, g, axes, rank)] + [None] * (len(node.input) - 1)
        starts = _constant_ints(ctx, node, 1, "starts")
        ends = _constant_ints(ctx, node, 2, "ends")
    axes = [normalize_axis(a, rank) for a in (axes if axes is not None else range(len(starts)))]
    steps = steps or [1] * len(axes)
    # axes sliced whole whatever their size (x[0:INT_MAX], exporters write it on the batch axis)
    # need no static size and no padding
    kept = [k for k, (start, end, step) in enumerate(zip(starts, ends, steps))
            if not (step == 1 and (start == 0 or start <= -(2 ** 31)) and end >= 2 ** 31 - 1)]
    axes, starts, ends, steps = ([seq[k] for k in kept] for seq in (axes, starts, ends, steps))
    dims = ctx.static_dims(x, axes, "Slice backward")
    pads = [0] * (2 * rank)
    for axis, dim, start, end, step in zip(axes, dims, starts, ends, steps):
        first, count = _slice_positions(dim, start, end, step)
        if count == 0:
            return [ctx.zeros_like(x)] + [None] * (len(node.input) - 1)
        if step < 0:
            g = ctx.slice(g, [-1], [INT64_MIN], [axis], [-1])
        stride = abs(step)
        if stride > 1 and count > 1:
            g = _spread(ctx, g, axis, stride, rank)
        covered = (count - 1) * stride + 1
        pads[axis], pads[rank + axis] = first, dim - first - covered
    if any(pads):
        g = ctx.pad(g, pads)
    return [g] + [None] * (len(node.input) - 1)


def _pad_back_at_run_time(ctx: RuleContext, node, g: str, axes: list[int] | None, rank: int) -> str:
    """Slice with unit steps whose starts or ends are computed at run time (torch's masked_scatter and
    boolean-mask assignment under the TorchScript exporter): the same padding back into zeros, its
    amounts computed in the graph. Per sliced axis of run-time size d: s and e counted from the end
    when negative and clamped to [0, d], pads s before and d - s - max(e - s, 0) after."""
    starts, ends = node.input[1], node.input[2]
    count = ctx.static_dims(starts, [0], "Slice backward")[0]
    axes = [normalize_axis(a, rank) for a in (axes if axes is not None else range(count))]
    dims = ctx.make_node("Gather", [ctx.shape_of(node.input[0]), ctx.ints(axes)])
    zero = ctx.const(np.array(0, np.int64), "zero")

    def position(value: str) -> str:
        value = ctx.make_node("Cast", [value], to=onnx.TensorProto.INT64)
        counted = ctx.make_node("Where", [ctx.make_node("Less", [value, zero]),
                                          ctx.make_node("Add", [value, dims]), value])
        return ctx.make_node("Min", [ctx.make_node("Max", [counted, zero]), dims])

    begin, end = position(starts), position(ends)
    taken = ctx.make_node("Max", [ctx.make_node("Sub", [end, begin]), zero])
    after = ctx.make_node("Sub", [ctx.make_node("Sub", [dims, begin]), taken])
    positions = ctx.ints(axes)
    full = [ctx.make_node("ScatterElements", [ctx.ints([0] * rank), positions, amount], axis=0)
            for amount in (begin, after)]
    return ctx.make_node("Pad", [g, ctx.make_node("Concat", full, axis=0)])


def _slice_positions(dim: int, start: int, end: int, step: int) -> tuple[int, int]:
    """(lowest selected index, number selected) of x[start:end:step] along an axis of size dim."""
    if step == 0:
        raise Unimplemented("Slice with step 0")
    picked = slice_range(dim, start, end, step)
    return (min(picked[0], picked[-1]) if picked else 0), len(picked)


def _spread(ctx: RuleContext, g: str, axis: int, stride: int, rank: int) -> str:
    """Insert stride-1 zeros after each element along `axis`, dropping the trailing ones."""
    shape = ctx.shape_of(g)
    expanded = ctx.unsqueeze(g, [axis + 1])
    pads = [0] * (2 * (rank + 1))
    pads[rank + 1 + axis + 1] = stride - 1
    expanded = ctx.pad(expanded, pads)
    parts = []
    if axis > 0:
        parts.append(ctx.slice(shape, [0], [axis], [0]))
    parts.append(ctx.ints([-1]))
    if axis + 1 < rank:
        parts.append(ctx.slice(shape, [axis + 1], [rank], [0]))
    merged = ctx.make_node("Reshape", [expanded, ctx.make_node("Concat", parts, axis=0)])
    # the last element needs no zeros after it
    return ctx.slice(merged, [0], [-(stride - 1)], [axis])


@rule("Pad")
def pad_backward(ctx: RuleContext, node, grad_outputs):
    """constant: crop the padding off (Pad with negated pads); edge/reflect/wrap: also fold the
    padded border back onto the elements it copies, one axis at a time."""
    x, g = node.input[0], grad_outputs[0]
    mode = attr(node, "mode", "constant")
    rank = ctx.rank(x)
    if ctx.opset < 11:
        pads = list(attr(node, "pads"))
    else:
        pads = _constant_ints(ctx, node, 1, "pads")
        axes = _constant_ints(ctx, node, 3, "axes")
        if axes is not None:
            full = [0] * (2 * rank)
            for i, a in enumerate(normalize_axis(a, rank) for a in axes):
                full[a], full[rank + a] = pads[i], pads[len(axes) + i]
            pads = full
    no_grads = [None] * (len(node.input) - 1)
    if mode == "constant":
        return [ctx.pad(g, [-p for p in pads])] + no_grads
    if mode not in ("edge", "reflect", "wrap") or min(pads) < 0:
        raise Unimplemented(f"no backward rule for Pad mode {mode!r} with pads {pads} (node {node.name!r})")
    for axis in range(rank):
        before, after = pads[axis], pads[rank + axis]
        if before or after:
            dim = ctx.static_dims(x, [axis], "Pad backward")[0]
            if mode == "wrap" and max(before, after) > dim:
                raise Unimplemented(f"Pad node {node.name!r}: wrap pads {pads} wider than axis {axis} ({dim}) "
                                    "have no backward rule")
            g = _fold_border(ctx, g, axis, rank, dim, before, after, mode)
    return [g] + no_grads


def _fold_border(ctx: RuleContext, g: str, axis: int, rank: int, dim: int, before: int, after: int, mode: str) -> str:
    """Adjoint of edge/reflect/wrap padding along one axis: [before | dim | after] -> dim."""
    def placed(t: str, lead: int, trail: int) -> str:
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = lead, trail
        return ctx.pad(t, pads)

    terms = [ctx.slice(g, [before], [before + dim], [axis])]
    if mode == "edge":
        if before:
            head = ctx.reduce("ReduceSum", ctx.slice(g, [0], [before], [axis]), [axis], keepdims=True)
            terms.append(placed(head, 0, dim - 1))
        if after:
            tail = ctx.reduce("ReduceSum", ctx.slice(g, [before + dim], [before + dim + after], [axis]), [axis], keepdims=True)
            terms.append(placed(tail, dim - 1, 0))
    elif mode == "wrap":   # the head copies x[dim - before:], the tail x[:after] (circular padding)
        if before:
            terms.append(placed(ctx.slice(g, [0], [before], [axis]), dim - before, 0))
        if after:
            terms.append(placed(ctx.slice(g, [before + dim], [before + dim + after], [axis]), 0, dim - after))
    else:
        # g[before - k] mirrors x[k] and g[before + dim - 1 + k] mirrors x[dim - 1 - k], k = 1.. pads
        if before:
            head = ctx.slice(g, [before - 1], [INT64_MIN], [axis], [-1])
            terms.append(placed(ctx.slice(head, [0], [before], [axis]), 1, dim - 1 - before))
        if after:
            tail = ctx.slice(g, [before + dim + after - 1], [before + dim - 1], [axis], [-1])
            terms.append(placed(tail, dim - 1 - after, 1))
    return ctx.add_all(terms)


@rule("Tile")
def tile_backward(ctx: RuleContext, node, grad_outputs):
    """Sum the tiles: [.., r*d, ..] -> [.., r, d, ..] -> ReduceSum over the r axes."""
    x, g = node.input[0], grad_outputs[0]
    repeats = _constant_ints(ctx, node, 1, "repeats")
    x_shape = ctx.shape(x)
    target, reduce_axes = [], []
    for axis, (r, d) in enumerate(zip(repeats, x_shape)):
        if r != 1:
            reduce_axes.append(len(target))
            target.append(r)
        target.append(d if isinstance(d, int) else 0 if r == 1 and axis == 0 else None)
    if None in target or target.count(0) > 1:
        raise Unimplemented(f"Tile backward needs static sizes on tiled axes (node {node.name!r})")
    # 0 copies dim 0 of g (the batch, untiled, stays in place)
    split = ctx.make_node("Reshape", [g, ctx.const(np.array(target, dtype=np.int64), "tile_shape")])
    return [ctx.reduce("ReduceSum", split, reduce_axes, keepdims=False), None]


# ---- DepthToSpace / SpaceToDepth (pure permutations: the adjoint is the inverse) ----------------
# ONNX spec, x: [b, c, h, w], bs the block size, C' = c / bs^2:
#   DepthToSpace DCR: reshape [b, bs, bs, C', h, w], transpose (0, 3, 4, 1, 5, 2), reshape [b, C', h bs, w bs]
#   DepthToSpace CRD: reshape [b, C', bs, bs, h, w], transpose (0, 1, 4, 2, 5, 3), reshape [b, C', h bs, w bs]
#   SpaceToDepth:     reshape [b, c, h, bs, w, bs], transpose (0, 3, 5, 1, 2, 4), reshape [b, c bs^2, h, w]
# SpaceToDepth is DCR's inverse, so each is the other's adjoint (a permutation's adjoint is its inverse).
@rule("DepthToSpace")
def depth_to_space_backward(ctx: RuleContext, node, grad_outputs):
    """DCR (the only mode before opset 11): SpaceToDepth of g. CRD: g as [b, C', h, bs, w, bs],
    the inverse transpose (0, 1, 3, 5, 2, 4) to [b, C', bs, bs, h, w], reshaped to x's shape."""
    x, g = node.input[0], grad_outputs[0]
    block = attr(node, "blocksize")
    if attr(node, "mode", "DCR") == "DCR":
        return [ctx.make_node("SpaceToDepth", [g], blocksize=block)]
    split = ctx.make_node("Reshape", [g, _crd_split_shape(ctx, node.output[0], block)])
    return [ctx.reshape_like(ctx.make_node("Transpose", [split], perm=[0, 1, 3, 5, 2, 4]), x)]


def _crd_split_shape(ctx: RuleContext, y: str, block: int) -> str:
    """[b, C', H / bs, bs, W / bs, bs] for y: [b, C', H, W], as a constant where H and W are known
    (0 copies b and C' from the tensor reshaped, -1 stands for one unknown), else from Shape(y)."""
    sizes = [d // block if isinstance(d, int) else None for d in ctx.shape(y)[2:]]
    if sizes.count(None) <= 1:
        h, w = (-1 if d is None else d for d in sizes)
        return ctx.ints([0, 0, h, block, w, block])
    shape = ctx.shape_of(y)
    spatial = ctx.make_node("Div", [ctx.slice(shape, [2], [4], [0]), ctx.ints([block, block])])
    h, w = ctx.slice(spatial, [0], [1], [0]), ctx.slice(spatial, [1], [2], [0])
    return ctx.make_node("Concat", [ctx.slice(shape, [0], [2], [0]), h, ctx.ints([block]), w, ctx.ints([block])], axis=0)


@rule("SpaceToDepth")
def space_to_depth_backward(ctx: RuleContext, node, grad_outputs):
    """DepthToSpace in DCR mode (the default in every opset) of g: SpaceToDepth's inverse."""
    return [ctx.make_node("DepthToSpace", [grad_outputs[0]], blocksize=attr(node, "blocksize"))]


# ---- Gather (on data; indices get no gradient) -----------------------------------------------------
@rule("Gather", min_opset=16)
def gather_backward(ctx: RuleContext, node, grad_outputs):
    """y = Gather(x, indices, axis): dx = zeros of x's shape with each slice of g added at its index
    along `axis`, duplicate indices adding up: ScatterElements(reduction=add) (opset 16; older
    models are version-converted, as for MaxPool).

    Why ScatterElements(add): the only arithmetic is adding each gradient element once into its
    target, the definition of the adjoint, so duplicates sum and nothing else changes. A one-hot
    MatMul also sums exactly for finite g, but costs size(axis) multiply-adds per element and
    spreads an inf in g as 0 * inf = NaN over the axis; ScatterND(add) would need the axis moved
    to the front and back (two transposes) unless it is 0; ScatterElements without reduction
    (opset 11) overwrites duplicates.

    g: x.shape[:axis] + indices.shape + x.shape[axis+1:] is viewed with the index axes merged into
    one of n = indices.size elements; the indices, shaped [1.., n, 1..], are expanded to it.
    Negative indices are allowed by ScatterElements as by Gather (constant ones are normalized
    here where the axis size is known). Indices constant or computed at run time, int32 or int64.
    """
    x, indices, g = node.input[0], node.input[1], grad_outputs[0]
    rank = ctx.rank(x)
    axis = normalize_axis(attr(node, "axis", 0), rank)
    index_rank = ctx.rank(node.output[0]) - rank + 1  # the indices' rank (known where y's is)
    around = [1] * axis, [1] * (rank - axis - 1)
    value = ctx.constant_value(indices)
    if value is not None:
        dim = ctx.shape(x)[axis]
        if isinstance(dim, int):
            value = np.where(value < 0, value + dim, value).astype(value.dtype)
        index = ctx.const(value.reshape(around[0] + [-1] + around[1]), "gather_indices")
    else:
        index = ctx.make_node("Reshape", [indices, ctx.ints(around[0] + [-1] + around[1])])
    if index_rank == 0:
        g = ctx.unsqueeze(g, [axis])
    elif index_rank > 1:
        g = ctx.make_node("Reshape", [g, _merged_index_shape(ctx, x, g, axis, index_rank)])
    index = ctx.expand_like(index, g)
    zeros = ctx.zeros_like(x)
    return [ctx.make_node("ScatterElements", [zeros, index, g], axis=axis, reduction="add"), None]


def _merged_index_shape(ctx: RuleContext, x: str, g: str, axis: int, index_rank: int) -> str:
    """Shape of g with its index axes (axis .. axis + index_rank - 1) merged into one: a constant
    where x's sizes after `axis` are known (0 copies the leading sizes, -1 is the merged axis),
    else from Shape(g)."""
    trailing = ctx.shape(x)[axis + 1:]
    if all(isinstance(d, int) for d in trailing):
        return ctx.ints([0] * axis + [-1] + list(trailing))
    shape = ctx.shape_of(g)
    parts = [ctx.slice(shape, [0], [axis], [0])] if axis else []
    parts.append(ctx.ints([-1]))
    if trailing:
        parts.append(ctx.slice(shape, [axis + index_rank], [INT64_MAX], [0]))
    return ctx.make_node("Concat", parts, axis=0)


@rule("GatherElements", min_opset=16)
def gather_elements_backward(ctx: RuleContext, node, grad_outputs):
    """y = GatherElements(x, indices, axis) reads x at `indices` along the axis, element for element:
    dx = ScatterElements(zeros, indices, g, reduction=add), Gather's scatter with the indices already
    in g's shape (duplicates add up, negative indices count from the end in both ops)."""
    x, indices = node.input[0], node.input[1]
    zeros = ctx.zeros_like(x)
    return [ctx.make_node("ScatterElements", [zeros, indices, grad_outputs[0]], axis=attr(node, "axis", 0),
                          reduction="add"), None]


@rule("GatherND", min_opset=16)
def gather_nd_backward(ctx: RuleContext, node, grad_outputs):
    """y = GatherND(x, indices, batch_dims=b): each index tuple (the last axis of indices) reads a slice
    of x; dx = zeros with each slice of g added back where it was read, duplicates summing:
    ScatterND(reduction=add) (opset 16; older models are version-converted), whose updates have
    exactly y's shape. The dynamo exporter writes adaptive average pooling to a non-divisor size and
    nearest-exact / area resizing this way.

    ScatterND has no batch_dims: with b > 0 each index tuple is prefixed with its position in the b
    leading axes (a Range per axis, expanded over the index grid), which then addresses x itself.
    Constant negative indices are normalized where the axis sizes are known (onnxruntime's ScatterND
    also counts them from the end)."""
    x, indices, g = node.input[0], node.input[1], grad_outputs[0]
    batch_dims = attr(node, "batch_dims", 0)
    index = indices
    value = ctx.constant_value(indices)
    if value is not None and value.shape[-1]:
        sizes = ctx.shape(x)[batch_dims:batch_dims + value.shape[-1]]
        if all(isinstance(d, int) for d in sizes):
            index = ctx.const(np.where(value < 0, value + np.array(sizes), value).astype(np.int64), "gather_nd_indices")
    if batch_dims:
        rank = ctx.rank(indices)
        shape = ctx.shape_of(indices)
        grid = ctx.make_node("Concat", [ctx.slice(shape, [0], [rank - 1], [0]), ctx.ints([1])], axis=0)
        zero, one = ctx.const(np.array(0, np.int64), "zero"), ctx.const(np.array(1, np.int64), "one")
        positions = []
        for axis in range(batch_dims):
            size = ctx.make_node("Gather", [shape, ctx.const(np.array(axis, np.int64), "axis")])
            along = ctx.make_node("Reshape", [ctx.make_node("Range", [zero, size, one]),
                                              ctx.ints([1] * axis + [-1] + [1] * (rank - 1 - axis))])
            positions.append(ctx.make_node("Expand", [along, grid]))
        index = ctx.make_node("Concat", positions + [index], axis=-1)
    return [ctx.make_node("ScatterND", [ctx.zeros_like(x), index, g], reduction="add"), None]


def _scatter_backward(ctx: RuleContext, node, grad_outputs, gather: str, **axis) -> list:
    """y = Scatter*(data, indices, updates): y is data with the addressed elements (slices) replaced
    by updates (reduction none) or updates added to them (add). d updates = g read back where they
    were written (the Gather twin of the op); d data = g where data survives: with reduction none
    the addressed places are zeroed (the same Scatter writing zeros), with add all of g. Duplicate
    indices with reduction none leave it to the runtime which update lands (ONNX leaves it
    undefined); each then gets the gradient of that place. Torch's dynamo exporter writes
    slice assignment and index_put this way."""
    data, indices, updates = node.input[0], node.input[1], node.input[2]
    g = grad_outputs[0]
    reduction = attr(node, "reduction", "none")
    if reduction not in ("none", "add"):
        raise Unimplemented(f"{node.op_type} node {node.name!r}: gradient with reduction {reduction!r} is not supported "
                            "(none and add are)")
    grads: list = [None, None, None]
    if ctx.needs_grad(node, 0):
        grads[0] = g if reduction == "add" else ctx.make_node(node.op_type, [g, indices, ctx.zeros_like(updates)], **axis)
    if ctx.needs_grad(node, 2):
        grads[2] = ctx.make_node(gather, [g, indices], **axis)
    return grads


@rule("ScatterElements")
def scatter_elements_backward(ctx: RuleContext, node, grad_outputs):
    return _scatter_backward(ctx, node, grad_outputs, "GatherElements", axis=attr(node, "axis", 0))


@rule("ScatterND")
def scatter_nd_backward(ctx: RuleContext, node, grad_outputs):
    return _scatter_backward(ctx, node, grad_outputs, "GatherND")


@rule("TopK", min_opset=11)
def top_k_backward(ctx: RuleContext, node, grad_outputs):
    """Values: each one's gradient goes back to the element it was taken from, at the Indices output
    along the axis. Those are distinct within each slice, so ScatterElements (opset 11) needs no
    reduction; a tie between equal elements sends the gradient to the one TopK picked, as torch does."""
    x, indices, g = node.input[0], node.output[1], grad_outputs[0]
    scattered = ctx.make_node("ScatterElements", [ctx.zeros_like(x), indices, g], axis=attr(node, "axis", -1))
    return [scattered] + [None] * (len(node.input) - 1)
