"""Which nodes lie on a path from some tensors to others (what a backward pass must visit)."""
from __future__ import annotations

from typing import Callable, Iterable

import onnx


def float_path(graph: onnx.GraphProto, sources: Iterable[str], targets: Iterable[str],
               is_float: Callable[[str], bool]) -> tuple[list[onnx.NodeProto], set[str], set[str]]:
    """(nodes on a source -> target path in graph order, tensors on those paths, tensors reached from sources).

    Only float tensors carry the dependency: shape arithmetic (Shape, Cast to int, ...)
    does not make a node part of a path. `graph.node` must be topologically sorted.
    """
    active = set(sources)                 # float tensors that depend on some source
    for node in graph.node:
        if any(i in active for i in node.input if i):
            active.update(o for o in node.output if o and is_float(o))
    relevant = {t for t in targets if t in active}   # ... that also reach a target
    nodes = []
    for node in reversed(graph.node):
        if any(o in relevant for o in node.output if o):
            inputs = [i for i in node.input if i in active]
            if inputs:
                nodes.append(node)
                relevant.update(inputs)
    nodes.reverse()
    return nodes, relevant, active


def dependents(graph: onnx.GraphProto, sources: Iterable[str]) -> set[str]:
    """`sources` and every tensor computed from them, of any type. `graph.node` in graph order."""
    reached = set(sources)
    for node in graph.node:
        if any(i in reached for i in node.input if i):
            reached.update(o for o in node.output if o)
    return reached
