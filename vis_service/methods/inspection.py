"""Inspection: layers, shapes, parameter counts and receptive fields, once per model."""
from __future__ import annotations

from ..graph.inspect import ModelSummary, inspect_model
from ..models.store import LoadedModel


def summarize(model: LoadedModel) -> ModelSummary:
    return model.memo("summary", lambda: inspect_model(model.proto))
