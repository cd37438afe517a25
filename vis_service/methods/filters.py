"""Filters: the weights of a Conv / ConvTranspose / Gemm / MatMul layer (or of its integer form).

Weights stored as initializers and weights computed by constant subgraphs
(Constant, ConstantOfShape, Cast, dequantize chains) are both folded to arrays.

The layer is named as everywhere else (`graph.names.resolve_tensor`): a tensor, a
node's own name, or the name Inspect shows for it ("<op_type>_<index>" for an
unnamed node, "<name>_<k>" for a repeated name).
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import InvalidArgument, NotFound
from ..graph.constants import is_weight_layer, layer_weights
from ..graph.inspect import node_display_names
from ..graph.names import tensor_names
from ..models.store import LoadedModel


def _weight_layer_names(proto: onnx.ModelProto, display: list[str]) -> list[str]:
    """Names to suggest for an unknown layer: weight-bearing nodes as Inspect shows them, and their outputs."""
    out: list[str] = []
    for node, shown in zip(proto.graph.node, display):
        if is_weight_layer(node):
            out.append(shown)
            out.extend(o for o in node.output[:1] if o)
    return out


def _layer_reference(proto: onnx.ModelProto, layer: str) -> str:
    """What `layer_weights` resolves to the same node as `layer`: the name itself when it is a tensor,
    an initializer or a node's own name; else the first output of the node Inspect shows as `layer`."""
    if layer in set(tensor_names(proto)) or layer in {t.name for t in proto.graph.initializer}:
        return layer
    if any(node.name == layer and node.output for node in proto.graph.node):
        return layer
    display = node_display_names(proto)
    for node, shown in zip(proto.graph.node, display):
        if shown == layer and node.output and node.output[0]:
            return node.output[0]
    raise NotFound("layer", layer, _weight_layer_names(proto, display))


def layer_filters(model: LoadedModel, layer: str) -> dict[str, np.ndarray]:
    ref = _layer_reference(model.proto, layer)
    try:
        _node, weight, bias = layer_weights(model.proto, ref)
    except InvalidArgument as e:
        if ref == layer:
            raise
        # the message names the node's output tensor: name the layer as the caller gave it
        message = str(e)[len(e.field) + 2:].replace(repr(ref), f"{layer!r} (output {ref!r})")
        raise InvalidArgument(e.field, message) from None
    out = {"weight": np.ascontiguousarray(weight)}
    if bias is not None:
        out["bias"] = np.ascontiguousarray(bias)
    return out
