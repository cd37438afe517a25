"""MaxPool through its switches, AveragePool through its adjoint, Lp pools, global pools."""
from __future__ import annotations

import numpy as np
from onnx import helper

from ...errors import Unimplemented
from ..context import RuleContext, attr
from ..registry import rule
from .activations import VALUE_MASK_RULES, value_mask
from .conv import Window, check_runtime_output_size, conv_input_adjoint, window_of


def check_pool_geometry(ctx: RuleContext, node) -> None:
    """Refuse geometries where onnxruntime's pool output differs from ONNX shape inference's.

    With ceil_mode and pads, onnxruntime (like PyTorch) drops a last window that would start in
    the end padding, which ONNX inference keeps; with dilations and auto_pad SAME its size differs
    too. The backward graph is built from the inferred shapes, so it would fail at run time with
    a shape error naming none of this.
    """
    dilated_same = (attr(node, "auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")
                    and any(d != 1 for d in attr(node, "dilations", None) or []))
    if attr(node, "ceil_mode", 0) or dilated_same:
        why = "ceil_mode with pads: its last window starts in the padding" if attr(node, "ceil_mode", 0) \
            else "dilations with auto_pad SAME"
        check_runtime_output_size(ctx, node, why)


@rule("MaxPool", min_opset=16)
def max_pool_backward(ctx: RuleContext, node, grad_outputs):
    """Scatter-add the gradient to the argmax positions (the switches).

    The switches come from a second MaxPool with an Indices output (flattened over
    N*C*H*W) that only the backward reads: asking the primal pool for its Indices
    makes onnxruntime leave its blocked NCHWc kernel for a plain one with layout
    reorders around it, which costs more than the extra pass. MaxUnpool would
    overwrite where overlapping windows share a maximum; ScatterElements(reduction=add) sums.
    """
    x = node.input[0]
    if attr(node, "storage_order", 0):
        raise Unimplemented(f"MaxPool node {node.name!r} uses storage_order=1 (column-major indices); no backward rule")
    check_pool_geometry(ctx, node)
    g = grad_outputs[0]
    # A ReLU (or ReLU6) before the pool: its mask is a function of the value, and each window's
    # gradient lands on an element equal to the window's maximum, so masking with the pooled
    # values first gives the same result on a tensor stride^2 times smaller (ResNet's stem,
    # VGG, AlexNet, SqueezeNet); the ReLU rule then passes the gradient on as it is.
    source = ctx.sole_gradient_source(x, node)
    mask = None
    if source is not None and ctx.rule_of(source) in VALUE_MASK_RULES:
        mask = value_mask(ctx, source, node.output[0])
    if mask is not None:
        g = ctx.make_node("Mul", [g, mask])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    _, switches = ctx.make_node("MaxPool", [x], num_outputs=2, **attrs)
    flat = ctx.ints([-1])
    indices, g = ctx.make_node("Reshape", [switches, flat]), ctx.make_node("Reshape", [g, flat])
    zeros = ctx.zeros(ctx.make_node("Reshape", [ctx.make_node("Size", [x]), flat]), x)
    scattered = ctx.make_node("ScatterElements", [zeros, indices, g], axis=0, reduction="add")
    dx = ctx.reshape_like(scattered, x)
    if mask is not None:
        ctx.mark_premasked(dx, source)
    sample_shape = ctx.shape(x)[1:]
    if all(isinstance(d, int) for d in sample_shape):
        ctx.offer_batch_sum(dx, lambda: _scatter_summed(ctx, switches, g, x, sample_shape))
    return [dx]


def _scatter_summed(ctx: RuleContext, switches: str, g: str, x: str, sample_shape: list[int]) -> str:
    """The switches' scatter summed over the batch: each row's flat indices, minus the offset of
    its sample (n * sample size), address one sample, into which ScatterElements adds every row.
    Spares the batch-sized zeros, their copy into the scatter's output and the ReduceSum after
    (ResNet-50's stem max-pool in a 17-row IG run: ~27 -> ~12 ms of kernel time, the run ~5% faster).
    `g`: the pooled gradient, flat in the switches' order."""
    size = int(np.prod(sample_shape))
    batch = ctx.make_node("Gather", [ctx.shape_of(switches), ctx.const(np.array(0, np.int64), "zero_index")])
    step = ctx.const(np.array(size, np.int64), "sample_size")
    first = ctx.make_node("Range", [ctx.const(np.array(0, np.int64), "zero"), ctx.make_node("Mul", [batch, step]), step])
    rows = ctx.make_node("Reshape", [switches, ctx.ints([0, -1])])
    within = ctx.make_node("Sub", [rows, ctx.unsqueeze(first, [1])])
    zeros = ctx.zeros(ctx.ints([size]), x)
    summed = ctx.make_node("ScatterElements", [zeros, ctx.make_node("Reshape", [within, ctx.ints([-1])]), g],
                           axis=0, reduction="add")
    return ctx.make_node("Reshape", [summed, ctx.ints([1] + list(sample_shape))])


@rule("AveragePool")
def average_pool_backward(ctx: RuleContext, node, grad_outputs):
    """Jᵀg = sum-pool adjoint of g / divisor.

    The divisor per output window (count_include_pad, ceil_mode overhang) is taken
    from the op itself: AveragePool over ones gives covered/divisor, where `covered`
    (real input elements in the window) is plain geometry computed here.
    """
    x, y = node.input[0], node.output[0]
    check_pool_geometry(ctx, node)
    window = window_of(ctx, node, x, y, attr(node, "kernel_shape"))
    channels = ctx.static_dims(x, [1], "AveragePool backward")[0]
    if _is_tiling(window) and ctx.opset >= 13:  # Resize with its roi input optional
        return [_tile_adjoint_resized(ctx, grad_outputs[0], x, window, channels)]
    rank = ctx.rank(x)
    ones = ctx.const(np.ones([1, 1] + window.in_sizes, dtype=ctx.dtype(x)), "ones")
    pooled_ones = ctx.make_node("AveragePool", [ones], **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    covered = _covered_counts(window).astype(ctx.dtype(x)).reshape([1, 1] + window.out_sizes)
    inverse_divisor = ctx.make_node("Div", [pooled_ones, ctx.const(covered, "covered")])
    scaled = ctx.make_node("Mul", [grad_outputs[0], inverse_divisor])
    if _is_tiling(window):
        return [_tile_adjoint(ctx, scaled, x, window, rank)]
    kernel = np.ones([channels, 1] + window.kernel, dtype=ctx.dtype(x))
    return [conv_input_adjoint(ctx, scaled, kernel, window, channels, kernel.shape)]


def _covered_counts(window: Window) -> np.ndarray:
    """Number of real (non-pad, non-overhang) input elements in each output window."""
    per_axis = []
    for i, o, k, s, d, b in zip(window.in_sizes, window.out_sizes, window.kernel, window.strides,
                                window.dilations, window.pads_begin):
        starts = np.arange(o) * s - b
        taps = starts[:, None] + np.arange(k)[None, :] * d
        per_axis.append(((taps >= 0) & (taps < i)).sum(axis=1))
    counts = per_axis[0]
    for axis_counts in per_axis[1:]:
        counts = np.multiply.outer(counts, axis_counts)
    return counts


def _is_tiling(window: Window) -> bool:
    """Windows that tile the input exactly (kernel == stride, no pads, no dilation)."""
    return all(k == s and d == 1 and b == 0 and e == 0 and o * s <= i
               for k, s, d, b, e, o, i in zip(window.kernel, window.strides, window.dilations,
                                              window.pads_begin, window.pads_end, window.out_sizes, window.in_sizes))


def _tile_adjoint_resized(ctx: RuleContext, g: str, x: str, window: Window, channels: int) -> str:
    """Tiling windows: each gradient element repeated over its k×k block by a nearest Resize, then
    divided by k×k as a channel scale.

    Why: onnxruntime runs an integer-scale nearest Resize in its blocked NCHWc layout (the
    broadcast Mul of _tile_adjoint is a plain kernel with reorders around it: 4 of DenseNet-121's
    120 ms backward), and the uniform 1/(k×k) folds into the weights of the Conv before the pool
    (see RuleContext.scale_channels). Full windows only (no pads, no overhang), so every divisor is k×k.
    """
    scales = ctx.const(np.array([1.0, 1.0] + [float(k) for k in window.kernel], np.float32), "scales")
    g = ctx.make_node("Resize", [g, "", scales], mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    tail = [i - o * k for i, o, k in zip(window.in_sizes, window.out_sizes, window.kernel)]
    if any(tail):
        g = ctx.pad(g, [0] * (len(tail) + 2) + [0, 0] + tail)
    factor = np.full([channels], 1.0 / float(np.prod(window.kernel)), dtype=ctx.dtype(x))
    return ctx.scale_channels(g, ctx.const(factor, "inverse_divisor"), x)


def _tile_adjoint(ctx: RuleContext, g: str, x: str, window: Window, rank: int) -> str:
    """Repeat each gradient element over its k×k block (Expand), zero the uncovered tail."""
    n = len(window.kernel)
    # [N, C, o1, 1, o2, 1, ...] -> expand -> [N, C, o1, k1, o2, k2, ...] -> [N, C, o1*k1, o2*k2, ...]
    g = ctx.unsqueeze(g, [3 + 2 * a for a in range(n)])
    blocks = [1, 1]
    for k in window.kernel:
        blocks += [1, k]
    g = ctx.make_node("Mul", [g, ctx.const(np.ones(blocks, dtype=ctx.dtype(x)), "block")])
    batch_channels = ctx.slice(ctx.shape_of(x), [0], [2], [0])
    merged = ctx.ints([o * k for o, k in zip(window.out_sizes, window.kernel)])
    g = ctx.make_node("Reshape", [g, ctx.make_node("Concat", [batch_channels, merged], axis=0)])
    tail = [i - o * k for i, o, k in zip(window.in_sizes, window.out_sizes, window.kernel)]
    if any(tail):
        g = ctx.pad(g, [0] * (n + 2) + [0, 0] + tail)
    return g


@rule("GlobalAveragePool")
def global_average_pool_backward(ctx: RuleContext, node, grad_outputs):
    x = node.input[0]
    spatial = list(range(2, ctx.rank(x)))
    sizes = ctx.static_dims(x, spatial, "GlobalAveragePool backward")
    count = int(np.prod(sizes))
    channels = ctx.shape(x)[1]
    if (len(spatial) == 2 and count <= 100 and isinstance(channels, int) and channels % 16 == 0
            and ctx.dtype(x) == np.float32):
        # The spread as a depthwise Conv of the [N, C, 1, 1] gradient with a constant 1/count kernel
        # of the map's size, padded by size - 1: onnxruntime runs it in its blocked layout, so the
        # ReLU masks and gradient sums of the last stage stay blocked too (ResNet-50's layer4: eight
        # reorders fewer, ~3.5 ms at batch 8). After an Expand they would run in NCHW. It costs
        # count multiply-adds per element: only for the small maps that classifier heads pool.
        kernel = np.full([channels, 1] + sizes, 1.0 / count, np.float32)
        pads = [k - 1 for k in sizes] * 2
        return [ctx.make_node("Conv", [grad_outputs[0], ctx.const(kernel, "spread")], pads=pads, group=channels)]
    scaled = ctx.make_node("Mul", [grad_outputs[0], ctx.scalar(1.0 / count, x)])
    return [ctx.expand_like(scaled, x)]


@rule("GlobalMaxPool")
def global_max_pool_backward(ctx: RuleContext, node, grad_outputs):
    # the elements equal to the maximum share the gradient equally (a flat map, e.g. a dead
    # channel in the deconvnet rule set, which ignores ReLU masks, would otherwise get it k times)
    x, y = node.input[0], node.output[0]
    hit = ctx.not_mask("Less", x, y, x)
    share = ctx.make_node("Div", [grad_outputs[0], ctx.reduce("ReduceSum", hit, list(range(2, ctx.rank(x))), keepdims=True)])
    return [ctx.make_node("Mul", [share, hit])]


# ---- LpPool / GlobalLpPool: y = (sum over the window of |x|^p)^(1/p) ---------------------------------
def _lp_inputs(ctx: RuleContext, node) -> tuple[str, str, float]:
    p = attr(node, "p", 2)
    if not isinstance(p, (int, float)) or p < 1:
        raise Unimplemented(f"{node.op_type} node {node.name!r}: gradient for p = {p} is not supported (p >= 1 is)")
    return node.input[0], node.output[0], float(p)


def _lp_outer(ctx: RuleContext, g: str, y: str, p: float) -> str:
    """g * dy/d(sum) up to the factor p: g * y^(1 - p), zero where y is 0 (a window of zeros: the
    subgradient 0, as torch gives for p > 1)."""
    if p == 1.0:
        return g
    power = (ctx.make_node("Reciprocal", [y]) if p == 2.0
             else ctx.make_node("Pow", [y, ctx.scalar(1.0 - p, y)]))
    zero = ctx.scalar(0.0, y)
    return ctx.make_node("Mul", [g, ctx.make_node("Where", [ctx.make_node("Greater", [y, zero]), power, zero])])


def _lp_inner(ctx: RuleContext, x: str, p: float) -> str:
    """d(|x|^p)/dx / p = |x|^(p - 1) sign(x)."""
    if p == 2.0:
        return x
    sign = ctx.make_node("Sign", [x])
    if p == 1.0:
        return sign
    return ctx.make_node("Mul", [ctx.make_node("Pow", [ctx.make_node("Abs", [x]), ctx.scalar(p - 1.0, x)]), sign])


@rule("LpPool")
def lp_pool_backward(ctx: RuleContext, node, grad_outputs):
    """dx = SumPoolAdjoint(g * y^(1-p)) * |x|^(p-1) sign(x): the windows' sums of |x|^p spread back
    as AveragePool's are (a depthwise ConvTranspose of ones), pads counting as zeros."""
    x, y, p = _lp_inputs(ctx, node)
    check_pool_geometry(ctx, node)
    window = window_of(ctx, node, x, y, attr(node, "kernel_shape"))
    channels = ctx.static_dims(x, [1], "LpPool backward")[0]
    kernel = np.ones([channels, 1] + window.kernel, dtype=ctx.dtype(x))
    spread = conv_input_adjoint(ctx, _lp_outer(ctx, grad_outputs[0], y, p), kernel, window, channels, kernel.shape)
    return [ctx.make_node("Mul", [spread, _lp_inner(ctx, x, p)])]


@rule("GlobalLpPool")
def global_lp_pool_backward(ctx: RuleContext, node, grad_outputs):
    """dx = g * y^(1-p) * |x|^(p-1) sign(x), the [N, C, 1, ...] factor broadcast over the map."""
    x, y, p = _lp_inputs(ctx, node)
    return [ctx.make_node("Mul", [_lp_outer(ctx, grad_outputs[0], y, p), _lp_inner(ctx, x, p)])]
