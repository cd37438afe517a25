"""Hints a built graph carries for the session that runs it, as model metadata_props.

The graph builders know things about their graphs that onnxruntime's session options
can exploit but that the runtime cannot see; they write them here, the runtime reads them.
"""
from __future__ import annotations

import onnx

# Node order: onnxruntime's default order is a depth-first walk from the outputs, which
# puts a backward graph's ReLU masks next to their use, late. "forward_first" asks for its
# priority-based (Kahn) order, which runs each mask as soon as its forward tensor exists.
EXECUTION_ORDER = "vis.execution_order"
FORWARD_FIRST = "forward_first"


def set_hint(model: onnx.ModelProto, key: str, value: str | None) -> None:
    """Set (or with None remove) one hint."""
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if value is not None:
        model.metadata_props.add(key=key, value=value)


def get_hint(model: onnx.ModelProto, key: str) -> str | None:
    for p in model.metadata_props:
        if p.key == key:
            return p.value
    return None
