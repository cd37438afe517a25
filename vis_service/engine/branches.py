"""If nodes whose condition is known when the backward graph is built: the branch they take,
inlined into the graph, is what gets differentiated.

There is no rule for If (nor Loop/Scan): a branch's backward needs the branch's intermediate
tensors, which are not visible outside its scope. But exporters write an If where the answer is fixed by the model: the TorchScript
exporter writes `x.squeeze(1)` of an axis whose size it did not know as
`If(Shape(x)[1] == 1, Squeeze(x), Identity(x))`, with both branches reading x from the
enclosing graph (nn.LocalResponseNorm does this). Where the condition is a constant, is
computed from weights only, or is shape arithmetic over sizes the model fixes, the node
always runs the same branch, and replacing it by that branch's nodes changes nothing the
forward computes. Any other If on the path stays and is refused (no rule).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from ..graph.constants import constant_value
from ..graph.loading import TensorInfo, prepare_model

STANDARD_DOMAINS = ("", "ai.onnx")
_COMPARISONS = {"Equal": np.equal, "Greater": np.greater, "Less": np.less,
                "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal}


def inline_known_branches(model: onnx.ModelProto, path_nodes: list[onnx.NodeProto], infos: dict[str, TensorInfo],
                          constants: dict[str, np.ndarray], static: set[str]) -> onnx.ModelProto | None:
    """A prepared copy of `model` with each If among `path_nodes` whose condition is known replaced
    by the nodes of the branch it takes; None where there is none to replace."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output if o}
    value = _BuildTimeValues(model, producers, infos, constants, static)
    taken: dict[tuple, onnx.GraphProto] = {}  # If node (by its outputs) -> the branch it takes
    for node in path_nodes:
        if node.op_type != "If" or node.domain not in STANDARD_DOMAINS:
            continue
        condition = value(node.input[0])
        if condition is None or condition.size != 1 or condition.dtype == object:
            continue
        name = "then_branch" if bool(condition.reshape(-1)[0]) else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == name)
        if _can_inline(model, node, branch):
            taken[tuple(node.output)] = branch
    if not taken:
        return None
    inlined = onnx.ModelProto()
    inlined.CopyFrom(model)
    nodes, replaced = [], set()
    for node in inlined.graph.node:
        branch = taken.get(tuple(node.output)) if node.op_type == "If" else None
        if branch is None:
            nodes.append(node)
            continue
        nodes.extend(branch.node)
        # the branch's outputs become the If's outputs (positionally)
        nodes.extend(helper.make_node("Identity", [b.name], [o], name=f"{node.name or 'If'}/taken/{o}")
                     for b, o in zip(branch.output, node.output) if o)
        inlined.graph.initializer.extend(branch.initializer)
        inlined.graph.value_info.extend(branch.value_info)
        replaced.update(node.output)
    del inlined.graph.node[:]
    inlined.graph.node.extend(nodes)
    # the If's outputs get the shapes of what the branch computes (inference merged both branches)
    kept = [v for v in inlined.graph.value_info if v.name not in replaced]
    del inlined.graph.value_info[:]
    inlined.graph.value_info.extend(kept)
    return prepare_model(inlined, symbolic_batch=False)


def _can_inline(model: onnx.ModelProto, node: onnx.NodeProto, branch: onnx.GraphProto) -> bool:
    """The branch's own names clash with no name defined elsewhere in the model (ONNX keeps names
    unique along a scope chain, but sibling subgraphs may reuse them), and it has no sparse
    initializers (the main graph would need them as plain ones)."""
    if branch.sparse_initializer or len(branch.output) != len(node.output):
        return False
    own = {t.name for t in branch.initializer} | {o for n in branch.node for o in n.output if o}
    elsewhere: set[str] = set()
    _defined_names(model.graph, elsewhere, skip=tuple(node.output))
    return not own & elsewhere


def _defined_names(graph: onnx.GraphProto, names: set[str], skip: tuple) -> None:
    """Tensor names `graph` and its subgraphs define, but for the subgraphs of the node with outputs `skip`."""
    names.update(i.name for i in graph.input)
    names.update(t.name for t in graph.initializer)
    for n in graph.node:
        names.update(o for o in n.output if o)
        if tuple(n.output) == skip:
            continue
        for a in n.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                _defined_names(g, names, skip)


class _BuildTimeValues:
    """Values of tensors known when the graph is built, by name (None where not known): constants,
    tensors computed from weights alone, and integer shape arithmetic (Shape, Gather, Slice,
    Squeeze/Unsqueeze, Concat, Cast, comparisons, Not) over the static sizes in `infos`.

    Shapes are object arrays holding None for a size that is not fixed (the batch); a comparison
    is made only where every size it reads is fixed."""

    def __init__(self, model, producers, infos, constants, static):
        self._model = model
        self._producers = producers
        self._infos = infos
        self._constants = constants
        self._static = static
        self._known: dict[str, np.ndarray | None] = {}
        self._ops: dict[str, Callable] = {"Shape": self._shape, "Gather": self._gather, "Slice": self._slice,
                                          "Squeeze": self._reshaped, "Unsqueeze": self._reshaped,
                                          "Reshape": self._reshaped, "Identity": self._identity,
                                          "Concat": self._concat, "Cast": self._cast, "Not": self._not,
                                          "Size": self._size}

    def __call__(self, name: str) -> np.ndarray | None:
        if name not in self._known:
            self._known[name] = self._evaluate(name)
        return self._known[name]

    def _evaluate(self, name: str) -> np.ndarray | None:
        if name in self._constants:
            return self._constants[name]
        if name in self._static:
            return constant_value(self._model, name)
        node = self._producers.get(name)
        if node is None or node.domain not in STANDARD_DOMAINS or len(node.output) != 1:
            return None
        if node.op_type in _COMPARISONS:
            a, b = (self._fixed(i) for i in node.input)
            return None if a is None or b is None else np.asarray(_COMPARISONS[node.op_type](a, b))
        op = self._ops.get(node.op_type)
        return None if op is None else op(node)

    def _fixed(self, name: str) -> np.ndarray | None:
        """The value where every element is known, as a plain numeric array."""
        value = self(name)
        if value is None or (value.dtype == object and any(v is None for v in value.reshape(-1))):
            return None
        return value.astype(np.int64) if value.dtype == object else value

    def _shape(self, node) -> np.ndarray | None:
        info = self._infos.get(node.input[0])
        if info is None or info.shape is None:
            return None
        dims = np.array([d if isinstance(d, int) else None for d in info.shape], dtype=object)
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return dims[start:end]

    def _size(self, node) -> np.ndarray | None:
        """The element count: of a known value (Size(Shape(x)) is x's rank, whatever its sizes; the
        TorchScript exporter writes `If(Size(Shape(index)) == 0)` around every scatter_add), else of
        a fully static shape."""
        value = self(node.input[0])
        if value is not None:
            return np.asarray(value.size, np.int64)
        info = self._infos.get(node.input[0])
        if info is None or info.shape is None or not all(isinstance(d, int) for d in info.shape):
            return None
        return np.asarray(int(np.prod(info.shape, dtype=np.int64)), np.int64)

    def _gather(self, node) -> np.ndarray | None:
        data, indices = self(node.input[0]), self._fixed(node.input[1])
        if data is None or indices is None:
            return None
        try:
            return np.take(data, indices, axis=_attr(node, "axis", 0))
        except IndexError:
            return None

    def _slice(self, node) -> np.ndarray | None:
        """The opset >= 10 form on a 1-D tensor (a slice of a shape)."""
        data = self(node.input[0])
        if data is None or data.ndim != 1 or len(node.input) < 3:
            return None
        starts, ends, axes, steps = (self._fixed(i) if i else None
                                     for i in list(node.input[1:5]) + [""] * (5 - len(node.input)))
        if starts is None or ends is None or starts.size != 1:
            return None
        if axes is not None and int(axes.reshape(-1)[0]) not in (0, -1):
            return None
        step = 1 if steps is None else int(steps.reshape(-1)[0])
        return data[int(starts.reshape(-1)[0]):int(ends.reshape(-1)[0]):step] if step else None

    def _reshaped(self, node) -> np.ndarray | None:
        data, info = self(node.input[0]), self._infos.get(node.output[0])
        if data is None or info is None or info.shape is None or not all(isinstance(d, int) for d in info.shape):
            return None
        return data.reshape(info.shape) if data.size == int(np.prod(info.shape)) else None

    def _identity(self, node) -> np.ndarray | None:
        return self(node.input[0])

    def _concat(self, node) -> np.ndarray | None:
        parts = [self(i) for i in node.input]
        if any(p is None for p in parts):
            return None
        return np.concatenate([p.astype(object) for p in parts], axis=_attr(node, "axis", 0))

    def _cast(self, node) -> np.ndarray | None:
        value = self._fixed(node.input[0])
        if value is None:
            return None
        return value.astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to")))

    def _not(self, node) -> np.ndarray | None:
        value = self._fixed(node.input[0])
        return None if value is None else np.logical_not(value)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


