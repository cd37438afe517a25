"""QuantizeLinear / DequantizeLinear: quantized graphs in QDQ form, by the straight-through estimator.

A QDQ graph (onnxruntime's static quantizer, TensorRT-style exports) computes in float between pairs
y = DequantizeLinear(QuantizeLinear(x)) = (clamp(round(x / s) + z, qmin, qmax) - z) * s. Rounding
has a zero derivative almost everywhere, so the exact gradient says nothing; quantization-aware
training differentiates each pair as the identity where the integer is representable and as zero
where it saturates (the clipped straight-through estimator of torch's FakeQuantize), and so does
every rule set here. The saturation mask matters: the quantizer folds a ReLU into the activation's
QuantizeLinear (a zero point at the bottom of the range), and the mask is that ReLU's gradient.

The quantized integer tensor gets a float gradient, d/d(its integer value): DequantizeLinear passes
g * s back to it, QuantizeLinear g / s on to x where round(x / s) + z lies in [qmin, qmax].
Reshapes between the two apply their own rules to it (engine/backward.py: QUANTIZED_LAYOUT);
operator-form quantized ops (QLinearConv, ...) have no rule.

A QuantizeLinear whose range starts at 0 (zero point = qmin) applied to a computed activation is a
ReLU the quantizer folded away (ReLU6 too, with its top at the range's end): the `guided` and
`deconvnet` rule sets rectify the gradient there as their ReLU rules do, or both would give the
plain gradient on every QDQ model. The images' own QuantizeLinear (non-negative pixels) is not one.
"""
from __future__ import annotations

import numpy as np
import onnx

from ...errors import Unimplemented
from ..context import RuleContext, attr, normalize_axis
from ..registry import rule

_RANGES = {
    onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.UINT4: (0, 15), onnx.TensorProto.INT4: (-8, 7),
}


def _per_axis(ctx: RuleContext, node, value: str, x: str) -> str:
    """A scale or zero point broadcastable against x: as it is per tensor, reshaped along `axis`
    (default 1) per channel. Blocked quantization (opset 21 block_size) is unimplemented."""
    if attr(node, "block_size", 0):
        raise Unimplemented(f"{node.op_type} node {node.name!r}: gradients through blocked quantization "
                            "(block_size) are not supported")
    shape = ctx.shape(value)
    if len(shape) == 0 or tuple(shape) == (1,):
        return value
    rank = ctx.rank(x)
    axis = normalize_axis(attr(node, "axis", 1), rank)
    return ctx.make_node("Reshape", [value, ctx.ints([1] * axis + [-1] + [1] * (rank - axis - 1))])


@rule("DequantizeLinear")
def dequantize_linear_backward(ctx: RuleContext, node, grad_outputs):
    """y = (x_q - z) * s: d x_q = g * s (a float gradient for the integer tensor)."""
    scale = _per_axis(ctx, node, node.input[1], node.input[0])
    return [ctx.make_node("Mul", [grad_outputs[0], scale])] + [None] * (len(node.input) - 1)


def _range(ctx: RuleContext, node) -> tuple[int, int]:
    """[qmin, qmax] of the QuantizeLinear's integer type."""
    bounds = _RANGES.get(ctx.info(node.output[0]).elem_type)
    if bounds is None:
        kind = onnx.TensorProto.DataType.Name(ctx.info(node.output[0]).elem_type)
        raise Unimplemented(f"QuantizeLinear node {node.name!r}: gradients through quantization to {kind} are not "
                            f"supported (integer types of up to 16 bits are)")
    return bounds


def folds_relu(ctx: RuleContext, node) -> bool:
    """Whether QuantizeLinear `node` rectifies a computed activation: every zero point at qmin (the
    representable reals start at 0; no zero point means 0 in uint8) and its input not the images."""
    low, _ = _range(ctx, node)
    if ctx.is_data(node.input[0]):
        return False
    if len(node.input) < 3 or not node.input[2]:
        return low == 0
    zero = ctx.constant_value(node.input[2])
    return zero is not None and bool(np.all(zero.astype(np.int64) == low))


@rule("QuantizeLinear", min_opset=13)
def quantize_linear_backward(ctx: RuleContext, node, grad_outputs):
    """q = clamp(round(x / s) + z, qmin, qmax): dx = g / s where round(x / s) + z is in [qmin, qmax],
    else 0 (clipped straight-through estimator). Rounding as onnxruntime's QuantizeLinear does it:
    Round, half to even (opset 11; models below 13 are converted for the per-axis forms)."""
    x = node.input[0]
    bounds = _range(ctx, node)
    scale = _per_axis(ctx, node, node.input[1], x)
    level = ctx.make_node("Round", [ctx.make_node("Div", [x, scale])])
    if len(node.input) > 2 and node.input[2]:
        zero = ctx.make_node("Cast", [_per_axis(ctx, node, node.input[2], x)], to=ctx.elem_type(x))
        level = ctx.make_node("Add", [level, zero])
    low, high = (ctx.scalar(float(b), x) for b in bounds)
    representable = ctx.make_node("And", [ctx.make_node("Not", [ctx.make_node("Less", [level, low])]),
                                          ctx.make_node("Not", [ctx.make_node("Greater", [level, high])])])
    dx = ctx.make_node("Div", [grad_outputs[0], scale])
    dx = ctx.make_node("Mul", [dx, ctx.make_node("Cast", [representable], to=ctx.elem_type(x))])
    return [dx] + [None] * (len(node.input) - 1)


@rule("QuantizeLinear", rule_set="guided", min_opset=13)
def guided_quantize_linear_backward(ctx: RuleContext, node, grad_outputs):
    """At a folded ReLU: the estimator applied to relu(upstream), as the guided ReLU rule does."""
    g = grad_outputs[0]
    if folds_relu(ctx, node):
        g = ctx.make_node("Relu", [g])
    return quantize_linear_backward(ctx, node, [g])


@rule("QuantizeLinear", rule_set="deconvnet", min_opset=13)
def deconvnet_quantize_linear_backward(ctx: RuleContext, node, grad_outputs):
    """At a folded ReLU: relu(upstream) / s whatever the forward value was, as the deconvnet ReLU rule."""
    if not folds_relu(ctx, node):
        return quantize_linear_backward(ctx, node, grad_outputs)
    scale = _per_axis(ctx, node, node.input[1], node.input[0])
    return [ctx.make_node("Div", [ctx.make_node("Relu", [grad_outputs[0]]), scale])] + [None] * (len(node.input) - 1)
