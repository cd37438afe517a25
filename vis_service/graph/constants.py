"""Values of tensors that do not depend on any graph input (weights, shapes, ...).

`constant_value` folds the constant ancestor subgraph of one tensor: an
initializer is returned directly, anything else is computed by running the
extracted subgraph (Constant, ConstantOfShape, Identity, Cast, Reshape,
DequantizeLinear, arithmetic, ...) through `onnx.reference.ReferenceEvaluator`,
with onnxruntime as a fallback. Nothing is cached; the model is never modified.

`layer_weights` returns the filters (and bias) of a Conv / ConvTranspose / Gemm /
MatMul layer, or of its integer form, dequantized.
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
# integer layers of quantized models (the ONNX model zoo's int8 form, onnxruntime's quantizer):
# op type -> (input index of the integer weight, of its scale or None, of its zero point, of the
# int32 bias or None, of the input's scale or None, the weight's output-channel axis)
_QUANTIZED_WEIGHT_OPS = {
    "QLinearConv": (3, 4, 5, 8, 1, 0),
    "ConvInteger": (1, None, 3, None, None, 0),
    "QLinearMatMul": (3, 4, 5, None, None, 1),
    "MatMulInteger": (1, None, 3, None, None, 1),
    "QGemm": (3, 4, 5, 6, 1, 1),  # com.microsoft; the axis is 0 with transB
}
_QUANTIZED_DOMAINS = _STANDARD_DOMAINS + ("com.microsoft",)


def is_weight_layer(node: onnx.NodeProto) -> bool:
    """A node whose filters `layer_weights` gives: Conv / ConvTranspose / Gemm / MatMul, or an integer
    form of one (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger, com.microsoft QGemm)."""
    if node.op_type in WEIGHT_OPS:
        return node.domain in _STANDARD_DOMAINS
    if node.op_type == "QGemm":
        return node.domain == "com.microsoft"
    return node.op_type in _QUANTIZED_WEIGHT_OPS and node.domain in _STANDARD_DOMAINS


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
        if is_weight_layer(node):
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
      broadcast from a scalar / length-1 tensor. Both as the layer applies them:
      the weight times `alpha`, the bias times `beta` (y = alpha A B + beta C).
    - MatMul (x @ W with a constant 2-D W of shape (in, out)): W.T, i.e.
      (out_features, in_features); higher-rank W is returned as stored. MatMul has
      no bias (a following Add is not fused): bias is None.

    Raises NotFound (suggesting weight-bearing layers) for an unknown name and
    InvalidArgument(field="layer") for a layer without constant weights.
    """
    node = find_layer_node(model, layer)
    if not is_weight_layer(node):
        raise InvalidArgument(
            "layer",
            f"layer {layer!r} is a {node.op_type} node, which has no filters; "
            f"only {', '.join(WEIGHT_OPS)} layers (and their integer forms) have weights",
        )
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def const(i: int) -> np.ndarray | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        return constant_value(model, node.input[i])

    def missing(what: str) -> InvalidArgument:
        return InvalidArgument("layer", f"the {what} of {node.op_type} layer {layer!r} depend on a graph input; "
                                        "only layers with constant weights can be shown")

    if node.op_type in _QUANTIZED_WEIGHT_OPS:
        return _quantized_layer_weights(node, attrs, const, missing)

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
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        if alpha != 1.0:
            w = (w * alpha).astype(w.dtype)
        bias = const(2)
        if bias is not None:
            n_out = w.shape[0]
            if bias.size == n_out:
                bias = bias.reshape(n_out)
            elif bias.size == 1:
                bias = np.full((n_out,), bias.reshape(()), dtype=bias.dtype)
            if beta != 1.0:
                bias = (bias * beta).astype(bias.dtype)
        return node, np.ascontiguousarray(w), bias

    # MatMul
    w = const(1)
    if w is None:
        raise missing("weights")
    if w.ndim == 2:
        w = np.ascontiguousarray(w.T)
    return node, w, None


def _quantized_layer_weights(node: onnx.NodeProto, attrs: dict, const, missing):
    """(node, weight, bias) of an integer layer, dequantized to the float values it applies:
    (w - zero_point) * scale per output channel, the int32 bias times input scale * weight scale,
    oriented as for its float form. ConvInteger / MatMulInteger carry no scale: their weights are the
    integer offsets from the zero point (the scale is applied by the nodes after them)."""
    w_at, scale_at, zp_at, bias_at, x_scale_at, axis = _QUANTIZED_WEIGHT_OPS[node.op_type]
    transposed = node.op_type == "QGemm" and attrs.get("transB", 0)
    if transposed:
        axis = 0
    q = const(w_at)
    if q is None:
        raise missing("weights")

    def per_channel(v: np.ndarray | None, default: float) -> np.ndarray:
        v = np.asarray(default if v is None else v, np.float32)
        if v.size > 1:  # per output channel, along `axis` of the weight
            shape = [1] * q.ndim
            shape[axis] = v.size
            v = v.reshape(shape)
        return v

    scale = per_channel(const(scale_at) if scale_at is not None else None, 1.0)
    w = ((q.astype(np.float32) - per_channel(const(zp_at), 0.0)) * scale).astype(np.float32)
    bias = const(bias_at) if bias_at is not None else None
    if bias is not None:
        x_scale = const(x_scale_at)
        bias = (bias.astype(np.float32) * np.float32(1.0 if x_scale is None else x_scale)
                * scale.reshape(-1)).astype(np.float32)
    if node.op_type == "QGemm":
        w = w if transposed else w.T
        alpha = float(attrs.get("alpha", 1.0))
        if alpha != 1.0:
            w, bias = w * np.float32(alpha), None if bias is None else bias * np.float32(alpha)
    elif node.op_type in ("QLinearMatMul", "MatMulInteger") and w.ndim == 2:
        w = w.T
    return node, np.ascontiguousarray(w), bias


# ----------------------------------------------------------------------------
# values known before run time, and folding them (prepare_model)

FOLD_MAX_ELEMENTS = 1 << 20      # no folded (or evaluated) tensor holds more elements than this
_FLOAT_EVAL_MAX_ELEMENTS = 4096  # float results are evaluated only this small (parameters, not weights)
# small float constants that these consumers read as parameters (not data): folded like integer ones
_FLOAT_PARAM_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
_INT_DTYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
               onnx.TensorProto.INT16: np.int16, onnx.TensorProto.INT8: np.int8,
               onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.UINT32: np.uint32,
               onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT8: np.uint8}
# ops whose output can be far larger than their inputs: evaluated only where shape inference gave
# them a static output shape within bounds (a ConstantOfShape of 4 PB must not be tried)
_GROWING_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
                          "EyeLike", "Col2Im", "CenterCropPad", "Mul", "Add", "Sub", "Div", "Where", "MatMul"})


class KnownValues:
    """What is known of tensors before run time, by a pass over the graph (`known_values`).

    `full`: name -> value, for tensors that depend on no graph input (initializers, Constant
    nodes and nodes computed from them only, small results only) and for shape computations over
    static dims. `partial`: name -> (elements, rank, dtype) for 0-D / 1-D integer vectors computed
    from tensor shapes where some dims are not numbers: each element an int, a dim symbol (str,
    equal symbols are equal sizes) or None (unknown).
    """

    def __init__(self, initializers: dict[str, onnx.TensorProto] | None = None, max_elements: int = FOLD_MAX_ELEMENTS):
        self.full: dict[str, np.ndarray] = {}
        self.partial: dict[str, tuple[list, int, np.dtype]] = {}
        self.computed: set[str] = set()     # full values computed here (not read from an initializer/Constant)
        self._inits = initializers or {}
        self._max = max_elements

    def available(self, name: str) -> bool:
        """True if `value(name)` is not None (without reading an initializer)."""
        if name in self.full:
            return True
        t = self._inits.get(name)
        return t is not None and int(np.prod(t.dims, dtype=np.int64)) <= self._max

    def value(self, name: str) -> np.ndarray | None:
        """The full value of a tensor (initializers read on first use), or None."""
        if not name:
            return None
        if name not in self.full and self.available(name):
            self.full[name] = numpy_helper.to_array(self._inits[name])
        return self.full.get(name)

    def elements(self, name: str) -> list | None:
        """Elements of a 0-D / 1-D integer value, full or partial; None if neither is known."""
        if name in self.partial:
            return list(self.partial[name][0])
        v = self.value(name)
        if v is not None and v.ndim <= 1 and v.dtype.kind in "iu":
            return [int(e) for e in v.reshape(-1)]
        return None


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _has_subgraph(node) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _numel(shape) -> int | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    n = 1
    for d in shape:
        n *= d
    return n


def slice_range(n: int, start: int, end: int, step: int) -> range:
    """Indices ONNX Slice takes along an axis of size n (negative starts and ends count from the
    end, both clamped as the spec says); step must not be 0."""
    if step == 0:
        raise ValueError("step 0")
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return range(start, end, step)


def _evaluate(node, args: list, opset: int) -> list | None:
    """The node's outputs computed from numpy inputs (None for omitted optional ones), or None."""
    if node.op_type == "ConstantOfShape" and args and args[0] is not None and args[0].ndim == 1:
        fill = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1, np.float32))
        return [np.full(tuple(int(d) for d in args[0]), fill.reshape(-1)[0], dtype=fill.dtype)]
    try:
        from onnx.reference import ReferenceEvaluator

        n = onnx.NodeProto()
        n.CopyFrom(node)
        feeds = {}
        for i, name in enumerate(node.input):
            if name:
                n.input[i] = f"i{i}"
                feeds[f"i{i}"] = args[i]
        for i, name in enumerate(node.output):
            if name:
                n.output[i] = f"o{i}"
        outs = ReferenceEvaluator(n, opsets={"": opset}).run(None, feeds)
    except Exception:
        return None
    if not all(isinstance(o, np.ndarray) or np.isscalar(o) for o in outs):
        return None
    return [np.asarray(o) for o in outs]


def _vector(known: KnownValues, name: str) -> tuple[list, np.dtype] | None:
    """Elements (ints, bools, dim symbols or None) and dtype of a 1-D (or 0-D) value, full or partial."""
    if not name:
        return None
    if name in known.partial:
        elements, rank, dtype = known.partial[name]
        return (list(elements), dtype) if rank <= 1 else None
    v = known.value(name)
    if v is None or v.ndim > 1 or v.dtype.kind not in "iub":
        return None
    return [bool(e) if v.dtype.kind == "b" else int(e) for e in v.reshape(-1)], v.dtype


def _partial_select(op: str, inp: list, known: KnownValues) -> tuple[list, int, np.dtype] | None:
    """Equal / Where over shape vectors holding symbols: torch's expand(B, -1, -1) under the
    TorchScript exporter is Where(Equal(shape, -1), 1, shape) (a class token's Expand in a ViT). A dim
    symbol is a size, never negative, so it equals no negative number."""
    vectors = [_vector(known, i) for i in inp]
    if any(v is None for v in vectors):
        return None
    length = max(len(v[0]) for v in vectors)
    if any(len(v[0]) not in (1, length) for v in vectors):
        return None
    columns = [v[0] * length if len(v[0]) == 1 else v[0] for v in vectors]
    if op == "Equal":
        out = []
        for a, b in zip(*columns):
            if a is None or b is None:
                out.append(None)
            elif isinstance(a, str) or isinstance(b, str):
                if a == b:
                    out.append(True)
                elif (isinstance(a, int) and a < 0) or (isinstance(b, int) and b < 0):
                    out.append(False)
                else:
                    out.append(None)
            else:
                out.append(a == b)
        return out, 1, np.dtype(bool)
    condition, a, b = columns
    if any(not isinstance(c, bool) for c in condition):
        return None
    return [x if c else y for c, x, y in zip(condition, a, b)], 1, vectors[1][1]


# partial vectors are shape computations: a few elements. A static 1-D float tensor of 2^30 elements
# (a Concat-doubling bomb) was listed as 2^30 unknowns, taking the server past its memory
_PARTIAL_MAX_ELEMENTS = 4096


def _partial_result(node, known: KnownValues, shapes, opaque_dim0, attrs) -> tuple[list, int, np.dtype] | None:
    """(elements, rank, dtype) of a shape computation that may hold symbols, or None."""
    op = node.op_type
    inp = list(node.input)
    if op == "Shape":
        shape = shapes.get(inp[0])
        if shape is None:
            return None
        dims = [d if isinstance(d, (int, str)) else None for d in shape]
        if dims and inp[0] in opaque_dim0 and isinstance(dims[0], int):
            dims[0] = None       # may be a batch hard-coded by an exporter: not a number to rely on
        r = len(dims)
        start, end = attrs.get("start", 0), attrs.get("end", r)
        start = min(max(start + r if start < 0 else start, 0), r)
        end = min(max(end + r if end < 0 else end, 0), r)
        return dims[start:end], 1, np.dtype(np.int64)
    if op == "Size":
        return None
    if op in ("Identity", "Cast"):
        src = known.partial.get(inp[0])
        if src is None:
            return None
        dtype = src[2]
        if op == "Cast":
            to = _INT_DTYPES.get(attrs.get("to"))
            if to is None:
                return None
            dtype = np.dtype(to)
        return src[0], src[1], dtype
    if op == "Gather":
        src = known.partial.get(inp[0])
        idx = known.value(inp[1]) if len(inp) > 1 else None
        if src is None or src[1] != 1 or idx is None or idx.dtype.kind not in "iu" or attrs.get("axis", 0) not in (0, -1):
            return None
        n = len(src[0])
        picks = [int(i) + n if int(i) < 0 else int(i) for i in idx.reshape(-1)]
        if any(not 0 <= i < n for i in picks):
            return None
        return [src[0][i] for i in picks], idx.ndim, src[2]
    if op == "Slice":
        src = known.partial.get(inp[0])
        if src is None or src[1] != 1:
            return None
        if len(inp) < 3:       # opset < 10: attributes
            starts, ends = attrs.get("starts"), attrs.get("ends")
            axes, steps = attrs.get("axes", [0]), [1]
        else:
            vals = [known.value(i) if i else None for i in inp[1:5]]
            if vals[0] is None or vals[1] is None or (len(inp) > 3 and inp[3] and vals[2] is None) or \
                    (len(inp) > 4 and inp[4] and vals[3] is None):
                return None
            starts, ends = vals[0].reshape(-1).tolist(), vals[1].reshape(-1).tolist()
            axes = vals[2].reshape(-1).tolist() if len(vals) > 2 and vals[2] is not None else list(range(len(starts)))
            steps = vals[3].reshape(-1).tolist() if len(vals) > 3 and vals[3] is not None else [1] * len(starts)
        if starts is None or ends is None or len(starts) != 1 or list(axes) not in ([0], [-1]):
            return None
        try:
            picks = list(slice_range(len(src[0]), int(starts[0]), int(ends[0]), int(steps[0])))
        except ValueError:
            return None
        return [src[0][i] for i in picks], 1, src[2]
    if op == "Concat":
        parts, dtype = [], None
        for i in inp:
            e = known.elements(i) if i else None
            if e is None:
                # a part computed at run time (the positions of a tf2onnx LayerNormalization's
                # [1, N*H*W, C, 1]): unknown elements, as many as its static length
                shape = shapes.get(i) if i else None
                if shape is None or len(shape) != 1 or not isinstance(shape[0], int) or \
                        len(parts) + shape[0] > _PARTIAL_MAX_ELEMENTS:
                    return None
                parts.extend([None] * shape[0])
                continue
            if (i in known.partial and known.partial[i][1] != 1) or \
                    (known.value(i) is not None and known.value(i).ndim != 1) or \
                    len(parts) + len(e) > _PARTIAL_MAX_ELEMENTS:
                return None
            parts.extend(e)
            if dtype is None:
                dtype = known.partial[i][2] if i in known.partial else known.value(i).dtype
        return (parts, 1, dtype) if dtype is not None else None
    if op == "Reshape":
        # a 1-D vector reshaped to itself ([-1] or its length), as the TorchScript exporter writes
        src = known.partial.get(inp[0])
        target = known.value(inp[1]) if len(inp) > 1 and inp[1] else None
        if src is None or src[1] != 1 or target is None or target.size != 1 or \
                int(target.reshape(-1)[0]) not in (-1, len(src[0])):
            return None
        return src[0], 1, src[2]
    if op in ("Equal", "Where"):
        return _partial_select(op, inp, known)
    if op in ("Unsqueeze", "Squeeze"):
        src = known.partial.get(inp[0])
        if src is None:
            return None
        if op == "Unsqueeze" and src[1] == 0:
            return src[0], 1, src[2]
        if op == "Squeeze" and src[1] == 1 and len(src[0]) == 1:
            return src[0], 0, src[2]
    return None


def known_values(model: onnx.ModelProto, shapes: dict, opaque_dim0: set[str] = frozenset(), *,
                 max_elements: int = FOLD_MAX_ELEMENTS) -> KnownValues:
    """Evaluate what can be known before run time (see `KnownValues`), in graph order.

    `shapes` are the inferred shapes (`loading.tensor_shapes`); the dim 0 of a tensor in
    `opaque_dim0` is never read as a number (a batch an exporter hard-coded, to be freed).
    """
    g = model.graph
    opset = 1
    for o in model.opset_import:
        if o.domain in _STANDARD_DOMAINS:
            opset = int(o.version)
    graph_inputs = {i.name for i in g.input}
    known = KnownValues({t.name: t for t in g.initializer if t.name not in graph_inputs}, max_elements)
    full, available = known.value, known.available
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    float_names = {vi.name for vi in list(g.value_info) + list(g.output)
                   if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in floats}

    for node in g.node:
        if node.domain not in _STANDARD_DOMAINS or node.op_type in NONDETERMINISTIC_OPS or _has_subgraph(node):
            continue
        op = node.op_type
        attrs = _attrs(node)
        if op == "Constant":
            if len(node.output) == 1:
                value = _constant_attr_value(node)
                if value is not None and value.size <= max_elements:
                    known.full[node.output[0]] = value
            continue
        part = _partial_result(node, known, shapes, opaque_dim0, attrs)
        if part is not None and len(node.output) == 1:
            elements, rank, dtype = part
            if all(isinstance(e, int) for e in elements) and (rank == 1 or len(elements) == 1):
                value = np.array(elements, dtype=dtype).reshape((len(elements),) if rank == 1 else ())
                known.full[node.output[0]] = value
                known.computed.add(node.output[0])
            else:
                known.partial[node.output[0]] = (elements, rank, dtype)
            continue
        if op in ("Shape", "Size"):
            continue
        if not all(available(i) for i in node.input if i):
            continue
        args = [full(i) for i in node.input]
        out_shapes = [shapes.get(o) for o in node.output]
        sizes = [_numel(s) for s in out_shapes]
        if any(n is not None and (n > max_elements or (o in float_names and n > _FLOAT_EVAL_MAX_ELEMENTS))
               for o, n in zip(node.output, sizes)):
            continue    # too large, or a float tensor too large to be a parameter (weights)
        if op in _GROWING_OPS and any(n is None for n in sizes):
            continue
        values = _evaluate(node, args, opset)
        if values is None or len(values) < len([o for o in node.output if o]):
            continue
        for name, v in zip(node.output, values):
            if not name or v.size > max_elements or (v.dtype.kind in "fc" and v.size > _FLOAT_EVAL_MAX_ELEMENTS):
                continue    # large float results are weights, not parameters: never folded
            known.full[name] = v
            known.computed.add(name)
    return known


def fold_constants(model: onnx.ModelProto, known: KnownValues) -> bool:
    """Nodes whose outputs `known` computed become Constant nodes in place (same name, same output).

    Integer and boolean results (shapes, pads, slice bounds, conditions) are folded; float ones
    only where every reader takes them as a parameter (Resize scales / roi) or is folded too:
    weights stay as the graph computes them (Inspect lists their nodes). Nodes keep their place
    in the graph, so the display names of the others do not move. Graph outputs are not folded.
    Returns True if anything changed.
    """
    g = model.graph
    graph_outputs = {o.name for o in g.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for k, i in enumerate(node.input):
            consumers.setdefault(i, []).append((node, k))
        for i in _subgraph_outer_names(node):
            consumers.setdefault(i, []).append((node, -1))
    folded: set[int] = set()
    for node in reversed(g.node):
        if node.op_type == "Constant" or node.domain not in _STANDARD_DOMAINS or len(node.output) != 1:
            continue
        out = node.output[0]
        if out not in known.computed or out in graph_outputs:
            continue
        value = known.full[out]
        if value.dtype.kind in "fc":
            readers = consumers.get(out, [])
            if not readers or not all(id(c) in folded or k in _FLOAT_PARAM_INPUTS.get(c.op_type, ())
                                      for c, k in readers):
                continue
        elif value.dtype.kind not in "iub":
            continue
        folded.add(id(node))
    for node in g.node:
        if id(node) not in folded:
            continue
        value = known.full[node.output[0]]
        del node.input[:]
        del node.attribute[:]
        node.op_type = "Constant"
        node.domain = ""
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.array(value))))
    return bool(folded)
