"""Which nodes lie on a path from some tensors to others (what a backward pass must visit)."""
from __future__ import annotations

from typing import Callable, Iterable

import onnx


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Names the subgraphs of a control-flow node (If/Loop/Scan bodies, nested ones included)
    read from the enclosing scope: inputs of the node as much as its listed ones."""
    names: list[str] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            graphs = [a.g]
        elif a.type == onnx.AttributeProto.GRAPHS:
            graphs = list(a.graphs)
        else:
            continue
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            local |= {t.values.name for t in g.sparse_initializer}
            local |= {o for n in g.node for o in n.output if o}
            for n in g.node:
                names.extend(i for i in list(n.input) + subgraph_reads(n) if i and i not in local)
            # a body may pass an outer value straight through as its output
            names.extend(o.name for o in g.output if o.name and o.name not in local)
    return names


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor `node` reads: its inputs and, for control flow, what its subgraphs read outside."""
    reads = [i for i in node.input if i]
    return reads + subgraph_reads(node) if node.attribute else reads


def float_path(graph: onnx.GraphProto, sources: Iterable[str], targets: Iterable[str],
               is_float: Callable[[str], bool]) -> tuple[list[onnx.NodeProto], set[str], set[str]]:
    """(nodes on a source -> target path in graph order, tensors on those paths, tensors reached from sources).

    Only float tensors carry the dependency: shape arithmetic (Shape, Cast to int, ...)
    does not make a node part of a path. A control-flow node depends on what its branches or
    body read from the enclosing graph as on its inputs (the TorchScript exporter writes a
    Squeeze of an unknown-size axis as an If whose branches read the tensor that way).
    `graph.node` must be topologically sorted.
    """
    active = set(sources)                 # float tensors that depend on some source
    for node in graph.node:
        if any(i in active for i in node_reads(node)):
            active.update(o for o in node.output if o and is_float(o))
    relevant = {t for t in targets if t in active}   # ... that also reach a target
    nodes = []
    for node in reversed(graph.node):
        if any(o in relevant for o in node.output if o):
            inputs = [i for i in node_reads(node) if i in active]
            if inputs:
                nodes.append(node)
                relevant.update(inputs)
    nodes.reverse()
    return nodes, relevant, active


def dependents(graph: onnx.GraphProto, sources: Iterable[str]) -> set[str]:
    """`sources` and every tensor computed from them, of any type. `graph.node` in graph order."""
    reached = set(sources)
    for node in graph.node:
        if any(i in reached for i in node_reads(node)):
            reached.update(o for o in node.output if o)
    return reached
