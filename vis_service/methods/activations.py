"""Activations: any set of tensors of a model, computed in one onnxruntime run.

Exactly the requested tensors are exposed as outputs (exposing more blocks ORT's
fusions); the session for that set is cached, so repeated requests only run.
"""
from __future__ import annotations

import numpy as np

from ..graph.expose import expose_tensors, exposed_name
from ..graph.names import resolve_tensor
from ..models.store import LoadedModel
from ..runtime.sessions import Runtime


def resolve_layers(model: LoadedModel, layers: list[str], field: str = "layers") -> dict[str, str]:
    """Requested name (tensor or node) -> tensor name; empty = the graph outputs."""
    if not layers:
        return {o: o for o in model.output_names}
    return {name: resolve_tensor(model.proto, name, kind="layer") for name in layers}


def exposed_session(runtime: Runtime, model: LoadedModel, tensors):
    """Cached session whose outputs are exactly `tensors` (order-independent key)."""
    key_tensors = tuple(sorted(set(tensors)))
    return runtime.session(model.graph_id, ("expose", key_tensors),
                           lambda: (expose_tensors(model.proto, list(key_tensors)), None))


def compute_activations(runtime: Runtime, model: LoadedModel, feeds: dict[str, np.ndarray],
                        layers: list[str]) -> dict[str, np.ndarray]:
    resolved = resolve_layers(model, layers)
    session = exposed_session(runtime, model, resolved.values())
    wanted = [exposed_name(model.proto, t) for t in dict.fromkeys(resolved.values())]
    values = session.run_dict(wanted, feeds)
    return {name: values[exposed_name(model.proto, t)] for name, t in resolved.items()}
