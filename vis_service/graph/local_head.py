"""Local heads: recomputing only what a patch of the image changes.

The first layers of a CNN are *local*: each unit of a feature tensor T depends only on
the pixels in its receptive field. Where T also separates the image from the outputs
(a block output of a ResNet, not a tensor inside a block), changing a patch of the image
changes only the units of T whose field meets the patch, and the rest of the network
depends on the image through T alone. So an occluded image's outputs are: T of the clean
image, with those units recomputed from a crop of the occluded image (the *head*, input
to T, run on the crop), then the *tail* (`subgraph.graph_after`) run from T.

Why the crop gives the same values: a unit whose whole field lies inside the crop (or
reaches past the crop only where the crop edge is the image edge, padded alike) is
computed from the same pixels by the same windows, provided every strided layer samples
the same positions, which holds when the crop starts at a multiple of T's jump (the
product of the strides). Units near the crop's other edges come out wrong and are not used.

Only heads of windowed ops with explicit pads (Conv, MaxPool, AveragePool) and ops that
act per position (activations, BatchNormalization, LRN, channel Concat, and arithmetic
whose constant operands do not vary over space) qualify; anything else (Resize, Pad,
Reshape, auto_pad SAME, whose pads depend on the input size) ends the head before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper

from .loading import tensor_infos
from .receptive_field import receptive_fields

_WINDOWED = frozenset({"Conv", "MaxPool", "AveragePool"})
_PER_POSITION = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Clip", "Identity", "Dropout", "BatchNormalization", "LRN", "Add", "Sub", "Mul", "Div", "Sum", "Max",
    "Min", "Mean", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Gelu", "Concat",
})


@dataclass(frozen=True)
class AxisSpan:
    """One patch position along one axis: units lo..hi (inclusive) of T change, and the
    crop starts at input pixel `start` (a multiple of the jump), i.e. at unit start // jump."""
    lo: int
    hi: int
    start: int


@dataclass(frozen=True)
class LocalCut:
    tensor: str                     # T
    jump: tuple[int, int]           # input pixels per unit of T, rows and columns
    crop: tuple[int, int]           # crop size in input pixels (multiples of the jump)
    spans: tuple[tuple[AxisSpan, ...], tuple[AxisSpan, ...]]  # per patch row / patch column
    head_nodes: tuple[int, ...]     # indices into model.graph.node, in graph order
    saving: float                   # estimated share of the full forward's multiply-adds avoided


def axis_spans(length: int, size: int, jump: int, offset: float, units: int, patch: int,
               positions: Sequence[int]) -> tuple[list[AxisSpan], int] | None:
    """Changed units and crop start for each patch start in `positions`, and the common crop
    length; None where the crop would not be smaller than the image or cannot be aligned."""
    if length % jump:
        return None  # a crop pushed against the far edge could not start on the jump grid
    half = (size - 1) / 2
    spans, need = [], 0
    for t in positions:
        lo = max(0, math.ceil((t - offset - half) / jump))
        hi = min(units - 1, math.floor((t + patch - 1 - offset + half) / jump))
        first = max(0.0, offset + lo * jump - half)
        last = min(length - 1.0, offset + hi * jump + half)
        start = int(first // jump) * jump
        spans.append((lo, hi, start))
        need = max(need, int(math.floor(last)) + 1 - start)
    crop = -(-need // jump) * jump
    if crop >= length:
        return None
    # a crop that would run past the far edge is pushed back against it (still on the grid)
    return [AxisSpan(lo, hi, min(start, length - crop)) for lo, hi, start in spans], crop


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {o: i for i, n in enumerate(graph.node) for o in n.output if o}


def _image_dependent(graph: onnx.GraphProto, image: str) -> set[str]:
    tainted = {image}
    for node in graph.node:
        if any(i in tainted for i in node.input):
            tainted.update(o for o in node.output if o)
    return tainted


def _is_local(node: onnx.NodeProto, tainted: set[str], infos) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    outputs = [o for o in node.output if o]
    if node.op_type in _WINDOWED:
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return auto_pad in ("NOTSET", "VALID") and len(outputs) == 1
    if node.op_type not in _PER_POSITION:
        return False
    if node.op_type == "Concat":
        return attrs.get("axis") in (1, -3)
    if node.op_type in ("BatchNormalization", "LRN"):
        return len(outputs) == 1  # per-channel parameters; training mode's statistics are global
    for name in node.input:
        if not name or name in tainted:
            continue
        info = infos.get(name)
        shape = None if info is None else info.shape
        # a constant operand must not vary over space: broadcasting aligns trailing axes, so
        # all but the channel axis (third from the end) must be 1 ([C] would run along W)
        if shape is None or any(d != 1 for i, d in enumerate(reversed(shape)) if i != 2):
            return False
    return True


def _head(graph: onnx.GraphProto, tensor: str, image: str, producers, tainted, infos) -> list[int] | None:
    """Nodes computing `tensor` from the image, or None where one is not local."""
    nodes, stack, seen = set(), [tensor], set()
    while stack:
        name = stack.pop()
        if name in seen or name not in producers:
            continue
        seen.add(name)
        i = producers[name]
        if i in nodes:
            continue
        node = graph.node[i]
        if any(x in tainted for x in node.input) and not _is_local(node, tainted, infos):
            return None
        nodes.add(i)
        stack.extend(x for x in node.input if x)
    return sorted(nodes)


def _separates(graph: onnx.GraphProto, tensor: str, image: str, outputs: Sequence[str], producers) -> bool:
    """True when every path from the image to `outputs` passes through `tensor`."""
    stack, seen = list(outputs), set()
    while stack:
        name = stack.pop()
        if name == image:
            return False
        if name in seen or name == tensor:
            continue
        seen.add(name)
        if name in producers:
            stack.extend(x for x in graph.node[producers[name]].input if x)
    return True


def _conv_macs(graph: onnx.GraphProto, infos) -> dict[int, int]:
    """Multiply-adds per sample of every Conv with known shapes (what dominates a CNN's time)."""
    macs = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        out, w = infos.get(node.output[0]), infos.get(node.input[1])
        if out is None or w is None or out.shape is None or w.shape is None:
            continue
        dims = list(out.shape[1:]) + list(w.shape[1:])
        if all(isinstance(d, int) for d in dims):
            macs[i] = int(np.prod(out.shape[1:], dtype=np.int64)) * int(np.prod(w.shape[1:], dtype=np.int64))
    return macs


def local_cuts(model: onnx.ModelProto, image: str, outputs: Sequence[str], patch: tuple[int, int],
               stride: tuple[int, int]) -> list[LocalCut]:
    """Every tensor the outputs can be replayed from after a local head, for this patch geometry,
    the most saving first.

    `model` is prepared (static image size, shapes inferred), its image input NCHW.
    Cost model: a Conv's multiply-adds, scaled by the crop's share of the image for head
    Convs; everything else is taken as free.
    """
    graph = model.graph
    infos = tensor_infos(model)
    shape = infos[image].shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        return []
    hw = shape[2:]
    producers = _producers(graph)
    tainted = _image_dependent(graph, image)
    macs = _conv_macs(graph, infos)
    total = sum(macs.values())
    if not total:
        return []
    starts = [list(range(0, hw[a] - patch[a] + 1, stride[a])) for a in range(2)]
    cuts = []
    for tensor, rf in receptive_fields(model).items():
        info = infos.get(tensor)
        if (rf.is_global or rf.approximate or tensor == image or tensor in outputs or info is None
                or info.shape is None or not all(isinstance(d, int) for d in info.shape[2:])
                or not all(float(j).is_integer() for j in rf.jump)):
            continue
        jump = tuple(int(j) for j in rf.jump)
        per_axis = [axis_spans(hw[a], rf.size[a], jump[a], rf.offset[a], info.shape[2 + a], patch[a], starts[a])
                    for a in range(2)]
        if None in per_axis or not _separates(graph, tensor, image, outputs, producers):
            continue
        head = _head(graph, tensor, image, producers, tainted, infos)
        if head is None:
            continue
        fraction = per_axis[0][1] * per_axis[1][1] / (hw[0] * hw[1])
        saving = sum(macs.get(i, 0) for i in head) * (1 - fraction) / total
        cuts.append(LocalCut(tensor, jump, (per_axis[0][1], per_axis[1][1]),
                             (tuple(per_axis[0][0]), tuple(per_axis[1][0])), tuple(head), saving))
    return sorted(cuts, key=lambda c: -c.saving)


def plan_local_cut(model: onnx.ModelProto, image: str, outputs: Sequence[str], patch: tuple[int, int],
                   stride: tuple[int, int], min_saving: float = 0.1) -> LocalCut | None:
    """The cut that saves the most (see local_cuts), or None where none is estimated to save
    at least `min_saving` of the forward pass's multiply-adds."""
    cuts = local_cuts(model, image, outputs, patch, stride)
    return cuts[0] if cuts and cuts[0].saving >= min_saving else None


def head_model(model: onnx.ModelProto, image: str, cut: LocalCut) -> onnx.ModelProto:
    """The head as a model: the image input, its spatial size left open for crops, to T."""
    graph = model.graph
    nodes = [graph.node[i] for i in cut.head_nodes]
    used = {x for n in nodes for x in n.input}
    infos = tensor_infos(model)
    info = infos[image]
    source = helper.make_tensor_value_info(image, info.elem_type, [info.shape[0], info.shape[1], "crop_h", "crop_w"])
    out = helper.make_tensor_value_info(cut.tensor, infos[cut.tensor].elem_type, None)
    sub = helper.make_graph(nodes, f"{graph.name or 'graph'}_head_{cut.tensor}", [source], [out],
                            initializer=[t for t in graph.initializer if t.name in used])
    return helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             producer_name="vis-service local head")
