"""Receptive fields of the spatial feature tensors of a CNN, in input pixels.

Convention (per spatial axis, rows shown; columns alike). Input pixel k has its
centre at coordinate k. For a tensor with field `rf`, the unit at (i, j) has its
field centred at input row ``rf.offset[0] + i * rf.jump[0]`` and covers the
input rows ``offset_h + i*jump_h - (size_h-1)/2 ... offset_h + i*jump_h + (size_h-1)/2``
(inclusive). The offset may be negative, and the field may stick out of the
image, where the network pads. `crop_box` clips a unit's field to the image.

Fields are the theoretical ("maximal") ones: every input pixel that can
influence the unit through some path, i.e. the bounding box of the influencing
pixels. Inside the box, holes are possible (dilation, stride > kernel).

Fields are computed in topological order from the first input that looks like an
image (rank-4 float). The spatial axes are (2, 3) (NCHW) unless that input's last
dim is 1 or 3 while dim 1 is not, in which case the input is taken as NHWC; the
spatial axes of every tensor are then tracked through Transpose / Reshape, so
NHWC -> NCHW transposes (tf2onnx) and channel-shuffle reshapes are followed.
Only rank-4 float tensors appear in the result; tensors whose field is unknown
(ops not understood, spatial dims mixed with others) are left out, and so is
everything computed from them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import onnx
from onnx import helper

from .constants import constant_value
from .loading import opset_version, tensor_infos

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}

# ops that map each spatial position to the same position (any number of inputs,
# broadcasting allowed); multi-input ones merge their inputs' fields
_POINTWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Clip", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Cast", "CastLike",
    "Dropout", "BatchNormalization", "LRN", "Add", "Sub", "Mul", "Div", "Pow", "Sum", "Mean", "Max", "Min",
    "Where", "Not", "And", "Or", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Shrink",
    "QuantizeLinear", "DequantizeLinear", "Concat", "Mod", "IsNaN", "IsInf", "BitShift",
})
_CONV_LIKE = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv"})
_GLOBAL_POOL = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
# ops whose statistics run over the whole spatial extent
_SPATIAL_STATS = frozenset({"InstanceNormalization", "GroupNormalization", "MeanVarianceNormalization"})
# ops whose outputs say nothing of the pixels (a Resize's sizes made from Shape(image) are not
# computed from the image: counted as such, they cut every field after the Resize)
_SHAPE_ONLY = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class ReceptiveField:
    """Field of the units of one tensor; see the module docstring for the convention.

    size: (h, w) extent in input pixels (an int; rounded up where an op makes it
    fractional). jump: (h, w) input-pixel distance between neighbouring units.
    offset: (h, w) input coordinate of the centre of unit (0, 0)'s field.
    is_global: every unit depends on the whole input (after global pooling, or a
    window covering its whole input). approximate: a bound rather than exact: every
    influencing pixel lies in the box, which may hold a few more (transposed conv,
    resize, broadcast, a slice with a negative step). Where no sound box exists
    (merging tensors with different jumps, reflect / edge padding) the field is unknown.
    transposed: the tensor's first spatial axis runs along the input's columns (a Transpose
    swapped them); the three pairs are then in the tensor's axis order, `in_input_order` gives
    them as (rows, columns), as Inspect reports them.
    """

    size: tuple[int, int]
    jump: tuple[float, float]
    offset: tuple[float, float]
    is_global: bool = False
    approximate: bool = False
    transposed: bool = False


@dataclass(frozen=True)
class _Track:
    rf: ReceptiveField
    axes: tuple[int, int]     # spatial axes (h, w) of this tensor
    hw: tuple                 # spatial dims (h, w) of this tensor, ints or symbols


def in_input_order(rf: ReceptiveField) -> ReceptiveField:
    """The field with its (h, w) pairs along the input's rows and columns."""
    if not rf.transposed:
        return rf
    return replace(rf, size=rf.size[::-1], jump=rf.jump[::-1], offset=rf.offset[::-1], transposed=False)


def _num(x: float):
    """int when integral, else float (keeps fields readable)."""
    r = round(x)
    return int(r) if abs(x - r) < 1e-9 else float(x)


def _mk(size, jump, offset, is_global=False, approximate=False) -> ReceptiveField:
    return ReceptiveField(
        tuple(int(math.ceil(s - 1e-9)) for s in size),
        tuple(_num(j) for j in jump),
        tuple(_num(o) for o in offset),
        bool(is_global),
        bool(approximate),
    )


def image_input(model: onnx.ModelProto, infos: dict | None = None) -> tuple[str, tuple[int, int]] | None:
    """(name, spatial axes) of the image input, or None: the first rank-4 float graph input with three
    (colour) channels, else the first rank-4 float input (a mask or a depth map given before the
    RGB image took the images: every method ran on the mask). `infos`: the model's tensor_infos
    where the caller has them."""
    infos = tensor_infos(model) if infos is None else infos
    found = []
    for vi in model.graph.input:
        info = infos.get(vi.name)
        if info is None or info.shape is None or len(info.shape) != 4 or info.elem_type not in _FLOAT_TYPES:
            continue
        s = info.shape
        axes = (1, 2) if s[3] in (1, 3) and s[1] not in (1, 3) else (2, 3)
        found.append((vi.name, axes, s[3] if axes == (1, 2) else s[1]))
    if not found:
        return None
    name, axes, _ = next((f for f in found if f[2] == 3), found[0])
    return name, axes


def untraced_reason(model: onnx.ModelProto, fields: dict, infos: dict | None = None) -> str:
    """Why `fields` (receptive_fields of `model`) hold nothing past the image input, or "" where they
    do: Inspect showed empty columns for 1-D / 3-D CNNs and detectors without saying why."""
    infos = tensor_infos(model) if infos is None else infos
    found = image_input(model, infos)
    if found is None:
        return ("no 4-D float image input: receptive fields are traced from an image's [N, C, H, W] "
                "(or [N, H, W, C]) through its 4-D maps")
    if any(t != found[0] for t in fields):
        return ""
    first = next((n for n in model.graph.node if found[0] in n.input), None)
    if first is None:
        return f"nothing reads the image input {found[0]!r}"
    return (f"not traced past the {first.op_type} node {first.name or '(unnamed)'!r}, the first the image input "
            f"{found[0]!r} goes through (its output is not a 4-D map of the image's rows and columns: a "
            "detector's image gather or resize, a reshape)")


def receptive_fields(model: onnx.ModelProto, infos: dict | None = None) -> dict[str, ReceptiveField]:
    """tensor name -> field, for every rank-4 float tensor computed from the image input.

    The model should have gone through `loading.prepare_model` (inferred shapes
    are needed for auto_pad, Slice and Reshape). Nodes are visited in graph
    order, which ONNX requires to be topological.
    """
    return {t: tr.rf for t, tr in _rank4_tracks(model, infos).items()}


def spatial_axes(model: onnx.ModelProto, infos: dict | None = None) -> dict[str, tuple[int, int]]:
    """tensor name -> its (row, column) axes, for the rank-4 float tensors `receptive_fields`
    covers: (2, 3) for [N, C, H, W]; (1, 2) for a channels-last [N, H, W, C] tensor (tf2onnx's
    NHWC image, ConvNeXt's blocks between their Transposes)."""
    return {t: tr.axes for t, tr in _rank4_tracks(model, infos).items()}


def _rank4_tracks(model: onnx.ModelProto, infos: dict | None) -> dict[str, _Track]:
    infos = tensor_infos(model) if infos is None else infos
    found = image_input(model, infos)
    if found is None:
        return {}
    name, axes = found

    def shape(t: str):
        info = infos.get(t)
        return None if info is None else info.shape

    in_shape = shape(name)
    tracks: dict[str, _Track] = {name: _Track(_mk((1, 1), (1, 1), (0, 0)), axes, (in_shape[axes[0]], in_shape[axes[1]]))}
    tainted: set[str] = {name}   # depends on the image input (with or without known field)
    ctx = _Ctx(model, shape, opset_version(model))

    for node in model.graph.node:
        if not any(i in tainted for i in node.input) or node.op_type in _SHAPE_ONLY:
            continue
        tainted.update(o for o in node.output if o)
        if any(i in tainted and i not in tracks for i in node.input if i):
            continue  # an input with unknown field: the outputs' fields are unknown
        try:
            results = _propagate(node, tracks, ctx)
        except Exception:
            results = {}
        # orientation: a Transpose sets its own; other ops keep their inputs' (mixed: no one box)
        flips = {tracks[i].rf.transposed for i in node.input if i in tracks}
        if node.op_type != "Transpose" and len(flips) > 1:
            results = {}
        for out, tr in results.items():
            if tr is not None:
                if node.op_type != "Transpose" and flips and tr.rf.transposed != next(iter(flips)):
                    tr = replace(tr, rf=replace(tr.rf, transposed=next(iter(flips))))
                tracks[out] = tr

    out: dict[str, _Track] = {}
    for t, tr in tracks.items():
        info = infos.get(t)
        if info is not None and info.shape is not None and len(info.shape) == 4 and info.elem_type in _FLOAT_TYPES:
            out[t] = tr
    return out


class _Ctx:
    def __init__(self, model, shape, opset):
        self.model = model
        self.shape = shape
        self.opset = opset

    def const(self, name: str):
        if not name:
            return None
        return constant_value(self.model, name)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _spatial(shape, axes):
    if shape is None or len(shape) <= max(axes):
        return None
    return (shape[axes[0]], shape[axes[1]])


def _propagate(node, tracks: dict[str, _Track], ctx: _Ctx) -> dict[str, _Track | None]:
    op = node.op_type
    ins = [tracks.get(i) if i else None for i in node.input]
    outs = [o for o in node.output if o]
    if not outs:
        return {}
    out_shape = ctx.shape(outs[0])
    main = ins[0] if ins else None

    if op in _CONV_LIKE or op == "ConvTranspose":
        if main is None or main.axes != (2, 3) or out_shape is None or len(out_shape) != 4:
            return {}
        return {outs[0]: _Track(_window(node, main, ctx, out_shape), (2, 3), (out_shape[2], out_shape[3]))}

    if op in _GLOBAL_POOL:
        if main is None or main.axes != (2, 3):
            return {}
        return {outs[0]: _Track(_global(main), (2, 3), (1, 1))}

    if op.startswith("Reduce"):
        return _reduce(node, main, ctx, outs, out_shape)

    if op in _SPATIAL_STATS:
        if main is None:
            return {}
        axes = _attrs(node).get("axes", [0, 2, 3])   # MeanVarianceNormalization's; InstanceNorm: spatial
        if op == "MeanVarianceNormalization" and not set(main.axes) & {a % 4 for a in axes}:
            return {outs[0]: main}
        if main.axes != (2, 3):
            return {}
        # every unit depends on the whole map through its mean and variance
        return {outs[0]: _Track(_global(main), (2, 3), main.hw)}

    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        if main is None:
            return {}
        rank = len(out_shape) if out_shape is not None else 4
        axis = _attrs(node).get("axis", -1 if ctx.opset >= 13 else 1)
        axis = axis + rank if axis < 0 else axis
        reduced = {axis} if ctx.opset >= 13 else set(range(axis, rank))
        if reduced & set(main.axes) and tuple(main.hw) != (1, 1):
            return {}
        return {outs[0]: main}

    if op in ("LayerNormalization", "RMSNormalization"):
        # normalizes axis..end: per position where those are not spatial (channels last: ConvNeXt)
        if main is None:
            return {}
        rank = len(ctx.shape(node.input[0]) or ()) or 4
        axis = _attrs(node).get("axis", -1)
        axis = axis + rank if axis < 0 else axis
        if set(range(axis, rank)) & set(main.axes):
            return {}
        return {outs[0]: main}

    if op == "MatMul":
        # x @ W with a constant 2-D W: a linear layer over x's last axis, per position where that
        # axis is not spatial (ConvNeXt's pointwise layers on channels-last tensors)
        if main is None or any(t is not None for t in ins[1:]):
            return {}
        rank = len(ctx.shape(node.input[0]) or ()) or 4
        w = ctx.const(node.input[1])
        if w is None or w.ndim != 2 or rank - 1 in main.axes:
            return {}
        return {outs[0]: main}

    if op in _POINTWISE:
        return _merge(node, ins, ctx, outs, out_shape)

    if op == "Split":
        if main is None:
            return {}
        axis = _attrs(node).get("axis", 0)
        rank = len(ctx.shape(node.input[0]) or ()) or 4
        axis = axis + rank if axis < 0 else axis
        if axis in main.axes:
            return {}
        return {o: main for o in outs}

    if op == "Pad":
        return _pad(node, main, ctx, outs, out_shape)

    if op == "Slice":
        return _slice(node, main, ctx, outs, out_shape)

    if op in ("Resize", "Upsample"):
        return _resize(node, main, ctx, outs, out_shape)

    if op == "Transpose":
        if main is None:
            return {}
        perm = _attrs(node).get("perm")
        rank = len(ctx.shape(node.input[0]) or ())
        if perm is None:
            perm = list(reversed(range(rank)))
        perm = list(perm)
        axes = (perm.index(main.axes[0]), perm.index(main.axes[1]))
        if axes[0] > axes[1]:   # rows and columns swap places: the pairs follow the tensor's axes
            rf = main.rf
            rf = replace(rf, size=rf.size[::-1], jump=rf.jump[::-1], offset=rf.offset[::-1],
                         transposed=not rf.transposed)
            return {outs[0]: _Track(rf, (axes[1], axes[0]), main.hw[::-1])}
        return {outs[0]: _Track(main.rf, axes, main.hw)}

    if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
        if main is None:
            return {}
        in_shape = ctx.shape(node.input[0])
        axes = _find_spatial(in_shape, main.axes, out_shape)
        if axes is None:
            return {}
        return {outs[0]: _Track(main.rf, axes, main.hw)}

    return {}


def _ints(v, n, default):
    v = list(v) if v is not None else []
    return v if len(v) == n else [default] * n


def _window(node, main: _Track, ctx: _Ctx, out_shape) -> ReceptiveField:
    """Conv, pools and ConvTranspose over spatial axes (2, 3)."""
    a = _attrs(node)
    op = node.op_type
    kernel = a.get("kernel_shape")
    if kernel is None:
        wname = node.input[3] if op == "QLinearConv" else node.input[1]
        wshape = ctx.shape(wname)
        if wshape is None:
            w = ctx.const(wname)
            wshape = None if w is None else w.shape
        kernel = list(wshape[-2:])
    kernel = [int(k) for k in kernel]
    strides = _ints(a.get("strides"), 2, 1)
    dil = _ints(a.get("dilations"), 2, 1)
    pads = _ints(a.get("pads"), 4, 0)
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    keff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    in_hw = main.hw
    rf = main.rf
    begin = []
    for ax in range(2):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") and op != "ConvTranspose":
            n = in_hw[ax]
            if not isinstance(n, int):
                raise ValueError("auto_pad SAME needs static spatial dims")
            o = -(-n // strides[ax])
            total = max((o - 1) * strides[ax] + keff[ax] - n, 0)
            begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        elif auto_pad == "VALID":
            begin.append(0)
        else:
            begin.append(pads[ax])
    if op == "ConvTranspose":
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") or a.get("output_shape") is not None:
            # the leading crop as onnxruntime resolves it (engine/rules/conv.py _conv_transpose_begin):
            # the extra pixel of an odd total at the end for SAME_UPPER, at the start otherwise
            begin = []
            for ax in range(2):
                out = out_shape[2 + ax]
                if not isinstance(out, int) or not isinstance(in_hw[ax], int):
                    raise ValueError("ConvTranspose with auto_pad / output_shape needs static spatial dims")
                total = (in_hw[ax] - 1) * strides[ax] + keff[ax] - out
                total = max(0, total + _ints(a.get("output_padding"), 2, 0)[ax])
                begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        size, jump, off = [], [], []
        for ax in range(2):
            s = strides[ax]
            j = rf.jump[ax]
            # output unit o reads input units i with i*s in [o+p-(keff-1), o+p]
            size.append(rf.size[ax] + abs(j) * (keff[ax] - 1) / s)
            jump.append(j / s)
            off.append(rf.offset[ax] + j * (begin[ax] - (keff[ax] - 1) / 2) / s)
        return _mk(size, jump, off, rf.is_global, True)
    size, jump, off = [], [], []
    covers_all = True
    for ax in range(2):
        j = rf.jump[ax]   # negative after a Slice with a negative step: the extent grows by |j|
        size.append(rf.size[ax] + (keff[ax] - 1) * abs(j))
        jump.append(j * strides[ax])
        off.append(rf.offset[ax] + j * ((keff[ax] - 1) / 2 - begin[ax]))
        n, o = in_hw[ax], out_shape[2 + ax]
        # one window from -begin to keff - 1 - begin spanning 0 .. n - 1 (pads only widen it)
        if not (o == 1 and isinstance(n, int) and begin[ax] >= 0 and keff[ax] - begin[ax] >= n):
            covers_all = False
    return _mk(size, jump, off, rf.is_global or covers_all, rf.approximate)


def _global(main: _Track) -> ReceptiveField:
    rf = main.rf
    size, jump, off = [], [], []
    for ax in range(2):
        n = main.hw[ax]
        if not isinstance(n, int):
            n = 1
        size.append(rf.size[ax] + (n - 1) * abs(rf.jump[ax]))
        jump.append(rf.jump[ax] * n)
        off.append(rf.offset[ax] + (n - 1) * rf.jump[ax] / 2)
    return _mk(size, jump, off, True, rf.approximate)


def _reduce(node, main, ctx, outs, out_shape):
    if main is None:
        return {}
    a = _attrs(node)
    rank = len(ctx.shape(node.input[0]) or ())
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = ctx.const(node.input[1])
        axes = None if v is None else [int(x) for x in v.reshape(-1)]
    if axes is None or len(axes) == 0:
        if a.get("noop_with_empty_axes", 0):
            return {outs[0]: main}
        axes = list(range(rank))
    axes = {x + rank if x < 0 else x for x in axes}
    hit = axes & set(main.axes)
    if not hit:
        if a.get("keepdims", 1):
            return {outs[0]: main}
        new_axes = tuple(ax - sum(1 for r in axes if r < ax) for ax in main.axes)
        return {outs[0]: _Track(main.rf, new_axes, main.hw)}
    if hit == set(main.axes) and a.get("keepdims", 1) and main.axes == (2, 3):
        return {outs[0]: _Track(_global(main), (2, 3), (1, 1))}
    return {}


def _merge(node, ins, ctx, outs, out_shape):
    """Pointwise op / Concat: union of the inputs' fields, unit by unit."""
    tracked = [t for t in ins if t is not None]
    if not tracked:
        return {}
    if node.op_type == "Concat":
        rank = len(out_shape) if out_shape is not None else 4
        axis = _attrs(node).get("axis", 1)
        axis = axis + rank if axis < 0 else axis
        if axis in tracked[0].axes:
            return {}
    axes = tracked[0].axes
    hw = _spatial(out_shape, axes) if out_shape is not None else tracked[0].hw
    if hw is None:
        hw = tracked[0].hw
    approximate = any(t.rf.approximate for t in tracked)
    is_global = any(t.rf.is_global for t in tracked)
    full = [t for t in tracked if tuple(t.hw) == tuple(hw)]
    broadcast = [t for t in tracked if tuple(t.hw) != tuple(hw)]
    if any(t.axes != axes for t in tracked):
        return {}
    if broadcast and not all(t.rf.is_global for t in broadcast):
        approximate = True
    base = full or tracked
    size, jump, off = [], [], []
    for ax in range(2):
        js = {t.rf.jump[ax] for t in base}
        if len(js) > 1 and not all(t.rf.is_global for t in tracked):
            # the branches' fields drift apart unit by unit: no one size and jump bounds them all
            # (global fields do not: every unit of each sees the whole input)
            return {}
        lo = min(t.rf.offset[ax] - (t.rf.size[ax] - 1) / 2 for t in tracked)
        hi = max(t.rf.offset[ax] + (t.rf.size[ax] - 1) / 2 for t in tracked)
        size.append(hi - lo + 1)
        jump.append(max(js, key=abs))
        off.append((lo + hi) / 2)
    rf = _mk(size, jump, off, is_global, approximate)
    return {o: _Track(rf, axes, hw) for o in outs[:1]}


def _pad(node, main, ctx, outs, out_shape):
    if main is None:
        return {}
    a = _attrs(node)
    rank = len(ctx.shape(node.input[0]) or ())
    if ctx.opset < 11 and "pads" in a:
        pads = list(a["pads"])
    else:
        v = ctx.const(node.input[1])
        if v is None:
            return {}
        pads = [int(x) for x in v.reshape(-1)]
    pad_axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        v = ctx.const(node.input[3])
        if v is None:
            return {}
        pad_axes = [int(x) + rank if x < 0 else int(x) for x in v.reshape(-1)]
    n = len(pad_axes)
    begin = dict(zip(pad_axes, pads[:n]))
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    rf = main.rf
    shift = [begin.get(ax, 0) for ax in main.axes]
    end = dict(zip(pad_axes, pads[n:]))
    padded = any(shift) or any(end.get(ax, 0) for ax in main.axes)
    if padded and mode != "constant" and not rf.is_global:
        return {}   # reflect / edge / wrap: the border units read pixels far inside the image
    off = [rf.offset[k] - shift[k] * rf.jump[k] for k in range(2)]
    new = _mk(rf.size, rf.jump, off, rf.is_global, rf.approximate)
    hw = _spatial(out_shape, main.axes) or main.hw
    return {outs[0]: _Track(new, main.axes, hw)}


def _slice(node, main, ctx, outs, out_shape):
    if main is None:
        return {}
    in_shape = ctx.shape(node.input[0])
    rank = len(in_shape or ())
    a = _attrs(node)
    if ctx.opset < 10:
        starts, ends = list(a.get("starts", [])), list(a.get("ends", []))
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        vals = [ctx.const(node.input[k]) if len(node.input) > k and node.input[k] else None for k in range(1, 5)]
        if vals[0] is None or vals[1] is None:
            return {}
        starts = [int(x) for x in vals[0].reshape(-1)]
        axes = [int(x) for x in vals[2].reshape(-1)] if vals[2] is not None else list(range(len(starts)))
        if len(node.input) > 3 and node.input[3] and vals[2] is None:
            return {}
        steps = [int(x) for x in vals[3].reshape(-1)] if vals[3] is not None else [1] * len(starts)
        if len(node.input) > 4 and node.input[4] and vals[3] is None:
            return {}
    axes = [x + rank if x < 0 else x for x in axes]
    rf = main.rf
    size, jump, off = list(rf.size), list(rf.jump), list(rf.offset)
    approximate = rf.approximate
    for st, ax, step in zip(starts, axes, steps):
        if ax not in main.axes:
            continue
        k = main.axes.index(ax)
        dim = in_shape[ax]
        if not isinstance(dim, int):
            if st < 0:
                return {}
            dim = None
        if st < 0:
            st += dim
        if dim is not None:
            st = max(0, min(st, dim if step > 0 else dim - 1))
        if step < 0:
            approximate = True
        off[k] = off[k] + st * jump[k]
        jump[k] = jump[k] * step
    hw = _spatial(out_shape, main.axes) or main.hw
    return {outs[0]: _Track(_mk(size, jump, off, rf.is_global, approximate), main.axes, hw)}


def _resize(node, main, ctx, outs, out_shape):
    """A bound: the input units each output unit reads, from onnxruntime's coordinate mapping
    where the sizes are static (every output unit checked), else a margin of a few units."""
    if main is None:
        return {}
    a = _attrs(node)
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    default_ctm = b"half_pixel" if node.op_type == "Resize" and ctx.opset >= 11 else b"asymmetric"
    ctm = a.get("coordinate_transformation_mode", default_ctm)
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    nearest = a.get("nearest_mode", b"round_prefer_floor")
    nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
    if ctm == "tf_crop_and_resize" or a.get("antialias", 0):
        return {}   # a region of interest, or a downsampling filter wider than the taps below
    hw_out = _spatial(out_shape, main.axes)
    sc = a.get("scales")
    if sc is None:
        idx = 1 if node.op_type == "Upsample" else 2
        v = ctx.const(node.input[idx]) if len(node.input) > idx and node.input[idx] else None
        if v is not None and v.size:
            sc = [float(x) for x in v.reshape(-1)]
    static = (hw_out is not None and all(isinstance(x, int) for x in hw_out)
              and all(isinstance(x, int) for x in main.hw))
    if sc is not None and len(sc) == len(ctx.shape(node.input[0]) or ()):
        scales = [sc[ax] for ax in main.axes]
    elif static:
        scales = [hw_out[k] / main.hw[k] for k in range(2)]
    else:
        return {}
    rf = main.rf
    taps = {"nearest": 1, "linear": 2, "bilinear": 2, "cubic": 4}.get(mode, 4)
    if node.op_type == "Upsample" and mode == "nearest":
        taps = 2   # the legacy op's rounding varies between runtimes: floor and ceil both bound it
    size, jump, off = [], [], []
    for k in range(2):
        if static:
            slope, lo, hi = _resize_reads(main.hw[k], hw_out[k], scales[k], ctm, mode, nearest, taps)
        else:   # no sizes to check against: the scale's slope, with a margin of `taps` units each side
            slope, lo, hi = 1 / scales[k], -taps, taps
        j = rf.jump[k]
        size.append(rf.size[k] + (hi - lo) * abs(j))
        jump.append(j * slope)
        off.append(rf.offset[k] + j * (lo + hi) / 2)
    hw = hw_out or main.hw
    return {outs[0]: _Track(_mk(size, jump, off, rf.is_global, True), main.axes, hw)}


def _resize_reads(n_in: int, n_out: int, scale: float, ctm: str, mode: str, nearest: str,
                  taps: int) -> tuple[float, float, float]:
    """(slope, lo, hi): output unit o reads input units within [o * slope + lo, o * slope + hi],
    checked for every o (ONNX Resize's coordinate transformations and rounding)."""
    slope = (n_in - 1) / (n_out - 1) if ctm == "align_corners" and n_out > 1 else 1 / scale
    lo, hi = math.inf, -math.inf
    for o in range(n_out):
        if ctm == "align_corners":
            x = 0.0 if n_out == 1 else o * (n_in - 1) / (n_out - 1)
        elif ctm == "asymmetric":
            x = o / scale
        elif ctm == "tf_half_pixel_for_nn":
            x = (o + 0.5) / scale
        elif ctm == "pytorch_half_pixel":
            x = (o + 0.5) / scale - 0.5 if n_out > 1 else 0.0
        elif ctm == "half_pixel_symmetric":
            adjustment = n_out / (scale * n_in)
            x = n_in / 2 * (1 - adjustment) + (o + 0.5) / scale - 0.5
        else:   # half_pixel
            x = (o + 0.5) / scale - 0.5
        if taps == 1:
            if nearest == "floor":
                first = math.floor(x)
            elif nearest == "ceil":
                first = math.ceil(x)
            elif nearest == "round_prefer_ceil":
                first = math.floor(x + 0.5)
            else:   # round_prefer_floor
                first = math.ceil(x - 0.5)
            reads = [first]
        else:
            base = math.floor(x) if taps == 2 and mode != "nearest" else math.floor(x) - (taps // 2 - 1)
            reads = [base + t for t in range(taps)]
        reads = [min(max(r, 0), n_in - 1) for r in reads]
        lo, hi = min(lo, min(reads) - o * slope), max(hi, max(reads) - o * slope)
    return slope, lo, hi


def _prod(dims):
    p = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        p *= d
    return p


def _find_spatial(in_shape, axes, out_shape):
    """Spatial axes of a reshaped tensor: (h, w) must stay adjacent with the same trailing size."""
    if in_shape is None or out_shape is None or axes[1] != axes[0] + 1:
        return None
    h, w = in_shape[axes[0]], in_shape[axes[1]]
    tail_in = in_shape[axes[1] + 1:]
    cands = []
    for k in range(1, len(out_shape) - 1):
        if out_shape[k] == h and out_shape[k + 1] == w:
            tail_out = out_shape[k + 2:]
            if list(tail_out) == list(tail_in) or (_prod(tail_out) is not None and _prod(tail_out) == _prod(tail_in)):
                cands.append((k, k + 1))
    return cands[-1] if cands else None


def crop_box(rf: ReceptiveField, y: int, x: int, input_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of unit (y, x)'s field, clipped to the image.

    Bottom and right are exclusive (``image[top:bottom, left:right]``). Fractional
    bounds (approximate fields) are widened to whole pixels. A global field gives
    the whole image.
    """
    H, W = int(input_hw[0]), int(input_hw[1])
    if rf.is_global:
        return 0, 0, H, W
    box = []
    # (y, x) index the tensor's axes; a transposed field's first runs along the input's columns
    extents = (W, H) if rf.transposed else (H, W)
    for k, (u, n) in enumerate(((y, extents[0]), (x, extents[1]))):
        c = rf.offset[k] + u * rf.jump[k]
        half = (rf.size[k] - 1) / 2
        lo = math.floor(c - half + 1e-9)
        hi = math.ceil(c + half - 1e-9) + 1
        box.append((max(0, min(lo, n)), max(0, min(hi, n))))
    if rf.transposed:
        box.reverse()
    (top, bottom), (left, right) = box
    return top, left, bottom, right
