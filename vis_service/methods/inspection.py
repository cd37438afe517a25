"""Inspection: layers, shapes, parameter counts and receptive fields, once per model."""
from __future__ import annotations

from ..graph.inspect import ModelSummary, inspect_model
from ..graph.receptive_field import receptive_fields
from ..models.inputs import shapes_at_sizes
from ..models.store import LoadedModel
from .gradient import representative_sizes


def summarize(model: LoadedModel) -> ModelSummary:
    return model.memo("summary", lambda: inspect_model(model.proto, fields_at(model)))


def fields_at(model: LoadedModel) -> tuple[dict | None, tuple[int, ...]]:
    """(receptive fields, [H, W] they hold at) for a model whose image size is free: at its configured
    size, else 224, as its gradient support is checked (tf2onnx writes every Keras padding as a SAME
    pad, whose split depends on the size: Inspect showed no fields for such models); (None, ()) for a
    model of fixed size, whose fields inspect_model finds itself."""
    sizes = representative_sizes(model)
    if not sizes:
        return None, ()
    at = dict(dict(sizes).get(model.image_input, ()))
    hw = tuple(at.values()) if len(at) == 2 else ()
    return receptive_fields(shapes_at_sizes(model, sizes)), hw
