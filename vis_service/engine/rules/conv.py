"""Conv and ConvTranspose: data-path gradients (weights are constants of the model).

The input gradient of a Conv is its adjoint: a ConvTranspose whose pads and
output_padding come from the static spatial sizes (never `output_shape`, whose
odd-padding split differs between runtimes), or for stride 1 the cheaper Conv
with the kernel flipped and in/out channels swapped (also for strided depthwise
kernels, after inserting zeros into the gradient), or for strided kernels much larger
than the stride (7x7/2 stems) one Conv over all output phases, then interleaved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ...errors import Unimplemented
from ..context import INT64_MIN, RuleContext, attr
from ..registry import rule


@dataclass(frozen=True)
class Window:
    """Sliding-window geometry of a conv/pool node along its spatial axes."""
    in_sizes: list[int]
    out_sizes: list[int]
    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads_begin: list[int]
    pads_end: list[int]

    @property
    def extents(self) -> list[int]:
        return [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations)]


def window_of(ctx: RuleContext, node, x: str, y: str, kernel: Sequence[int]) -> Window:
    """Geometry with auto_pad resolved into explicit pads, from static spatial sizes."""
    rank = ctx.rank(x)
    spatial = list(range(2, rank))
    in_sizes = ctx.static_dims(x, spatial, f"{node.op_type} backward")
    out_sizes = ctx.static_dims(y, spatial, f"{node.op_type} backward")
    n = len(spatial)
    strides = list(attr(node, "strides", None) or [1] * n)
    dilations = list(attr(node, "dilations", None) or [1] * n)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i, o, k, s, d in zip(in_sizes, out_sizes, kernel, strides, dilations):
            total = max(0, (o - 1) * s + (k - 1) * d + 1 - i)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
    elif auto_pad == "VALID":
        begin, end = [0] * n, [0] * n
    else:
        pads = list(attr(node, "pads", None) or [0] * (2 * n))
        begin, end = pads[:n], pads[n:]
    return Window(in_sizes, out_sizes, list(kernel), strides, dilations, begin, end)


def check_runtime_output_size(ctx: RuleContext, node, why: str, weight_shape: Sequence[int] | None = None) -> None:
    """Unimplemented if onnxruntime gives `node` (a pool, or a ConvTranspose with `weight_shape`)
    another output size than ONNX shape inference, from which the backward graph is built; `why`
    names the attributes that make them disagree. Measured by running the node itself on a
    one-image input of the static spatial sizes (skipped where they are not static).

    The size is compared both with the model's value_info and with what ONNX's formula gives
    from the attributes: an exporter may record onnxruntime's size in value_info (torch's dynamo
    exporter does), yet onnxruntime re-infers the formula's size for the nodes the rule emits
    (the switches' MaxPool, the divisor's AveragePool) and the backward then fails inside it."""
    import onnxruntime as ort

    x, y = node.input[0], node.output[0]
    spatial = list(range(2, ctx.rank(x)))
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    in_sizes, recorded = [in_shape[a] for a in spatial], [out_shape[a] for a in spatial]
    channels = weight_shape[0] if weight_shape is not None else 1
    if not all(isinstance(d, int) for d in in_sizes + recorded):
        return
    inputs, initializers = ["x"], []
    if weight_shape is not None:
        initializers.append(numpy_helper.from_array(np.zeros(weight_shape, np.float32), "w"))
        inputs.append("w")
    probe = helper.make_node(node.op_type, inputs, ["y"], **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    graph = helper.make_graph([probe], "output_size",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, channels] + in_sizes)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ctx.opset)])
    model.ir_version = min(model.ir_version, 8)
    formula = _inferred_spatial_sizes(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    actual = list(session.run(None, {"x": np.zeros([1, channels] + in_sizes, np.float32)})[0].shape[2:])
    for inferred in (recorded, formula):
        if inferred is not None and actual != inferred:
            raise Unimplemented(f"{node.op_type} node {node.name!r}: onnxruntime computes a {actual} output where "
                                f"ONNX shape inference says {inferred} ({why}); gradients through this geometry "
                                "are not supported")


def _inferred_spatial_sizes(model: onnx.ModelProto) -> list[int] | None:
    """Spatial sizes of the probe's output by ONNX shape inference (None where it gives none)."""
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - an inference failure leaves only the recorded size to compare
        return None
    for value in inferred.graph.output:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims[2:]):
            return [d.dim_value for d in dims[2:]]
    return None


def conv_input_adjoint(ctx: RuleContext, g: str, weight: str | np.ndarray, window: Window, group: int,
                       weight_shape: Sequence[int], dtype: np.dtype | None = None) -> str:
    """Jᵀg for x of y = Conv(x, weight) with the given window geometry (no bias).

    `weight` is a tensor name or a constant array of shape [M, C/group, *kernel];
    `dtype` is the element type of x (default: that of the weight).
    Stride 1 uses a Conv with the flipped kernel (onnxruntime's ConvTranspose is ~2x
    slower, more for depthwise). Strided depthwise kernels zero-insert the gradient
    and then do the same (MobileNet v1 forward+gradient ~10% faster than with
    ConvTranspose); strided dense kernels use ConvTranspose (see _spread_applies).
    """
    if all(s == 1 for s in window.strides):
        flipped = _flipped_weight(ctx, weight, group, weight_shape)
        if flipped is not None:
            return _flipped_conv(ctx, g, flipped, window, group)
    if _polyphase_applies(ctx, weight, window, group, weight_shape):
        if dtype is None:
            dtype = ctx.dtype(weight) if isinstance(weight, str) else weight.dtype
        return _polyphase_conv(ctx, g, weight, window, weight_shape, dtype)
    if _spread_applies(ctx, window, group, weight_shape):
        flipped = _flipped_weight(ctx, weight, group, weight_shape)
        if flipped is not None:
            if dtype is None:
                dtype = ctx.dtype(weight) if isinstance(weight, str) else weight.dtype
            return _spread_flipped_conv(ctx, g, flipped, window, group, dtype)
    # ConvTranspose covers [-pads_begin, L - pads_begin) of the input, L = s*(o-1) + extent:
    # crop what lies past the input's end, or extend with output_padding where the forward
    # window never reached (that is < stride, as onnxruntime requires).
    end, output_padding = [], []
    for i, o, s, e, b in zip(window.in_sizes, window.out_sizes, window.strides, window.extents, window.pads_begin):
        past_end = s * (o - 1) + e - b - i
        end.append(max(past_end, 0))
        output_padding.append(max(-past_end, 0))
    w = weight if isinstance(weight, str) else ctx.const(weight, "weight")
    dx = ctx.make_node("ConvTranspose", [g, w], strides=window.strides, dilations=window.dilations, group=group,
                       pads=window.pads_begin + end,
                       output_padding=output_padding if any(output_padding) else None)
    if dtype is None:
        dtype = ctx.dtype(weight) if isinstance(weight, str) else weight.dtype
    return _reblocked(ctx, dx, group * weight_shape[1], len(window.strides), dtype)


def _reblocked(ctx: RuleContext, x: str, channels: int, spatial_rank: int, dtype: np.dtype) -> str:
    """x through an identity 1x1 MaxPool, which onnxruntime runs in its blocked NCHWc layout.

    onnxruntime has no NCHWc ConvTranspose: its NCHW output would otherwise turn the
    gradient sums and ReLU-mask products downstream (a whole ResNet stage's skip path)
    into NCHW ops with reorders around every Conv; one ReorderInput here keeps them blocked
    (ResNet-50 profile: reorders 7.6 -> 1.4 ms, and the gradient Sums fuse into the Convs).
    NCHWc needs 2-D float32 tensors whose channels fill whole blocks (8 or 16 by CPU).
    """
    if spatial_rank != 2 or channels % 16 or np.dtype(dtype) != np.float32:
        return x
    return ctx.make_node("MaxPool", [x], kernel_shape=[1, 1])


def _flipped_conv(ctx: RuleContext, g: str, flipped: str, window: Window, group: int) -> str:
    """Stride-1 correlation of g with the flipped kernel, cut to the input size.

    dx[i] = sum_k g[i + pads_begin - k*d] w[k]: "full" padding minus the forward pads.
    """
    begin = [e - 1 - p for e, p in zip(window.extents, window.pads_begin)]
    end = [i + e - 1 - o - b for i, e, o, b in zip(window.in_sizes, window.extents, window.out_sizes, begin)]
    if min(begin + end) < 0:
        # forward pads wider than the kernel: pad (or crop, negative) explicitly
        g = ctx.pad(g, [0, 0] + begin + [0, 0] + end)
        begin, end = [0] * len(begin), [0] * len(end)
    return ctx.make_node("Conv", [g, flipped], pads=begin + end, dilations=window.dilations, group=group)


def _spread_applies(ctx: RuleContext, window: Window, group: int, weight_shape: Sequence[int]) -> bool:
    """Depthwise 2-D kernels only: for dense kernels ConvTranspose wins (zero insertion measured
    35-60% slower end to end on ResNet-50 and DenseNet-121, also as 1x1 Conv then spreading)."""
    depthwise = group > 1 and group == weight_shape[0] and weight_shape[1] == 1
    return depthwise and ctx.opset >= 13 and len(window.strides) == 2


def _spread_flipped_conv(ctx: RuleContext, g: str, flipped: str, window: Window, group: int,
                         dtype: np.dtype) -> str:
    """Strided adjoint as zero insertion then the stride-1 flipped-kernel correlation.

    Zero insertion: nearest Resize by the strides (each element repeated s times,
    a blocked kernel in onnxruntime) times a constant phase mask keeping every s-th
    position. The spread tensor S (S[s*m] = g[m], length s*o) is the gradient of a
    stride-1 window with the same pads, so the stride-1 adjoint applies unchanged.
    """
    strides = window.strides
    spread_sizes = [s * o for s, o in zip(strides, window.out_sizes)]
    spread = _zero_insert(ctx, g, strides, window.out_sizes, dtype)
    stride_one = Window(window.in_sizes, spread_sizes, window.kernel, [1] * len(strides), window.dilations,
                        window.pads_begin, window.pads_end)
    return _flipped_conv(ctx, spread, flipped, stride_one, group)


def _zero_insert(ctx: RuleContext, g: str, strides: Sequence[int], sizes: Sequence[int], dtype: np.dtype) -> str:
    """S[s*m] = g[m], zero elsewhere, length s*o per axis: nearest Resize times a phase mask."""
    scales = ctx.const(np.array([1.0, 1.0] + [float(s) for s in strides], np.float32), "scales")
    repeated = ctx.make_node("Resize", [g, "", scales], mode="nearest",
                             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    phase = np.zeros([1, 1] + [s * o for s, o in zip(strides, sizes)], dtype)
    phase[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = 1
    return ctx.make_node("Mul", [repeated, ctx.const(phase, "phase")])


def _phase_taps(kernel: int, stride: int, pad: int) -> tuple[int, int]:
    """(u_min, taps): phase ph of the input gradient reads g[i + u] for the u with
    k = ph + pad - stride * u inside the kernel; u runs over u_min .. u_min + taps - 1 for all phases."""
    u_min = min(-((kernel - 1 - ph - pad) // stride) for ph in range(stride))  # ceil((ph + pad - kernel + 1) / s)
    u_max = max((ph + pad) // stride for ph in range(stride))
    return u_min, u_max - u_min + 1


def _polyphase_applies(ctx: RuleContext, weight, window: Window, group: int, weight_shape: Sequence[int]) -> bool:
    """Strided 2-D kernels much larger than the stride (a 7x7/2 stem, AlexNet's 11x11/4, 2x2/2
    patches): there the phase kernels waste little (7x7/2: 4x4 taps per phase, 1.31x the
    multiply-adds), and one Conv runs blocked where onnxruntime's ConvTranspose runs an
    im2col GEMM per image (ResNet-50's stem at batch 8: ~22 -> ~18 ms with the reorder and
    DepthToSpace, ~17 ms interleaved by _interleaved). Equal strides (one interleaving block), no
    dilation or groups, a weight known at build time (folded_value). Not for an image's few
    channels alone: MobileNet's 3x3/2 stem (1.78x the taps) measured 2.4 ms against
    ConvTranspose's 1.8 ms at batch 8."""
    strides = window.strides
    if (len(strides) != 2 or group != 1 or strides[0] != strides[1] or strides[0] < 2
            or any(d != 1 for d in window.dilations)):
        return False
    if not isinstance(weight, np.ndarray) and ctx.folded_value(weight) is None:
        return False
    taps = [_phase_taps(k, s, p)[1] for k, s, p in zip(window.kernel, strides, window.pads_begin)]
    waste = strides[0] * strides[1] * taps[0] * taps[1] / (window.kernel[0] * window.kernel[1])
    return waste <= 1.4


def _polyphase_conv(ctx: RuleContext, g: str, weight, window: Window, weight_shape: Sequence[int],
                    dtype: np.dtype) -> str:
    """Strided adjoint as one stride-1 Conv computing every output phase, then interleaved.

    Input gradient row s*i + ph (per axis) = sum over u of g[i + u] * w[ph + pad - s*u]: a
    correlation of g with a phase kernel of `taps` taps starting at offset u_min. Output
    channel (ph_h*s + ph_w)*C + c holds channel c's phase (ph_h, ph_w): DepthToSpace's DCR
    order, the only one before opset 11 (strides other than 2 and float types other than float32
    take DepthToSpace).
    """
    w = weight if isinstance(weight, np.ndarray) else ctx.folded_value(weight)
    m, c = weight_shape[0], weight_shape[1]
    s = window.strides[0]
    geometry = [_phase_taps(k, s, p) for k, s, p in zip(window.kernel, window.strides, window.pads_begin)]
    (u0_h, t_h), (u0_w, t_w) = geometry
    poly = np.zeros((s, s, c, m, t_h, t_w), dtype=w.dtype)
    for ph_h in range(s):
        for ty in range(t_h):
            ky = ph_h + window.pads_begin[0] - s * (u0_h + ty)
            if not 0 <= ky < window.kernel[0]:
                continue
            for ph_w in range(s):
                for tx in range(t_w):
                    kx = ph_w + window.pads_begin[1] - s * (u0_w + tx)
                    if 0 <= kx < window.kernel[1]:
                        poly[ph_h, ph_w, :, :, ty, tx] = w[:, :, ky, kx].T
    channels = c * s * s
    poly = poly.reshape(channels, m, t_h, t_w)
    blocked = -(-channels // 16) * 16  # onnxruntime's blocked Conv wants whole blocks of outputs
    if blocked != channels and np.dtype(dtype) == np.float32:
        poly = np.concatenate([poly, np.zeros((blocked - channels, m, t_h, t_w), poly.dtype)])
    phases = [-(-i // s) for i in window.in_sizes]  # rows per phase: ceil(in / s)
    begin = [-u0 for u0, _ in geometry]
    end = [p - o - b + t - 1 for p, o, b, (_, t) in zip(phases, window.out_sizes, begin, geometry)]
    if min(begin + end) < 0:
        g = ctx.pad(g, [0, 0] + begin + [0, 0] + end)
        begin, end = [0, 0], [0, 0]
    y = ctx.make_node("Conv", [g, ctx.const(np.ascontiguousarray(poly), "phase_weight")], pads=begin + end)
    if np.dtype(dtype) == np.float32 and s == 2:
        y = _interleaved(ctx, y, poly.shape[0], c, s, poly.dtype)
    else:
        if poly.shape[0] != channels:
            y = ctx.slice(y, [0], [channels], [1])
        y = ctx.make_node("DepthToSpace", [y], blocksize=s)  # DCR
    if any(s * p != i for p, i in zip(phases, window.in_sizes)):
        y = ctx.slice(y, [0, 0], list(window.in_sizes), [2, 3])
    return y


def _interleaved(ctx: RuleContext, phases: str, total: int, channels: int, stride: int, dtype: np.dtype) -> str:
    """DepthToSpace (DCR) of the phase channels, as a ConvTranspose with a one-hot stride x stride
    kernel: the windows do not overlap, so each output element is one phase channel's element.
    onnxruntime's DepthToSpace is a generic 6-D transpose: ResNet-50's stem at batch 8, 2.5 -> 1.2 ms;
    extra (block-filling) phase channels get zero rows and need no Slice. Stride 2 only: the GEMM
    spends C * s * s multiply-adds per element (AlexNet's 11x11/4 at batch 8: 1.2 ms against
    DepthToSpace's 1.0; a ViT's 16x16/16 patches: 9.9 against 0.9)."""
    one_hot = np.zeros((total, channels, stride, stride), dtype)
    for ph_h in range(stride):
        for ph_w in range(stride):
            for c in range(channels):
                one_hot[(ph_h * stride + ph_w) * channels + c, c, ph_h, ph_w] = 1
    return ctx.make_node("ConvTranspose", [phases, ctx.const(one_hot, "interleave")], strides=[stride, stride])


def _flipped_weight(ctx: RuleContext, weight: str | np.ndarray, group: int, shape: Sequence[int]) -> str | None:
    """[M, C/G, *k] -> [C, M/G, *k reversed]; None where it cannot be built (opset < 10)."""
    m, c_per_group = shape[0], shape[1]
    kernel = list(shape[2:])
    grouped = [group, m // group, c_per_group] + kernel
    swapped = [0, 2, 1] + list(range(3, 3 + len(kernel)))
    result_shape = [group * c_per_group, m // group] + kernel
    if not isinstance(weight, str):
        value = weight
    else:
        value = ctx.constant_value(weight)
    if value is not None:
        flipped = value.reshape(grouped).transpose(swapped).reshape(result_shape)
        flipped = flipped[(slice(None), slice(None)) + (slice(None, None, -1),) * len(kernel)]
        return ctx.const(np.ascontiguousarray(flipped), "flipped_weight")
    if ctx.opset < 10:
        return None
    # weights computed in the graph (e.g. ConstantOfShape): onnxruntime folds these nodes
    w = ctx.make_node("Reshape", [weight, ctx.ints(grouped)])
    w = ctx.make_node("Reshape", [ctx.make_node("Transpose", [w], perm=swapped), ctx.ints(result_shape)])
    spatial = list(range(2, 2 + len(kernel)))
    flipped = ctx.slice(w, [-1] * len(kernel), [INT64_MIN] * len(kernel), spatial, [-1] * len(kernel))
    ctx.note_weight_shape(flipped, result_shape)
    return flipped


def _bias_gradient(ctx: RuleContext, g: str, node) -> str:
    return ctx.reduce("ReduceSum", g, [0] + list(range(2, ctx.rank(g))), keepdims=False)


def _require_constant_weight(ctx: RuleContext, node) -> None:
    if ctx.needs_grad(node, 1):
        raise Unimplemented(f"gradient with respect to the weights of {node.op_type} node {node.name!r} "
                            "is not supported (only data-path gradients)")


@rule("Conv")
def conv_backward(ctx: RuleContext, node, grad_outputs):
    _require_constant_weight(ctx, node)
    x, w, y = node.input[0], node.input[1], node.output[0]
    g = grad_outputs[0]
    grads: list = [None] * len(node.input)
    if ctx.needs_grad(node, 2):
        grads[2] = _bias_gradient(ctx, g, node)
    if ctx.needs_grad(node, 0):
        w_shape = ctx.static_dims(w, range(ctx.rank(w)), "Conv backward")
        kernel = attr(node, "kernel_shape", None) or w_shape[2:]
        window = window_of(ctx, node, x, y, kernel)
        scaled = ctx.channel_scale_of(g)
        if scaled is not None:
            # g = g0 * f per output channel: use g0 and the weights scaled by f (folded by onnxruntime)
            g, factor = scaled
            w = ctx.make_node("Mul", [w, ctx.make_node("Reshape", [factor, ctx.ints([-1] + [1] * (len(w_shape) - 1))])])
        grads[0] = conv_input_adjoint(ctx, g, w, window, attr(node, "group", 1), w_shape, ctx.dtype(x))
    return grads


@rule("ConvTranspose")
def conv_transpose_backward(ctx: RuleContext, node, grad_outputs):
    """Adjoint of ConvTranspose = Conv with the same weight over the (padded/cropped) gradient."""
    _require_constant_weight(ctx, node)
    x, w, y = node.input[0], node.input[1], node.output[0]
    g = grad_outputs[0]
    grads: list = [None] * len(node.input)
    if ctx.needs_grad(node, 0):
        spatial = list(range(2, ctx.rank(x)))
        n = len(spatial)
        in_sizes = ctx.static_dims(x, spatial, "ConvTranspose backward")
        out_sizes = ctx.static_dims(y, spatial, "ConvTranspose backward")
        w_shape = ctx.static_dims(w, range(ctx.rank(w)), "ConvTranspose backward")
        if attr(node, "auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") and attr(node, "output_padding", None):
            check_runtime_output_size(ctx, node, "auto_pad SAME with output_padding", w_shape)
        kernel = attr(node, "kernel_shape", None) or w_shape[2:]
        strides = list(attr(node, "strides", None) or [1] * n)
        dilations = list(attr(node, "dilations", None) or [1] * n)
        # Forward: full result of length L = s*(i-1) + extent; y = full[begin : begin + out]
        # (positions past L are output_padding zeros). Gradient: place g at offset `begin`
        # inside a length-L zero tensor, then a strided Conv with the same weight.
        begin = _conv_transpose_begin(node, in_sizes, out_sizes, kernel, strides, dilations)
        # negative ends crop the output_padding positions, which no input reached
        end = [s * (i - 1) + (k - 1) * d + 1 - b - o
               for b, i, o, k, s, d in zip(begin, in_sizes, out_sizes, kernel, strides, dilations)]
        full = ctx.pad(g, [0, 0] + begin + [0, 0] + end) if any(begin + end) else g
        grads[0] = ctx.make_node("Conv", [full, w], strides=strides, dilations=dilations,
                                 group=attr(node, "group", 1), kernel_shape=list(kernel))
    if ctx.needs_grad(node, 2):
        grads[2] = _bias_gradient(ctx, g, node)
    return grads


def _conv_transpose_begin(node, in_sizes, out_sizes, kernel, strides, dilations) -> list[int]:
    """Leading crop of a ConvTranspose per axis, following onnxruntime's resolution of auto_pad/output_shape."""
    n = len(in_sizes)
    pads = attr(node, "pads", None)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if attr(node, "output_shape", None) is None and auto_pad in ("NOTSET", "VALID"):
        return list(pads[:n]) if pads and auto_pad == "NOTSET" else [0] * n
    output_padding = list(attr(node, "output_padding", None) or [0] * n)
    begin = []
    for i, o, k, s, d, op in zip(in_sizes, out_sizes, kernel, strides, dilations, output_padding):
        total = max(0, s * (i - 1) + op + (k - 1) * d + 1 - o)
        begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    return begin


@rule("Col2Im")
def col2im_backward(ctx: RuleContext, node, grad_outputs):
    """y = Col2Im(x, image_shape, block_shape): the blocks (columns of x, channel-major: c, then the
    block's offsets) summed into the image at their sliding-window places (torch's F.fold). Its
    adjoint cuts g into the same blocks (F.unfold): a depthwise Conv whose C * prod(block) output
    channels each pick one offset of their channel (one-hot kernels), with Col2Im's strides, pads and
    dilations, reshaped to x's [N, C * prod(block), L]."""
    x = node.input[0]
    block = ctx.constant_value(node.input[2])
    if block is None:
        raise Unimplemented(f"Col2Im node {node.name!r}: a block shape computed at run time is not supported")
    block = [int(b) for b in block.reshape(-1)]
    taps = int(np.prod(block))
    rows = ctx.static_dims(x, [1], "Col2Im backward")[0]
    channels = rows // taps
    picks = np.zeros([rows, 1] + block, dtype=ctx.dtype(x))
    for row in range(rows):
        picks[(row, 0) + np.unravel_index(row % taps, block)] = 1
    n = len(block)
    blocks = ctx.make_node("Conv", [grad_outputs[0], ctx.const(picks, "unfold")], group=channels,
                           strides=attr(node, "strides", None) or [1] * n,
                           dilations=attr(node, "dilations", None) or [1] * n,
                           pads=attr(node, "pads", None) or [0] * (2 * n))
    return [ctx.reshape_like(blocks, x), None, None]
