"""Filters: the weights of a Conv / ConvTranspose / Gemm / MatMul layer.

Weights stored as initializers and weights computed by constant subgraphs
(Constant, ConstantOfShape, Cast, dequantize chains) are both folded to arrays.
"""
from __future__ import annotations

import numpy as np

from ..graph.constants import layer_weights
from ..models.store import LoadedModel


def layer_filters(model: LoadedModel, layer: str) -> dict[str, np.ndarray]:
    _node, weight, bias = layer_weights(model.proto, layer)
    out = {"weight": np.ascontiguousarray(weight)}
    if bias is not None:
        out["bias"] = np.ascontiguousarray(bias)
    return out
