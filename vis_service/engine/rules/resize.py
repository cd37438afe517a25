"""Resize / Upsample: the adjoint of a separable interpolation, one axis at a time.

Nearest, linear and cubic resizing are separable and linear in the input, so the
gradient applies Mᵀ per resized axis, where M [out, in] is that axis's interpolation
matrix. M is measured by running the very op (same attributes, same opset) in
onnxruntime on a basis at build time: the adjoint then matches the runtime's
coordinate conventions exactly. Integer-factor nearest upsampling, the common case,
becomes a Reshape + ReduceSum instead of a MatMul.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ...errors import Unimplemented
from ..context import RuleContext, attr
from ..registry import rule


def _scales_and_sizes(ctx: RuleContext, node) -> tuple[list[float] | None, list, list]:
    """Per-axis scales if the node gives scales (else None), and static input/output sizes (batch as 1)."""
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x)
    in_sizes = ctx.static_dims(x, range(1, rank), f"{node.op_type} backward")
    out_sizes = ctx.static_dims(y, range(1, rank), f"{node.op_type} backward")
    scales = None
    if node.op_type == "Upsample" and attr(node, "scales", None) is not None:
        scales = list(attr(node, "scales"))
    else:
        scales_input = 1 if node.op_type == "Upsample" or ctx.opset < 11 else 2
        if len(node.input) > scales_input and node.input[scales_input]:
            value = ctx.constant_value(node.input[scales_input])
            if value is None:
                raise Unimplemented(f"{node.op_type} node {node.name!r} has scales computed at run time")
            if value.size:
                scales = value.reshape(-1).astype(float).tolist()
    axes = attr(node, "axes", None)
    if scales is not None and axes is not None and len(scales) == len(axes) and len(set(int(a) % rank for a in axes)) == len(axes):
        full = [1.0] * rank      # opset 18 'axes': the scales of the listed axes, 1 elsewhere
        for a, value in zip(axes, scales):
            full[int(a) % rank] = value
        scales = full
    if scales is not None and len(scales) != rank:
        raise Unimplemented(f"{node.op_type} node {node.name!r}: 'axes' subsets are not supported")
    return scales, [1] + in_sizes, [1] + out_sizes


def _axis_matrix(node, opset: int, in_size: int, out_size: int, scale: float | None, dtype) -> np.ndarray:
    """M [out, in] of one axis: run the node's op on a basis [1, in, 1, in] resized along the last axis."""
    node_attrs = [a for a in node.attribute if a.name not in ("axes", "keep_aspect_ratio_policy")]
    inputs = ["basis"]
    initializers = []
    if scale is not None:
        scales = np.array([1, 1, 1, scale], dtype=np.float32)
    if node.op_type == "Upsample" and opset < 9:
        op = helper.make_node("Upsample", inputs, ["resized"])
        op.attribute.extend([a for a in node_attrs if a.name != "scales"])
        op.attribute.append(helper.make_attribute("scales", scales.tolist()))
    else:
        if node.op_type == "Upsample" or opset < 11:
            initializers.append(helper.make_tensor("scales", onnx.TensorProto.FLOAT, [4], scales))
            inputs.append("scales")
        else:
            if opset < 13:  # roi is a required input at opsets 11 and 12 (empty: not used by these modes)
                initializers.append(helper.make_tensor("roi", onnx.TensorProto.FLOAT, [0], []))
                inputs.append("roi")
            else:
                inputs.append("")
            if scale is not None:
                initializers.append(helper.make_tensor("scales", onnx.TensorProto.FLOAT, [4], scales))
                inputs.append("scales")
            else:
                if opset < 13:  # scales is required too there: empty when sizes are given
                    initializers.append(helper.make_tensor("no_scales", onnx.TensorProto.FLOAT, [0], []))
                    inputs += ["no_scales", "sizes"]
                else:
                    inputs += ["", "sizes"]
                initializers.append(helper.make_tensor("sizes", onnx.TensorProto.INT64, [4], [1, in_size, 1, out_size]))
        op = helper.make_node(node.op_type, inputs, ["resized"])
        op.attribute.extend(node_attrs)
    graph = helper.make_graph([op], "axis_matrix",
                              [helper.make_tensor_value_info("basis", onnx.TensorProto.FLOAT, [1, in_size, 1, in_size])],
                              [helper.make_tensor_value_info("resized", onnx.TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    basis = np.eye(in_size, dtype=np.float32).reshape(1, in_size, 1, in_size)
    resized = session.run(None, {"basis": basis})[0]     # [1, in, 1, out]: row i = M[:, i]
    return resized[0, :, 0, :].T.astype(dtype)


def _is_block_repeat(matrix: np.ndarray) -> int:
    """Factor s if matrix[o, i] == (i == o // s) (integer nearest upsampling), else 0."""
    out_size, in_size = matrix.shape
    if out_size % in_size:
        return 0
    factor = out_size // in_size
    expected = np.zeros_like(matrix)
    expected[np.arange(out_size), np.arange(out_size) // factor] = 1
    return factor if np.array_equal(matrix, expected) else 0


@rule("Resize", "Upsample")
def resize_backward(ctx: RuleContext, node, grad_outputs):
    if attr(node, "coordinate_transformation_mode", "") == "tf_crop_and_resize":
        raise Unimplemented(f"{node.op_type} node {node.name!r}: tf_crop_and_resize has no backward rule")
    x, g = node.input[0], grad_outputs[0]
    rank = ctx.rank(x)
    scales, in_sizes, out_sizes = _scales_and_sizes(ctx, node)
    if (scales is not None and scales[0] != 1) or _resizes_batch(ctx, node):
        raise Unimplemented(f"{node.op_type} node {node.name!r} resizes the batch axis")
    if 0 in out_sizes:
        # an empty output: the objective cannot depend on x (a MatMul over an empty axis is not
        # guaranteed to give zeros)
        return [ctx.make_node("Mul", [x, ctx.scalar(0.0, x)])] + [None] * (len(node.input) - 1)
    for axis in range(1, rank):
        scale = None if scales is None else scales[axis]
        i, o = in_sizes[axis], out_sizes[axis]
        if i == o and (scale is None or scale == 1):
            continue
        matrix = _axis_matrix(node, ctx.opset, i, o, scale, ctx.dtype(x))
        g = _apply_transpose(ctx, g, matrix, axis, rank)
    return [g] + [None] * (len(node.input) - 1)


def _resizes_batch(ctx: RuleContext, node) -> bool:
    """True if the output's batch dim is a number other than the input's. A symbolic output batch
    (inference names it afresh for scales) says nothing; nor does an output batch of 1 on a
    symbolic input batch: exporters write the batch of the example they ran (dynamo's
    F.interpolate(size=...) gives constant sizes [1, C, H, W]), which keeps the batch of the one
    image the graph can then run with (`prepare_model` frees such sizes; a graph it did not
    prepare fails in its forward at any other batch)."""
    given, result = ctx.shape(node.input[0])[0], ctx.shape(node.output[0])[0]
    if isinstance(result, int) and result == 1 and not isinstance(given, int):
        return False
    return isinstance(result, int) and given != result


def _apply_transpose(ctx: RuleContext, g: str, matrix: np.ndarray, axis: int, rank: int) -> str:
    """Contract g's `axis` (size out) with matrix [out, in] -> size in."""
    out_size, in_size = matrix.shape
    factor = _is_block_repeat(matrix)
    if factor:
        # [.., in*s, ..] -> [.., in, s, ..] -> sum over s
        shape = ctx.shape_of(g)
        parts = []
        if axis > 0:
            parts.append(ctx.slice(shape, [0], [axis], [0]))
        parts.append(ctx.ints([in_size, factor]))
        if axis + 1 < rank:
            parts.append(ctx.slice(shape, [axis + 1], [rank], [0]))
        split = ctx.make_node("Reshape", [g, ctx.make_node("Concat", parts, axis=0)])
        return ctx.reduce("ReduceSum", split, [axis + 1], keepdims=False)
    to_last = [a for a in range(rank) if a != axis] + [axis]
    back = [0] * rank
    for position, a in enumerate(to_last):
        back[a] = position
    moved = g if axis == rank - 1 else ctx.make_node("Transpose", [g], perm=to_last)
    contracted = ctx.make_node("MatMul", [moved, ctx.const(np.ascontiguousarray(matrix), "interpolation")])
    return contracted if axis == rank - 1 else ctx.make_node("Transpose", [contracted], perm=back)
