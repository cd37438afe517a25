"""Resolve user-given layer names (tensor names or node names) to tensor names.

Node names are those Inspect shows: the node's own name, or "<op_type>_<index>"
for unnamed nodes (see `inspect.node_display_names`).
"""
from __future__ import annotations

import onnx

from ..errors import NotFound


def tensor_names(model: onnx.ModelProto) -> list[str]:
    """Every tensor produced in the graph (inputs and node outputs), in graph order."""
    names = [i.name for i in model.graph.input]
    for node in model.graph.node:
        names.extend(o for o in node.output if o)
    return names


def resolve_tensor(model: onnx.ModelProto, name: str, *, kind: str = "layer") -> str:
    """Tensor name for `name`, which may be a tensor or a node name (-> its first output)."""
    produced = tensor_names(model)
    if name in set(produced):
        return name
    init = {t.name for t in model.graph.initializer}
    if name in init:
        return name
    from .inspect import node_display_names  # the names Inspect shows, generated ones included

    display = node_display_names(model)
    for node, shown in zip(model.graph.node, display):
        if name in (node.name, shown) and node.output:
            return node.output[0]
    # suggestions: no weights (exports that list them among the graph inputs offered only biases and
    # norm weights for a block's name, each then refused as a constant); an output is looked for among
    # the graph's outputs first (the list of known names began with the image input and the first layers)
    outputs = [o.name for o in model.graph.output] if kind == "output" else []
    raise NotFound(kind, name, outputs + [n for n in produced if n not in init] + display)
