"""The part of a graph after a tensor: a model that takes that tensor as an input.

Methods that perturb a layer's activation (Ablation-CAM zeroes one channel of it)
only need to replay what comes after the layer. `graph_after` cuts the graph at
the tensor: the new model's first input is the tensor itself, and its nodes are
exactly those the requested outputs need, walking back from the outputs and
stopping at the tensor.

Where the tensor *separates* the graph inputs from the outputs (a sequential
net, or a layer outside any skip connection) the cut model needs nothing else.
Where a path bypasses it (a layer inside a residual block, a second model
input), the original inputs that path starts from stay inputs of the cut model
(`extra_inputs`); a replay then feeds them unchanged, so the result is still
exactly the model with only that tensor replaced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import onnx
from onnx import helper

from ..errors import InvalidArgument
from .loading import tensor_infos


@dataclass(frozen=True)
class Subgraph:
    model: onnx.ModelProto        # inputs: [tensor] + extra_inputs; outputs: as requested
    tensor: str
    outputs: tuple[str, ...]
    extra_inputs: tuple[str, ...]  # original graph inputs still needed (a path bypasses `tensor`)
    node_count: int               # nodes replayed (of the original graph)

    @property
    def separates(self) -> bool:
        """True when `tensor` alone determines the outputs."""
        return not self.extra_inputs


def _outer_names(node: onnx.NodeProto) -> list[str]:
    """Names an If/Loop/Scan body reads from the enclosing graph."""
    names: list[str] = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            local |= {o for n in g.node for o in n.output}
            for n in g.node:
                names.extend(i for i in n.input if i and i not in local)
                names.extend(x for x in _outer_names(n) if x not in local)
    return names


def graph_after(model: onnx.ModelProto, tensor: str, outputs: Sequence[str] | None = None,
                infos: dict | None = None) -> Subgraph:
    """The model from `tensor` to `outputs` (default: the graph outputs).

    `model` must be prepared (shapes inferred) so the new input can be typed; `infos`: its
    tensor_infos, where the caller has them.
    Raises InvalidArgument("layer", ...) when no output depends on `tensor`.
    """
    g = model.graph
    outputs = tuple(outputs or [o.name for o in g.output])
    infos = tensor_infos(model) if infos is None else infos
    if tensor not in infos:
        raise InvalidArgument("layer", f"tensor {tensor!r} has no inferred type; cannot cut the graph there")
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    graph_inputs = [i.name for i in g.input]
    inits = {t.name for t in g.initializer}

    needed_nodes: set[int] = set()
    needed_inits: set[str] = set()
    reached_inputs: set[str] = set()
    uses_tensor = False
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name == tensor:
            uses_tensor = True
            continue
        if name in inits:
            needed_inits.add(name)
            continue
        if name in graph_inputs:
            reached_inputs.add(name)
            continue
        idx = producer.get(name)
        if idx is None:
            continue
        if idx not in needed_nodes:
            needed_nodes.add(idx)
            stack.extend(g.node[idx].input)
            stack.extend(_outer_names(g.node[idx]))
    if not uses_tensor:
        raise InvalidArgument("layer", f"no output among {list(outputs)} depends on tensor {tensor!r}")

    info = infos[tensor]
    new_inputs = [helper.make_tensor_value_info(tensor, info.elem_type, list(info.shape) if info.shape else None)]
    extra = tuple(n for n in graph_inputs if n in reached_inputs and n != tensor)
    new_inputs += [vi for vi in g.input if vi.name in extra]
    kept = [g.node[i] for i in sorted(needed_nodes)]
    internal = {o for n in kept for o in n.output}
    out_vis = []
    by_name = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    for o in outputs:
        if o in by_name:
            out_vis.append(by_name[o])
        elif o in infos:
            oi = infos[o]
            out_vis.append(helper.make_tensor_value_info(o, oi.elem_type, list(oi.shape) if oi.shape else None))
        else:
            raise InvalidArgument("outputs", f"tensor {o!r} has no inferred type")
    sub_graph = helper.make_graph(
        kept, f"{g.name or 'graph'}_after_{tensor}", new_inputs, out_vis,
        initializer=[t for t in g.initializer if t.name in needed_inits],
        value_info=[vi for vi in g.value_info if vi.name in internal and vi.name not in outputs])
    sub = helper.make_model(sub_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                            producer_name="vis-service subgraph")
    return Subgraph(sub, tensor, outputs, extra, len(kept))
