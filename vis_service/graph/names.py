"""Resolve user-given layer names (tensor names or node names) to tensor names."""
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
    for node in model.graph.node:
        if node.name and node.name == name and node.output:
            return node.output[0]
    node_names = [n.name for n in model.graph.node if n.name]
    raise NotFound(kind, name, produced + node_names)
