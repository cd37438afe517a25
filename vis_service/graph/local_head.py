"""Local heads: recomputing only what a patch of the image changes.

The first layers of a CNN are *local*: each unit of a feature tensor T depends only on
the units of its receptive field in the tensor before. Where T also separates its source
S (the image, at first) from the outputs (a block output of a ResNet, not a tensor inside
a block), changing a region of S changes only the units of T whose field meets that
region, and the rest of the network depends on S through T alone. So an occluded image's
outputs are: T of the clean image, with those units recomputed from a crop of the
occluded S (the *head*, S to T, run on the crop), then the *tail* (`subgraph.graph_after`)
run from T. The same step repeats from T as the new source (its changed units are the
new region): a chain of cuts, each head running on a smaller share of its tensor.

Why the crop gives the same values: a unit whose whole field lies inside the crop (or
reaches past the crop only where the crop edge is the tensor's edge, padded alike) is
computed from the same values by the same windows, provided every strided layer samples
the same positions, which holds when the crop starts at a multiple of T's jump (the
product of the strides). Units near the crop's other edges come out wrong and are not used.

Only heads of windowed ops (Conv, MaxPool, AveragePool; auto_pad SAME too, see _is_local),
constant-mode Pads of the spatial axes (Keras's ZeroPadding2D before a 'valid' Conv: the same
windows as the Conv's own pads) and ops that act per position (activations, BatchNormalization,
LRN, channel Concat, and arithmetic whose constant operands do not vary over space) qualify;
anything else (Resize, reflect / edge Pads, Reshape, global pooling) ends the head before it.
An NHWC image (tf2onnx) starts the chain from its Transpose to NCHW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .loading import tensor_infos
from .paths import dependents
from .receptive_field import image_input, receptive_fields
from .subgraph import graph_after
from .weights import structure_only

_WINDOWED = frozenset({"Conv", "MaxPool", "AveragePool"})
_PER_POSITION = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Clip", "Identity", "Dropout", "BatchNormalization", "LRN", "Add", "Sub", "Mul", "Div", "Sum", "Max",
    "Min", "Mean", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Gelu", "Concat",
})

Interval = tuple[int, int]  # first and last index (inclusive) along one axis
# What one more cut costs per occluded image, in the multiply-adds its time would compute:
# numpy crops and pastes per image and a session run per batch, ~0.25 ms per image on
# ResNet-50 here (0.13 s of a 3.6 s call with three cuts), ~25 M multiply-adds of Conv time.
# An absolute figure: on a small network (MobileNet) a cut's overhead weighs more.
CUT_COST_MACS = 25_000_000


@dataclass(frozen=True)
class AxisSpan:
    """One changed interval of the source along one axis: units lo..hi (inclusive) of T
    change, and the crop of the source starts at index `start` (a multiple of the jump),
    which is T's unit start // jump."""
    lo: int
    hi: int
    start: int


@dataclass(frozen=True)
class LocalCut:
    source: str                     # S: the image, or the cut before
    tensor: str                     # T
    jump: tuple[int, int]           # units of S per unit of T, rows and columns
    crop: tuple[int, int]           # crop size in units of S (multiples of the jump)
    spans: tuple[tuple[AxisSpan, ...], tuple[AxisSpan, ...]]  # per changed row / column interval
    saved_macs: int                 # estimated multiply-adds per sample the crop saves
    head_macs: int = 0              # multiply-adds per sample of the head's Convs on the whole source

    @property
    def cost_macs(self) -> int:
        """Estimated multiply-adds per sample of the head run on its crops."""
        return self.head_macs - self.saved_macs


def axis_spans(length: int, size: int, jump: int, offset: float, units: int,
               changed: Sequence[Interval]) -> tuple[list[AxisSpan], int] | None:
    """Changed units of T and crop start for each changed interval of the source, and the
    common crop length; None where the crop would not be smaller than the source or cannot
    be aligned. T's unit u has its field centred at source index offset + u * jump, `size` wide."""
    if length % jump:
        return None  # a crop pushed against the far edge could not start on the jump grid
    half = (size - 1) / 2
    spans, need = [], 0
    for first_changed, last_changed in changed:
        lo = max(0, math.ceil((first_changed - offset - half) / jump))
        hi = min(units - 1, math.floor((last_changed - offset + half) / jump))
        first = max(0.0, offset + lo * jump - half)
        last = min(length - 1.0, offset + hi * jump + half)
        start = int(first // jump) * jump
        spans.append((lo, hi, start))
        need = max(need, int(math.floor(last)) + 1 - start)
    crop = -(-need // jump) * jump
    if not 0 < crop < length:  # 0: no unit sees any changed index (holes of a stride > kernel)
        return None
    # a crop that would run past the far edge is pushed back against it (still on the grid)
    return [AxisSpan(lo, hi, min(start, length - crop)) for lo, hi, start in spans], crop


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {o: i for i, n in enumerate(graph.node) for o in n.output if o}


def _is_local(node: onnx.NodeProto, tainted: set[str], infos, value_of) -> bool:
    """`value_of(name)`: a constant tensor's value, or None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    outputs = [o for o in node.output if o]
    if node.op_type in _WINDOWED:
        # auto_pad SAME too: its pads depend on the input size only modulo the stride, and a
        # crop on the cut's jump grid has the image's size modulo every stride before the cut
        return len(outputs) == 1
    if node.op_type == "Pad":
        return _is_spatial_constant_pad(node, attrs, infos, value_of)
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


def _is_spatial_constant_pad(node: onnx.NodeProto, attrs: dict, infos, value_of) -> bool:
    """A constant-mode Pad that pads only axes 2 and 3 of a 4-D tensor, by fixed non-negative
    amounts: like a Conv's pads, it pads a crop at the image's edges as it pads the image, and
    its value reaches a unit of the crop's inner edges only where that unit is not used. Its
    pads, value and axes must be known (attributes, or constant inputs)."""
    mode = attrs.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return False
    info = infos.get(node.input[0])
    if info is None or info.shape is None or len(info.shape) != 4:
        return False
    if "pads" in attrs:   # opset < 11
        pads = list(attrs["pads"])
    else:
        if any(x and value_of(x) is None for x in node.input[1:]):
            return False   # pads, value or axes computed at run time
        pads = [int(v) for v in value_of(node.input[1]).reshape(-1)]
    axes = list(range(4))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(a) % 4 for a in value_of(node.input[3]).reshape(-1)]
    if len(pads) != 2 * len(axes):
        return False
    begin, end = dict(zip(axes, pads[:len(axes)])), dict(zip(axes, pads[len(axes):]))
    return (all(p >= 0 for p in pads)
            and not any(begin.get(a, 0) or end.get(a, 0) for a in (0, 1)))


def head_nodes(graph: onnx.GraphProto, source: str, tensor: str, producers: dict[str, int] | None = None) -> list[int]:
    """Indices (graph order) of the nodes computing `tensor`, walking back until `source`.
    `producers`: _producers(graph), where the caller has it."""
    producers = _producers(graph) if producers is None else producers
    nodes, stack = set(), [tensor]
    while stack:
        name = stack.pop()
        i = producers.get(name)
        if name == source or i is None or i in nodes:
            continue
        nodes.add(i)
        stack.extend(x for x in graph.node[i].input if x)
    return sorted(nodes)


def _separators(graph: onnx.GraphProto, source: str, outputs: Sequence[str]) -> set[str]:
    """The tensors every path from `source` to `outputs` passes through (any dependency,
    shape arithmetic included; `graph.node` in graph order, which is topological).

    On the tensors that lie on such paths, placed at their producing node's index (the source
    at -1), a path crosses each index between its ends, and only at that index's node; so a
    tensor separates exactly when no dependency edge runs from before its index to after it,
    and no other output of its node is on a path. One pass for all tensors (a walk back from
    the outputs per candidate took seconds on DenseNet-121's many Concats).
    """
    reached = {source}
    for node in graph.node:
        if any(i in reached for i in node.input if i):
            reached.update(o for o in node.output if o)
    needed = set(outputs)
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            needed.update(i for i in node.input if i)
    relevant = reached & needed
    position, edges, shared = {source: -1}, [], set()
    for index, node in enumerate(graph.node):
        ins = [position[i] for i in node.input if i in relevant and i in position]
        outs = [o for o in node.output if o in relevant]
        if not ins or not outs:
            continue
        for o in outs:
            position[o] = index
        if len(outs) > 1:
            shared.update(outs)
        edges.append((min(ins), index))
    edges.sort()
    result, furthest, k = set(), -2, 0
    for tensor, at in sorted(position.items(), key=lambda item: item[1]):
        while k < len(edges) and edges[k][0] < at:
            furthest = max(furthest, edges[k][1])
            k += 1
        if furthest <= at and tensor not in shared:
            result.add(tensor)
    return result


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


def total_macs(model: onnx.ModelProto, infos: dict | None = None) -> int:
    return sum(_conv_macs(model.graph, tensor_infos(model) if infos is None else infos).values())


def local_cuts(model: onnx.ModelProto, source: str, outputs: Sequence[str],
               changed: tuple[Sequence[Interval], Sequence[Interval]], infos: dict | None = None) -> list[LocalCut]:
    """Every tensor the outputs can be replayed from after a local head from `source`, given
    the changed intervals of the source along rows and columns, the most saving first.

    `model` has `source` as a rank-4 NCHW tensor of static spatial size and inferred shapes
    (a prepared model and its image input, or graph_after's model and its input).
    Cost model: a Conv's multiply-adds, scaled by the crop's share of the source for head
    Convs; everything else is taken as free. `infos`: the model's tensor_infos, where known.
    """
    graph = model.graph
    infos = tensor_infos(model) if infos is None else infos
    shape = infos[source].shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        return []
    traced = image_input(model, infos)
    if traced is None or nchw_source(model, traced[0], "NHWC" if traced[1] == (1, 2) else "NCHW") != source:
        return []  # fields are traced from the first rank-4 input, which must be the source (or its NCHW view)
    hw = shape[2:]
    separators = _separators(graph, source, outputs)
    producers = _producers(graph)
    tainted = dependents(graph, [source])
    macs = _conv_macs(graph, infos)
    inits = {t.name: t for t in graph.initializer}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and len(n.output) == 1}

    def value_of(name: str):
        t = inits.get(name)
        if t is None and name in constant_nodes:
            t = next((helper.get_attribute_value(a) for a in constant_nodes[name].attribute if a.name == "value"), None)
        return numpy_helper.to_array(t) if isinstance(t, onnx.TensorProto) else None

    cuts = []
    for tensor, rf in receptive_fields(model, infos).items():
        info = infos.get(tensor)
        if (tensor not in separators or rf.is_global or rf.approximate or rf.transposed or tensor == source
                or tensor in outputs
                or info is None or info.shape is None or not all(isinstance(d, int) for d in info.shape[2:])
                or not all(float(j).is_integer() for j in rf.jump)):
            continue
        jump = tuple(int(j) for j in rf.jump)
        per_axis = [axis_spans(hw[a], rf.size[a], jump[a], rf.offset[a], info.shape[2 + a], changed[a])
                    for a in range(2)]
        if None in per_axis:
            continue
        head = head_nodes(graph, source, tensor, producers)
        if not all(_is_local(graph.node[i], tainted, infos, value_of) for i in head if graph.node[i].input
                   and any(x in tainted for x in graph.node[i].input)):
            continue
        fraction = per_axis[0][1] * per_axis[1][1] / (hw[0] * hw[1])
        full = sum(macs.get(i, 0) for i in head)
        cuts.append(LocalCut(source, tensor, jump, (per_axis[0][1], per_axis[1][1]),
                             (tuple(per_axis[0][0]), tuple(per_axis[1][0])), int(full * (1 - fraction)), full))
    return sorted(cuts, key=lambda c: -c.saved_macs)


def nchw_source(model: onnx.ModelProto, image: str, layout: str) -> str | None:
    """The NCHW tensor the cuts start from: the image input itself, or for an NHWC input the
    output of the Transpose to NCHW that is its only consumer (tf2onnx); None otherwise."""
    if layout == "NCHW":
        return image
    consumers = [n for n in model.graph.node if image in n.input]
    if layout != "NHWC" or len(consumers) != 1 or consumers[0].op_type != "Transpose":
        return None
    perm = [a.ints for a in consumers[0].attribute if a.name == "perm"]
    return consumers[0].output[0] if perm and list(perm[0]) == [0, 3, 1, 2] else None


def plan_local_cuts(model: onnx.ModelProto, image: str, outputs: Sequence[str], patch: tuple[int, int],
                    stride: tuple[int, int], layout: str = "NCHW", min_saving: float = 0.1,
                    cut_cost: float | None = None, max_sources: int = 48) -> list[LocalCut]:
    """The chain of cuts for occluding `patch`-sized patches at `stride` over the image that
    costs the fewest estimated multiply-adds per occluded image: every head's Convs on its
    crop's share of its source, the network after the last cut in full, plus `cut_cost`
    multiply-adds per cut (default CUT_COST_MACS: its crops, pastes and one more session run
    per batch); [] unless the chain saves at least `min_saving` of the forward pass.

    Found by a search over chains (each cut's changed units are the next source's changed
    region; at most `max_sources` sources explored), not greedily: the cut that saves most
    from a source is often a long head on a large crop, where several short heads on crops
    growing block by block cost less (ResNet-50, 32x32 patches at stride 16: greedy
    layer2.0 / layer2.3 / layer3.0 on crops 112 / 21 / 20, estimated 0.70 of the forward;
    searched layer1.0 / 1.2 / 2.0 / 2.1 / 2.2 / 2.3 / 3.0 / 3.1 on crops 72 / 21 / 20 / 13 /
    15 / 17 / 20 / 13, 0.66; a whole occlusion call, warm, 3.47 -> 3.21 s).

    `model` is prepared (static image size, shapes inferred). For an NHWC image the first
    cut's source is its NCHW view (see nchw_source): crops are fed to the head transposed.
    """
    total = total_macs(model)
    source = nchw_source(model, image, layout)
    shape = None if source is None else tensor_infos(model)[source].shape
    if not total or shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        return []
    cut_cost = CUT_COST_MACS if cut_cost is None else cut_cost
    changed = tuple(tuple((t, t + patch[a] - 1) for t in range(0, shape[2 + a] - patch[a] + 1, stride[a]))
                    for a in range(2))
    light = structure_only(model)  # the search builds many graph_after models: shapes suffice
    light_infos = tensor_infos(light)
    after: dict[str, tuple[onnx.ModelProto, dict]] = {}  # cut tensor -> graph after it, its infos
    best: dict[tuple, tuple[float, list[LocalCut]]] = {}

    def cheapest(current: onnx.ModelProto, infos: dict, source: str, changed) -> tuple[float, list[LocalCut]]:
        """(estimated multiply-adds, chain) from `source` with its `changed` units to the outputs."""
        key = (source, changed)
        if key not in best:
            result: tuple[float, list[LocalCut]] = (float(total_macs(current, infos)), [])
            explore = len(best) < max_sources  # bounds the search: each source costs a local_cuts pass
            best[key] = result  # while exploring; never read back (each cut moves forward)
            for cut in local_cuts(current, source, outputs, changed, infos) if explore else []:
                cost = cut.cost_macs + cut_cost
                if cost >= result[0]:
                    continue  # what follows the cut costs at least nothing: it cannot win
                if cut.tensor not in after:
                    sub = graph_after(light, cut.tensor, outputs, light_infos).model
                    after[cut.tensor] = sub, tensor_infos(sub)
                spans = tuple(tuple((s.lo, s.hi) for s in cut.spans[a]) for a in range(2))
                rest, chain = cheapest(*after[cut.tensor], cut.tensor, spans)
                if cost + rest < result[0]:
                    result = (cost + rest, [cut] + chain)
            best[key] = result
        return best[key]

    cost, chain = cheapest(model, tensor_infos(model), source, changed)
    return chain if chain and cost <= (1 - min_saving) * total else []


def head_model(model: onnx.ModelProto, cut: LocalCut) -> onnx.ModelProto:
    """The head as a model: the source, its spatial size left open for crops, to T."""
    graph = model.graph
    nodes = [graph.node[i] for i in head_nodes(graph, cut.source, cut.tensor)]
    used = {x for n in nodes for x in n.input}
    infos = tensor_infos(model)
    info = infos[cut.source]
    source = helper.make_tensor_value_info(cut.source, info.elem_type,
                                           [info.shape[0], info.shape[1], "crop_h", "crop_w"])
    out = helper.make_tensor_value_info(cut.tensor, infos[cut.tensor].elem_type, None)
    sub = helper.make_graph(nodes, f"{graph.name or 'graph'}_head_{cut.tensor}", [source], [out],
                            initializer=[t for t in graph.initializer if t.name in used])
    return helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             producer_name="vis-service local head")
