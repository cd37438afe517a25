"""Operator-form quantized graphs rewritten into QDQ form, for their backward graph only.

onnxruntime's quantizer (QuantFormat.QOperator) and the ONNX model zoo's int8 models compute on
integers in fused ops: QLinearConv, QLinearMatMul and onnxruntime's com.microsoft QLinearAdd,
QLinearMul, QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat, QGemm, QLinearSigmoid,
QLinearLeakyRelu, with MaxPool taking the integers directly. Each is, by its definition, the float op
on the dequantized operands, quantized again:

    QLinearConv(x, xs, xz, w, ws, wz, ys, yz, B) = Q(Conv(DQ(x), (w - wz) * ws, B * xs * ws), ys, yz)

and a MaxPool of integers is Q(MaxPool(DQ(x))) with x's own scale (dequantization is increasing).
Written so, the graph is in QDQ form, which rules/quantization.py differentiates (the clipped
straight-through estimator), and its forward emulates the integer kernels in float (results may
differ from them by a rounding). Weights and biases become float constants here (they are constant
in such models; activations are quantized per tensor), so no per-axis DequantizeLinear is needed
at the opsets these models use (10-12). Only the backward graph is rewritten; forward-only calls
keep onnxruntime's integer kernels. Ops or operands outside these forms are left as they are (the
gradient then stops at them, UNIMPLEMENTED naming the node).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.loading import infer

STANDARD = ("", "ai.onnx")
CONTRIB = "com.microsoft"
_ELEMENTWISE = {"QLinearAdd": "Add", "QLinearMul": "Mul"}
_UNARY = {"QLinearSigmoid": "Sigmoid", "QLinearLeakyRelu": "LeakyRelu",
          "QLinearGlobalAveragePool": "GlobalAveragePool", "QLinearAveragePool": "AveragePool"}
# ops that move integers without changing their scale: their output keeps the input's quantization
_PASS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "MaxPool"}


def has_operator_form(model: onnx.ModelProto) -> bool:
    return any((n.domain in STANDARD and n.op_type in ("QLinearConv", "QLinearMatMul"))
               or (n.domain == CONTRIB and n.op_type.startswith(("QLinear", "QGemm"))) for n in model.graph.node)


def to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with its operator-form quantized ops written as DequantizeLinear -> float op
    -> QuantizeLinear (output names kept), shapes inferred again."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    constants = {t.name: t for t in graph.initializer}
    taken = {o for n in graph.node for o in n.output} | set(constants) | {i.name for i in graph.input}
    counter = [0]

    def fresh(base: str) -> str:
        while True:
            counter[0] += 1
            name = f"{base}__qdq{counter[0]}"
            if name not in taken:
                taken.add(name)
                return name

    def value(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(constants[name]) if name in constants else None

    def add_constant(array: np.ndarray, base: str) -> str:
        name = fresh(base)
        graph.initializer.append(numpy_helper.from_array(array, name))
        constants[name] = graph.initializer[-1]
        return name

    quant: dict[str, tuple[str, str]] = {}    # integer tensor -> (scale, zero point) it holds reals by
    nodes: list[onnx.NodeProto] = []

    def dq(x: str, label: str, scale: str | None = None, zero: str | None = None) -> str:
        """DequantizeLinear of x by the scale and zero point an op names for it, else its producer's."""
        if scale is None:
            scale, zero = quant[x]
        name = fresh(f"{label}_dequantized")
        inputs = [x, scale] + ([zero] if zero else [])
        nodes.append(helper.make_node("DequantizeLinear", inputs, [name], name=fresh(f"{label}/dequantize")))
        return name

    def q(x: str, scale: str, zero: str, output: str, label: str) -> None:
        inputs = [x, scale] + ([zero] if zero else [])
        nodes.append(helper.make_node("QuantizeLinear", inputs, [output], name=fresh(f"{label}/quantize")))
        quant[output] = (scale, zero)

    def weight(w: str, scale: str, zero: str, axis: int) -> np.ndarray | None:
        """(w - zero) * scale as float32, a per-channel scale along `axis`."""
        wv, sv, zv = value(w), value(scale), value(zero) if zero else np.zeros((), np.int32)
        if wv is None or sv is None or zv is None:
            return None
        shape = [1] * wv.ndim
        if sv.size > 1:
            shape[axis] = -1
        return ((wv.astype(np.float64) - zv.astype(np.float64).reshape(shape if zv.size > 1 else ()))
                * sv.astype(np.float64).reshape(shape if sv.size > 1 else ())).astype(np.float32)

    def bias(b: str, x_scale: str, w_scale: str) -> np.ndarray | None:
        bv, xs, ws = value(b), value(x_scale), value(w_scale)
        if bv is None or xs is None or ws is None:
            return None
        return (bv.astype(np.float64) * xs.astype(np.float64).reshape(()) * ws.astype(np.float64).reshape(-1)
                ).astype(np.float32).reshape(bv.shape)

    for node in graph.node:
        op, label = node.op_type, node.name or node.op_type
        inp = list(node.input) + [""] * 9
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        standard, contrib = node.domain in STANDARD, node.domain == CONTRIB
        if (standard or contrib) and op == "QuantizeLinear":
            quant[node.output[0]] = (inp[1], inp[2])
        elif standard and op in _PASS and node.input and node.input[0] in quant:
            if op == "MaxPool":
                if len(node.output) > 1 and node.output[1]:
                    nodes.append(node)
                    continue
                pooled = fresh(f"{label}_float")
                nodes.append(helper.make_node("MaxPool", [dq(node.input[0], label)], [pooled], name=label, **attrs))
                q(pooled, *quant[node.input[0]], node.output[0], label)
                continue
            quant[node.output[0]] = quant[node.input[0]]
        elif standard and op == "QLinearConv" and inp[0] in quant:
            w = weight(inp[3], inp[4], inp[5], 0)
            b = bias(inp[8], inp[1], inp[4]) if inp[8] else None
            if w is None or (inp[8] and b is None):
                nodes.append(node)
                continue
            conv_inputs = [dq(inp[0], label, inp[1], inp[2]), add_constant(w, f"{label}_weight")]
            if b is not None:
                conv_inputs.append(add_constant(b, f"{label}_bias"))
            y = fresh(f"{label}_float")
            nodes.append(helper.make_node("Conv", conv_inputs, [y], name=label, **attrs))
            q(y, inp[6], inp[7], node.output[0], label)
            continue
        elif standard and op == "QLinearMatMul" and inp[0] in quant:
            w = weight(inp[3], inp[4], inp[5], -1)
            if w is None:
                nodes.append(node)
                continue
            y = fresh(f"{label}_float")
            nodes.append(helper.make_node("MatMul", [dq(inp[0], label, inp[1], inp[2]), add_constant(w, f"{label}_weight")],
                                          [y], name=label))
            q(y, inp[6], inp[7], node.output[0], label)
            continue
        elif contrib and op == "QGemm" and inp[0] in quant:
            w = weight(inp[3], inp[4], inp[5], 0 if attrs.get("transB", 0) else -1)
            b = bias(inp[6], inp[1], inp[4]) if inp[6] else None
            # alpha 1 only (what onnxruntime's quantizer writes): how alpha scales the int32 C is not
            # something to guess
            if w is None or (inp[6] and b is None) or attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0:
                nodes.append(node)
                continue
            gemm_inputs = [dq(inp[0], label, inp[1], inp[2]), add_constant(w, f"{label}_weight")]
            if b is not None:
                gemm_inputs.append(add_constant(b, f"{label}_bias"))
            y = fresh(f"{label}_float") if inp[7] else node.output[0]
            nodes.append(helper.make_node("Gemm", gemm_inputs, [y], name=label, transB=int(attrs.get("transB", 0))))
            if inp[7]:
                q(y, inp[7], inp[8], node.output[0], label)
            continue
        elif contrib and op in _ELEMENTWISE and inp[0] in quant and (inp[3] in quant or inp[3] in constants):
            y = fresh(f"{label}_float")
            nodes.append(helper.make_node(_ELEMENTWISE[op], [dq(inp[0], label, inp[1], inp[2]),
                                                             dq(inp[3], label, inp[4], inp[5])], [y], name=label))
            q(y, inp[6], inp[7], node.output[0], label)
            continue
        elif contrib and op in _UNARY and inp[0] in quant and not attrs.get("channels_last", 0):
            kept = {k: v for k, v in attrs.items() if k != "channels_last"}
            y = fresh(f"{label}_float")
            nodes.append(helper.make_node(_UNARY[op], [dq(inp[0], label, inp[1], inp[2])], [y], name=label, **kept))
            q(y, inp[3], inp[4], node.output[0], label)
            continue
        elif contrib and op == "QLinearConcat" and all(x in quant for x in node.input[2::3]):
            y = fresh(f"{label}_float")
            parts = [dq(node.input[k], label, node.input[k + 1], node.input[k + 2]) for k in range(2, len(node.input), 3)]
            nodes.append(helper.make_node("Concat", parts, [y], name=label, axis=int(attrs.get("axis", 0))))
            q(y, node.input[0], node.input[1], node.output[0], label)
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    # the new float tensors typed by inference (the rewritten ops are standard ones), on the weightless
    # graph as prepare_model infers
    return infer(out)
