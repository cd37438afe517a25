"""Values of tensors that do not depend on any graph input (weights, shapes, ...).

`constant_value` folds the constant ancestor subgraph of one tensor: an
initializer is returned directly, anything else is computed by running the
extracted subgraph (Constant, ConstantOfShape, Identity, Cast, Reshape,
DequantizeLinear, arithmetic, ...) through `onnx.reference.ReferenceEvaluator`,
with onnxruntime as a fallback. Nothing is cached; the model is never modified.

`layer_weights` returns the filters (and bias) of a Conv / ConvTranspose / Gemm /
MatMul layer.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import InvalidArgument, NotFound
from .names import tensor_names

# ops whose output is not a function of their inputs alone
NONDETERMINISTIC_OPS = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
    "Multinomial", "Bernoulli",
})
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_STANDARD_DOMAINS = ("", "ai.onnx")


def _subgraph_outer_names(node: onnx.NodeProto) -> list[str]:
    """Names a control-flow node reads from the enclosing scope (implicit inputs)."""
    names: list[str] = []
    for a in node.attribute:
        graphs = []
        if a.type == onnx.AttributeProto.GRAPH:
            graphs = [a.g]
        elif a.type == onnx.AttributeProto.GRAPHS:
            graphs = list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(o for o in n.output if o)
            for n in g.node:
                for i in list(n.input) + _subgraph_outer_names(n):
                    if i and i not in local:
                        names.append(i)
    return names


def constant_subgraph(model: onnx.ModelProto, tensor_name: str) -> tuple[list[onnx.NodeProto], set[str]] | None:
    """(nodes in graph order, initializer names) computing `tensor_name`, or None.

    None when the tensor depends on a graph input, on a nondeterministic op, or
    on a name that nothing in the graph defines.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    graph_inputs = {i.name for i in g.input} - inits
    producer: dict[str, int] = {}
    for idx, node in enumerate(g.node):
        for o in node.output:
            if o:
                producer[o] = idx
    needed_nodes: set[int] = set()
    needed_inits: set[str] = set()
    stack = [tensor_name]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in inits:
            needed_inits.add(t)
            continue
        if t in graph_inputs:
            return None
        idx = producer.get(t)
        if idx is None:
            return None
        node = g.node[idx]
        if node.op_type in NONDETERMINISTIC_OPS:
            return None
        if idx not in needed_nodes:
            needed_nodes.add(idx)
            stack.extend(node.input)
            stack.extend(_subgraph_outer_names(node))
    return [g.node[i] for i in sorted(needed_nodes)], needed_inits


def constant_value(model: onnx.ModelProto, tensor_name: str) -> np.ndarray | None:
    """Value of `tensor_name` if it does not depend on any graph input, else None.

    Initializers are returned directly (fast path), a `Constant` node's value is
    read from its attribute; anything else is evaluated from its extracted
    ancestor subgraph. Returns None too when the subgraph cannot be evaluated
    (an op no evaluator knows, a nondeterministic op).
    """
    g = model.graph
    for t in g.initializer:
        if t.name == tensor_name:
            return numpy_helper.to_array(t)
    found = constant_subgraph(model, tensor_name)
    if found is None:
        return None
    nodes, init_names = found
    if len(nodes) == 1 and nodes[0].op_type == "Constant" and nodes[0].domain in _STANDARD_DOMAINS:
        value = _constant_attr_value(nodes[0])
        if value is not None:
            return value
    sub = _subgraph_model(model, nodes, init_names, tensor_name)
    try:
        from onnx.reference import ReferenceEvaluator

        (out,) = ReferenceEvaluator(sub).run(None, {})
        return np.asarray(out)
    except Exception:
        pass
    try:  # ops the reference evaluator lacks (contrib domains, ...)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(sub.SerializeToString(), so, providers=["CPUExecutionProvider"])
        (out,) = sess.run(None, {})
        return np.asarray(out)
    except Exception:
        return None


def _constant_attr_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _subgraph_model(model: onnx.ModelProto, nodes, init_names: set[str], output: str) -> onnx.ModelProto:
    g = model.graph
    inits = [t for t in g.initializer if t.name in init_names]
    graph = helper.make_graph(list(nodes), "constant_subgraph", [], [onnx.ValueInfoProto(name=output)], initializer=inits)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="vis_service.constants")
    sub.ir_version = max(model.ir_version, 4)
    for f in model.functions:
        sub.functions.append(f)
    return sub


# ----------------------------------------------------------------------------
# layer weights


def _weight_layer_names(model: onnx.ModelProto) -> list[str]:
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and node.domain in _STANDARD_DOMAINS:
            if node.name:
                out.append(node.name)
            out.extend(o for o in node.output[:1] if o)
    return out


def find_layer_node(model: onnx.ModelProto, layer: str) -> onnx.NodeProto:
    """The node named `layer`, or producing tensor `layer` (names.resolve_tensor semantics)."""
    produced = set(tensor_names(model))
    if layer in produced:
        for node in model.graph.node:
            if layer in node.output:
                return node
        raise InvalidArgument("layer", f"{layer!r} is a graph input, not the output of a layer; "
                              f"layers with filters are {', '.join(WEIGHT_OPS)} nodes")
    if layer in {t.name for t in model.graph.initializer}:
        raise InvalidArgument("layer", f"{layer!r} is an initializer (a constant), not a layer")
    for node in model.graph.node:
        if node.name and node.name == layer and node.output:
            return node
    raise NotFound("layer", layer, _weight_layer_names(model))


def layer_weights(model: onnx.ModelProto, layer: str) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray | None]:
    """(node, weight, bias or None) of a Conv / ConvTranspose / Gemm / MatMul layer.

    `layer` is a node name or one of its output tensor names.

    Orientation of the returned weight:
    - Conv: as stored, (out_channels, in_channels / group, kH, kW).
    - ConvTranspose: as stored, (in_channels, out_channels / group, kH, kW).
    - Gemm: always (out_features, in_features), whatever `transB` says (the
      stored B is transposed when transB == 0). If B is not constant but A is
      (W @ x form), A is returned in (out, in) orientation. The bias C is
      returned flattened to (out_features,) when it has that many elements or is
      broadcast from a scalar / length-1 tensor.
    - MatMul (x @ W with a constant 2-D W of shape (in, out)): W.T, i.e.
      (out_features, in_features); higher-rank W is returned as stored. MatMul has
      no bias (a following Add is not fused): bias is None.

    Raises NotFound (suggesting weight-bearing layers) for an unknown name and
    InvalidArgument(field="layer") for a layer without constant weights.
    """
    node = find_layer_node(model, layer)
    if node.op_type not in WEIGHT_OPS or node.domain not in _STANDARD_DOMAINS:
        raise InvalidArgument(
            "layer",
            f"layer {layer!r} is a {node.op_type} node, which has no filters; "
            f"only {', '.join(WEIGHT_OPS)} layers have weights",
        )
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def const(i: int) -> np.ndarray | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        return constant_value(model, node.input[i])

    def missing(what: str) -> InvalidArgument:
        return InvalidArgument("layer", f"the {what} of {node.op_type} layer {layer!r} depend on a graph input; "
                                        "only layers with constant weights can be shown")

    if node.op_type in ("Conv", "ConvTranspose"):
        w = const(1)
        if w is None:
            raise missing("weights")
        return node, w, const(2)

    if node.op_type == "Gemm":
        b = const(1)
        if b is not None:
            w = b if attrs.get("transB", 0) else b.T
        else:
            a = const(0)
            if a is None:
                raise missing("weights")
            w = a.T if attrs.get("transA", 0) else a
        bias = const(2)
        if bias is not None:
            n_out = w.shape[0]
            if bias.size == n_out:
                bias = bias.reshape(n_out)
            elif bias.size == 1:
                bias = np.full((n_out,), bias.reshape(()), dtype=bias.dtype)
        return node, np.ascontiguousarray(w), bias

    # MatMul
    w = const(1)
    if w is None:
        raise missing("weights")
    if w.ndim == 2:
        w = np.ascontiguousarray(w.T)
    return node, w, None
