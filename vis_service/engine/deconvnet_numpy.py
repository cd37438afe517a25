"""Zeiler & Fergus deconvnet projection in plain numpy: a cross-check of the graph rule set.

`deconvnet_projection` runs the model once on onnxruntime, recording every activation on
the path from the input to the chosen layer plus the max-pool switches (the `Indices`
output added to each MaxPool on the path), then walks the graph backwards in numpy:

- MaxPool: unpool through the switches, accumulating where pools overlap (np.add.at);
- Relu / Clip / LeakyRelu: rectification relu(upstream), whatever the forward mask was;
- Conv: transposed (flipped) filters, the bias ignored; strides, asymmetric pads,
  auto_pad, dilations and groups (depthwise) supported;
- Gemm / MatMul: the transposed weight; Flatten / Reshape / Squeeze / Unsqueeze /
  Transpose: their inverse layout change;
- Add / Sum / Sub: the signal goes to every summand (negated for the subtrahend); Mul /
  Div by a constant: scaled; Concat / Split: sliced / joined; Slice: scattered back;
  Pad (constant): cropped;
- BatchNormalization (inference): its affine scale, scale / sqrt(var + eps) per channel;
- LRN: passed through (Zeiler & Fergus); `lrn="gradient"` uses its exact gradient instead;
- Dropout / Identity / Cast: passed; AveragePool / GlobalAveragePool: spread evenly (adjoint).

Everything is an independent re-implementation of what the `deconvnet` rule set emits as an
ONNX graph (no code is shared with `engine/rules`), so the two agreeing is evidence that
both are right. Any other op on the path raises `Unimplemented` naming op type and node.
"""
from __future__ import annotations

import itertools
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, version_converter

from ..errors import InvalidArgument, Unimplemented
from ..graph.paths import float_path
from ..graph.constants import constant_value
from ..graph.expose import expose_tensors
from ..graph.loading import opset_version, prepare_model, tensor_infos
from ..graph.names import resolve_tensor

__all__ = ["deconvnet_projection", "top_activation_cotangent", "feature_map_cotangent"]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}
_STANDARD_DOMAINS = ("", "ai.onnx")
_SWITCH_SUFFIX = "__deconvnet_switches"
_LRN_MODES = ("identity", "gradient")

SessionFactory = Callable[[onnx.ModelProto], object]


# ---------------------------------------------------------------------------------------------
# cotangent helpers


def top_activation_cotangent(activation: np.ndarray, channel: int | None = None) -> np.ndarray:
    """One-hot cotangent at the strongest activation of each sample.

    `activation` is [N, C, ...] (or [N, F]); with `channel` the maximum is taken inside
    that channel, otherwise over the whole sample (i.e. in the channel holding the
    strongest activation). The result has `activation`'s shape and dtype, 1 at one
    position per sample and 0 elsewhere.
    """
    a = np.asarray(activation)
    if a.ndim < 2:
        raise InvalidArgument("activation", f"expected a batch of [N, C, ...] activations, got shape {a.shape}")
    n, c = a.shape[0], a.shape[1]
    if channel is not None and not -c <= channel < c:
        raise InvalidArgument("channel", f"channel {channel} out of range for {c} channels")
    flat = a.reshape(n, c, -1)
    out = np.zeros_like(flat)
    for i in range(n):
        if channel is None:
            ch, pos = np.unravel_index(int(np.argmax(flat[i])), flat[i].shape)
        else:
            ch, pos = channel % c, int(np.argmax(flat[i, channel]))
        out[i, ch, pos] = 1
    return out.reshape(a.shape)


def feature_map_cotangent(activation: np.ndarray, channel: int) -> np.ndarray:
    """The activations of one channel, all other channels zeroed (project a whole feature map)."""
    a = np.asarray(activation)
    if a.ndim < 2 or not -a.shape[1] <= channel < a.shape[1]:
        raise InvalidArgument("channel", f"channel {channel} out of range for activation shape {a.shape}")
    out = np.zeros_like(a)
    out[:, channel] = a[:, channel]
    return out


# ---------------------------------------------------------------------------------------------
# the projection


def default_session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def deconvnet_projection(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], layer: str,
                         cotangent: np.ndarray, session_factory: SessionFactory | None = None, *,
                         wrt: str | None = None, lrn: str = "identity") -> np.ndarray:
    """Project `cotangent` (shaped like tensor `layer`) down to the input with the deconvnet.

    `model` is a prepared model (`graph.loading.prepare_model`); `feeds` holds every graph
    input; `layer` is a tensor or node name. The result has the shape of input `wrt`
    (default: the model's only floating-point input). `session_factory(model)` returns an
    object with onnxruntime's `run(output_names, feeds)`; by default a CPU session.
    `lrn` says how LRN is passed: "identity" (Zeiler & Fergus) or "gradient" (exact).
    """
    if lrn not in _LRN_MODES:
        raise InvalidArgument("lrn", f"unknown LRN mode {lrn!r}; known: {', '.join(_LRN_MODES)}")
    layer = resolve_tensor(model, layer)
    infos = tensor_infos(model)
    wrt = _pick_wrt(model, infos, wrt)
    if wrt not in feeds:
        raise InvalidArgument("feeds", f"input {wrt!r} is missing from the feeds")

    path_nodes, relevant = _path(model, infos, layer, wrt)
    if any(n.op_type == "MaxPool" and n.domain in _STANDARD_DOMAINS for n in path_nodes) and opset_version(model) < 8:
        # MaxPool has an Indices output from opset 8 on
        model = _raise_opset(model, 8)
        infos = tensor_infos(model)
        path_nodes, relevant = _path(model, infos, layer, wrt)

    walker = _Walker(model, path_nodes, relevant, lrn)
    recorded = walker.record(model, feeds, session_factory or default_session)
    cot = np.asarray(cotangent)
    if cot.shape != recorded[layer].shape:
        raise InvalidArgument("cotangent", f"cotangent shape {cot.shape} differs from the shape "
                                           f"{recorded[layer].shape} of layer {layer!r}")
    return walker.project(recorded, layer, cot, wrt).astype(np.asarray(feeds[wrt]).dtype, copy=False)


def _pick_wrt(model: onnx.ModelProto, infos, wrt: str | None) -> str:
    floats = [i.name for i in model.graph.input
              if i.name in infos and infos[i.name].elem_type in _FLOAT_TYPES]
    if wrt is not None:
        if wrt not in floats:
            raise InvalidArgument("wrt", f"{wrt!r} is not a floating-point graph input; inputs: {', '.join(floats)}")
        return wrt
    if len(floats) != 1:
        raise InvalidArgument("wrt", f"the model has {len(floats)} floating-point inputs "
                                     f"({', '.join(floats)}); say which one to project onto")
    return floats[0]


def _path(model: onnx.ModelProto, infos, layer: str, wrt: str):
    """(nodes on a wrt -> layer path in graph order, float tensors on that path)."""

    def is_float(name: str) -> bool:
        return name in infos and infos[name].elem_type in _FLOAT_TYPES

    nodes, relevant, active = float_path(model.graph, [wrt], [layer], is_float)
    if layer not in active:
        raise InvalidArgument("layer", f"tensor {layer!r} does not depend on input {wrt!r}")
    return nodes, relevant


def _raise_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    try:
        return prepare_model(version_converter.convert_version(model, version))
    except Exception as exc:
        raise Unimplemented(f"recording max-pool switches needs opset {version}, but converting the "
                            f"model from opset {opset_version(model)} failed: {exc}") from None


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node (output {node.output[0]!r})"


def _unsupported(node: onnx.NodeProto, why: str = "") -> Unimplemented:
    op = node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}.{node.op_type}"
    label = f"op {op} ({_node_label(node)})"
    return Unimplemented(f"deconvnet projection: {why or 'no numpy rule for'} {label}".rstrip())


# op type -> indices of inputs (not on the path) whose values the walk needs
_VALUE_INPUTS = {
    "Conv": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "Mul": (0, 1), "Div": (0, 1),
    "BatchNormalization": (1, 4), "Concat": None,
}


class _Walker:
    def __init__(self, model: onnx.ModelProto, nodes, relevant: set[str], lrn: str):
        self.model = model
        self.nodes = nodes
        self.relevant = relevant
        self.lrn = lrn
        self.switches: dict[int, str] = {}     # id(MaxPool node) -> its Indices tensor
        self.constants: dict[str, np.ndarray] = {}
        self.runtime_values: list[str] = []     # non-path operands that are not constant
        for node in nodes:
            if node.domain not in _STANDARD_DOMAINS or node.op_type not in _HANDLERS:
                raise _unsupported(node)
            wanted = _VALUE_INPUTS.get(node.op_type, ())
            for i in range(len(node.input)) if wanted is None else wanted:
                name = node.input[i] if i < len(node.input) else ""
                if name and name not in relevant and name not in self.constants:
                    value = constant_value(model, name)
                    if value is None:
                        if name not in self.runtime_values:
                            self.runtime_values.append(name)
                    else:
                        self.constants[name] = value

    def record(self, model: onnx.ModelProto, feeds, session_factory: SessionFactory) -> dict[str, np.ndarray]:
        """One forward pass: the path's activations, switches and run-time operands."""
        m = onnx.ModelProto()
        m.CopyFrom(model)
        infos = tensor_infos(m)
        taken = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
        pools = {n.output[0]: n for n in self.nodes if n.op_type == "MaxPool"}
        extra = []
        for node in m.graph.node:
            if node.op_type != "MaxPool" or node.domain not in _STANDARD_DOMAINS or node.output[0] not in pools:
                continue
            if len(node.output) < 2 or not node.output[1]:
                # ask the primal pool for its switches (flattened N·C·H·W argmax positions)
                name = node.output[0] + _SWITCH_SUFFIX
                while name in taken:
                    name += "_"
                taken.add(name)
                if len(node.output) < 2:
                    node.output.append(name)
                else:
                    node.output[1] = name
                info = infos.get(node.output[0])
                shape = None if info is None or info.shape is None else list(info.shape)
                m.graph.value_info.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, shape))
            extra.append(node.output[1])
            self.switches[id(pools[node.output[0]])] = node.output[1]
        graph_inputs = {i.name for i in m.graph.input}
        wanted = [t for t in _ordered(self.relevant, self.nodes) if t not in graph_inputs]
        wanted += [t for t in self.runtime_values if t not in graph_inputs]
        wanted += extra
        values = {}
        if wanted:
            sess = session_factory(expose_tensors(m, wanted))
            values = dict(zip(wanted, sess.run(wanted, dict(feeds))))
        for name in graph_inputs:
            if name in feeds:
                values[name] = np.asarray(feeds[name])
        return values

    def project(self, values: dict[str, np.ndarray], layer: str, cotangent: np.ndarray, wrt: str) -> np.ndarray:
        grads: dict[str, np.ndarray] = {layer: cotangent.astype(np.float64)}
        for node in reversed(self.nodes):
            outs = [grads.pop(o, None) if o in self.relevant else None for o in node.output]
            if all(g is None for g in outs):
                continue
            in_grads = _HANDLERS[node.op_type](self, node, outs, values)
            for name, g in zip(node.input, in_grads):
                if g is None or name not in self.relevant:
                    continue
                shape = values[name].shape
                if g.shape != shape:
                    raise AssertionError(f"{_node_label(node)}: projection for {name!r} has shape "
                                         f"{g.shape}, the tensor {shape}")
                grads[name] = grads[name] + g if name in grads else g
        return grads[wrt]

    def value(self, name: str, values) -> np.ndarray:
        if name in values:
            return values[name]
        return self.constants[name]


def _ordered(names: set[str], nodes) -> list[str]:
    seen, out = set(), []
    for node in nodes:
        for t in list(node.input) + list(node.output):
            if t in names and t not in seen:
                seen.add(t)
                out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# geometry helpers


def _window(node: onnx.NodeProto, in_sizes, out_sizes, kernel):
    """(strides, dilations, pads_begin) with auto_pad resolved from the actual sizes."""
    a = _attrs(node)
    n = len(in_sizes)
    strides = list(a.get("strides") or [1] * n)
    dilations = list(a.get("dilations") or [1] * n)
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i, o, k, s, d in zip(in_sizes, out_sizes, kernel, strides, dilations):
            total = max(0, (o - 1) * s + (k - 1) * d + 1 - i)
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
    elif auto_pad == "VALID":
        begin, end = [0] * n, [0] * n
    else:
        pads = list(a.get("pads") or [0] * (2 * n))
        begin, end = pads[:n], pads[n:]
    return strides, dilations, begin, end


def conv_input_adjoint(g: np.ndarray, weight: np.ndarray, in_sizes, strides, dilations, pads_begin,
                       group: int = 1) -> np.ndarray:
    """Transposed convolution: Jᵀg for x of y = Conv(x, weight) (no bias).

    g: [N, M, *out]; weight: [M, C/group, *kernel]. For each kernel offset, Wᵀ·g
    (that offset's weight slice) is added into a strided view of a zero buffer
    covering the padded input; the pads are cropped off at the end.
    """
    n, m = g.shape[:2]
    out_sizes = g.shape[2:]
    cg = weight.shape[1]
    mg = m // group
    kernel = weight.shape[2:]
    buf_sizes = [max(b + i, (o - 1) * s + (k - 1) * d + 1)
                 for i, o, k, s, d, b in zip(in_sizes, out_sizes, kernel, strides, dilations, pads_begin)]
    buf = np.zeros((n, group, cg, *buf_sizes), dtype=np.float64)
    gg = np.ascontiguousarray(g.reshape(n, group, mg, -1), dtype=np.float64)
    p = gg.shape[-1]
    # [G, *kernel, C/G, M/G]: one matmul yields Wᵀ·g for a chunk of kernel offsets at once
    # (reading g once per chunk, not once per offset), bounded to ~32 MB of float64
    rank = len(kernel)
    wt = weight.astype(np.float64).reshape(group, mg, cg, *kernel)
    wt = np.ascontiguousarray(wt.transpose(0, *range(3, 3 + rank), 2, 1))
    offsets = list(itertools.product(*(range(k) for k in kernel)))
    wt = wt.reshape(group, len(offsets), cg, mg)
    chunk = max(1, min(len(offsets), (4 << 20) // max(1, n * group * cg * p)))
    for first in range(0, len(offsets), chunk):
        part = wt[:, first:first + chunk]
        k = part.shape[1]
        contrib = np.matmul(part.reshape(group, k * cg, mg), gg).reshape(n, group, k, cg, *out_sizes)
        for j, offs in enumerate(offsets[first:first + k]):
            view = tuple(slice(off * d, off * d + (o - 1) * s + 1, s)
                         for off, o, s, d in zip(offs, out_sizes, strides, dilations))
            buf[(Ellipsis,) + view] += contrib[:, :, j]
    crop = tuple(slice(b, b + i) for b, i in zip(pads_begin, in_sizes))
    return buf[(Ellipsis,) + crop].reshape(n, group * cg, *in_sizes)


def _sum_to(g: np.ndarray, shape) -> np.ndarray:
    """Undo numpy broadcasting: sum g down to `shape`."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


# ---------------------------------------------------------------------------------------------
# per-op rules: (walker, node, grads of the outputs, recorded values) -> grads of the inputs


def _first(node, g):
    return [g] + [None] * (len(node.input) - 1)


def _pass(w, node, outs, values):
    return _first(node, outs[0])


def _rectify(w, node, outs, values):
    return _first(node, np.maximum(outs[0], 0.0))


def _reshape(w, node, outs, values):
    return _first(node, outs[0].reshape(values[node.input[0]].shape))


def _transpose(w, node, outs, values):
    rank = outs[0].ndim
    perm = _attrs(node).get("perm") or list(reversed(range(rank)))
    return [np.transpose(outs[0], np.argsort(perm))]


def _conv(w, node, outs, values):
    x = values[node.input[0]]
    if node.input[1] in w.relevant:
        raise _unsupported(node, "weights on the input path are not supported by")
    weight = w.value(node.input[1], values)
    g = outs[0]
    strides, dilations, begin, _ = _window(node, x.shape[2:], g.shape[2:], weight.shape[2:])
    dx = conv_input_adjoint(g, weight, x.shape[2:], strides, dilations, begin, _attrs(node).get("group", 1))
    return _first(node, dx)


def _max_pool(w, node, outs, values):
    x = values[node.input[0]]
    idx = values[w.switches[id(node)]].astype(np.int64).ravel()
    if _attrs(node).get("storage_order", 0):
        if x.ndim != 4:
            raise _unsupported(node, "storage_order=1 is only handled for 2-D pooling in")
        h, wd = x.shape[2:]
        base, rem = np.divmod(idx, h * wd)
        col, row = np.divmod(rem, h)
        idx = base * (h * wd) + row * wd + col
    dx = np.zeros(x.size, dtype=np.float64)
    np.add.at(dx, idx, outs[0].ravel())      # overlapping windows accumulate
    return _first(node, dx.reshape(x.shape))


def _average_pool(w, node, outs, values):
    x, g = values[node.input[0]], outs[0]
    a = _attrs(node)
    kernel = list(a["kernel_shape"])
    in_sizes, out_sizes = x.shape[2:], g.shape[2:]
    strides, dilations, begin, end = _window(node, in_sizes, out_sizes, kernel)
    if any(d != 1 for d in dilations):
        raise _unsupported(node, "dilated AveragePool is not supported by")
    include_pad = a.get("count_include_pad", 0)
    counts = None
    for i, o, k, s, b, e in zip(in_sizes, out_sizes, kernel, strides, begin, end):
        start = np.arange(o) * s - b
        stop = np.minimum(start + k, i + e)
        c = stop - start if include_pad else np.minimum(stop, i) - np.maximum(start, 0)
        counts = c if counts is None else np.multiply.outer(counts, c)
    channels = x.shape[1]
    ones = np.ones((channels, 1, *kernel))
    dx = conv_input_adjoint(g / counts, ones, in_sizes, strides, dilations, begin, group=channels)
    return _first(node, dx)


def _global_average_pool(w, node, outs, values):
    x = values[node.input[0]]
    count = int(np.prod(x.shape[2:]))
    return _first(node, np.broadcast_to(outs[0] / count, x.shape).copy())


def _global_max_pool(w, node, outs, values):
    x, y = values[node.input[0]], values[node.output[0]]
    hit = (x == y).astype(np.float64)
    # tied maxima share the gradient, as the graph rule does
    return _first(node, hit * outs[0] / hit.sum(axis=tuple(range(2, x.ndim)), keepdims=True))


def _batch_norm(w, node, outs, values):
    a = _attrs(node)
    if a.get("training_mode", 0):
        raise _unsupported(node, "training-mode BatchNormalization is not supported by")
    scale = w.value(node.input[1], values).astype(np.float64)
    var = w.value(node.input[4], values).astype(np.float64)
    factor = scale / np.sqrt(var + a.get("epsilon", 1e-5))
    g = outs[0]
    factor = factor.reshape((-1,) + (1,) * (g.ndim - 2)) if factor.ndim == 1 else factor
    return _first(node, g * factor)


def _lrn(w, node, outs, values):
    g = outs[0]
    if w.lrn == "identity":
        return [g]
    a = _attrs(node)
    size, alpha, beta, bias = a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    x = values[node.input[0]].astype(np.float64)
    c = x.shape[1]
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2

    def window_sum(t, lo, hi):
        """out[i] = sum of t[j] over channels j in [i - lo, i + hi]."""
        padded = np.pad(t, [(0, 0), (lo, hi)] + [(0, 0)] * (t.ndim - 2))
        return sum(padded[:, j:j + c] for j in range(lo + hi + 1))

    d = bias + alpha / size * window_sum(x * x, before, after)
    direct = g * d ** -beta
    # output channel i reads inputs [i - before, i + after]: input j feeds outputs [j - after, j + before]
    spread = window_sum(direct * x / d, after, before)
    return [direct - 2.0 * alpha * beta / size * x * spread]


def _add(w, node, outs, values):
    g = outs[0]
    return [_sum_to(g, values[i].shape) if i in w.relevant else None for i in node.input]


def _sub(w, node, outs, values):
    g = outs[0]
    a, b = node.input
    return [_sum_to(g, values[a].shape) if a in w.relevant else None,
            _sum_to(-g, values[b].shape) if b in w.relevant else None]


def _mul(w, node, outs, values):
    g = outs[0]
    a, b = node.input
    va, vb = w.value(a, values), w.value(b, values)
    return [_sum_to(g * vb, va.shape) if a in w.relevant else None,
            _sum_to(g * va, vb.shape) if b in w.relevant else None]


def _div(w, node, outs, values):
    g = outs[0]
    a, b = node.input
    va, vb = w.value(a, values).astype(np.float64), w.value(b, values).astype(np.float64)
    return [_sum_to(g / vb, va.shape) if a in w.relevant else None,
            _sum_to(-g * va / (vb * vb), vb.shape) if b in w.relevant else None]


def _gemm(w, node, outs, values):
    a = _attrs(node)
    alpha, ta, tb = a.get("alpha", 1.0), a.get("transA", 0), a.get("transB", 0)
    g = outs[0]
    A = w.value(node.input[0], values).astype(np.float64)
    B = w.value(node.input[1], values).astype(np.float64)
    opa, opb = (A.T if ta else A), (B.T if tb else B)
    grads = [None] * len(node.input)
    if node.input[0] in w.relevant:
        d = alpha * g @ opb.T
        grads[0] = d.T if ta else d
    if node.input[1] in w.relevant:
        d = alpha * opa.T @ g
        grads[1] = d.T if tb else d
    if len(node.input) > 2 and node.input[2] in w.relevant:
        grads[2] = _sum_to(a.get("beta", 1.0) * g, values[node.input[2]].shape)
    return grads


def _matmul(w, node, outs, values):
    g = outs[0]
    A = w.value(node.input[0], values).astype(np.float64)
    B = w.value(node.input[1], values).astype(np.float64)
    if A.ndim < 2 or B.ndim < 2:
        raise _unsupported(node, "1-D operands are not supported by")
    grads = [None, None]
    if node.input[0] in w.relevant:
        grads[0] = _sum_to(g @ np.swapaxes(B, -1, -2), A.shape)
    if node.input[1] in w.relevant:
        grads[1] = _sum_to(np.swapaxes(A, -1, -2) @ g, B.shape)
    return grads


def _axis(node, rank, default=None):
    axis = _attrs(node).get("axis", default)
    return axis + rank if axis < 0 else axis


def _concat(w, node, outs, values):
    g = outs[0]
    axis = _axis(node, g.ndim)
    sizes = [values[i].shape[axis] if i in values else w.value(i, values).shape[axis] for i in node.input]
    parts = np.split(g, np.cumsum(sizes)[:-1], axis=axis)
    return [p if i in w.relevant else None for i, p in zip(node.input, parts)]


def _split(w, node, outs, values):
    parts = [g if g is not None else np.zeros(values[o].shape) for g, o in zip(outs, node.output)]
    x = values[node.input[0]]
    return _first(node, np.concatenate(parts, axis=_axis(node, x.ndim, 0)))


def _ints(w, node, index, values):
    if len(node.input) <= index or not node.input[index]:
        return None
    v = constant_value(w.model, node.input[index])
    if v is None:
        raise _unsupported(node, f"input {index} computed at run time is not supported by")
    return [int(t) for t in np.asarray(v).reshape(-1)]


def _slice(w, node, outs, values):
    x, g = values[node.input[0]], outs[0]
    a = _attrs(node)
    if "starts" in a:   # opset < 10
        starts, ends, axes, steps = list(a["starts"]), list(a["ends"]), a.get("axes"), None
    else:
        starts, ends = _ints(w, node, 1, values), _ints(w, node, 2, values)
        axes, steps = _ints(w, node, 3, values), _ints(w, node, 4, values)
    axes = [ax + x.ndim if ax < 0 else ax for ax in (axes if axes is not None else range(len(starts)))]
    steps = steps or [1] * len(axes)
    index = [slice(None)] * x.ndim
    for ax, st, en, sp in zip(axes, starts, ends, steps):
        index[ax] = slice(st, en, sp)     # Python clamps like ONNX does
    dx = np.zeros(x.shape, dtype=np.float64)
    dx[tuple(index)] = g
    return _first(node, dx)


def _pad(w, node, outs, values):
    x, g = values[node.input[0]], outs[0]
    a = _attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise _unsupported(node, f"Pad mode {mode!r} is not supported by")
    rank = x.ndim
    if "pads" in a:     # opset < 11
        pads = list(a["pads"])
    else:
        pads = _ints(w, node, 1, values)
        axes = _ints(w, node, 3, values)
        if axes is not None:
            full = [0] * (2 * rank)
            for k, ax in enumerate(ax + rank if ax < 0 else ax for ax in axes):
                full[ax], full[rank + ax] = pads[k], pads[len(axes) + k]
            pads = full
    dx = np.zeros(x.shape, dtype=np.float64)
    src, dst = [], []
    for ax in range(rank):
        b = pads[ax]
        lo, hi = max(0, -b), min(x.shape[ax], g.shape[ax] - b)   # x positions that reach y
        dst.append(slice(lo, max(lo, hi)))
        src.append(slice(lo + b, max(lo, hi) + b))
    dx[tuple(dst)] = g[tuple(src)]
    return _first(node, dx)


def _softmax(w, node, outs, values):
    raise _unsupported(node, "the deconvnet does not project through Softmax; choose a layer below it "
                             "(e.g. the logits) instead of")


_HANDLERS = {
    "Relu": _rectify, "Clip": _rectify, "LeakyRelu": _rectify,
    "Identity": _pass, "Dropout": _pass, "Cast": _pass,
    "Reshape": _reshape, "Flatten": _reshape, "Squeeze": _reshape, "Unsqueeze": _reshape,
    "Transpose": _transpose,
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul,
    "MaxPool": _max_pool, "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool, "GlobalMaxPool": _global_max_pool,
    "BatchNormalization": _batch_norm, "LRN": _lrn,
    "Add": _add, "Sum": _add, "Sub": _sub, "Mul": _mul, "Div": _div,
    "Concat": _concat, "Split": _split, "Slice": _slice, "Pad": _pad,
    "Softmax": _softmax, "LogSoftmax": _softmax,
}
