"""Expose intermediate tensors as graph outputs (typed, as the checker requires)."""
from __future__ import annotations

import onnx
from onnx import helper

from ..errors import InvalidArgument
from .loading import tensor_infos


def expose_tensors(model: onnx.ModelProto, names: list[str] | tuple[str, ...]) -> onnx.ModelProto:
    """Copy of `model` whose outputs are exactly `names` (in that order).

    Graph inputs and initializers are aliased through Identity nodes, since an
    output may not be a graph input or initializer name directly. Outputs not
    asked for are dropped, so ORT prunes what nobody needs.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    infos = tensor_infos(m)
    graph_inputs = {i.name for i in m.graph.input}
    inits = {t.name for t in m.graph.initializer}
    del m.graph.output[:]
    seen = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        info = infos.get(name)
        if info is None:
            raise InvalidArgument("layers", f"tensor {name!r} has no inferred type; it may live inside a control-flow subgraph, which cannot be exposed")
        out_name = name
        if name in graph_inputs or name in inits:
            out_name = f"{name}__exposed"
            m.graph.node.append(helper.make_node("Identity", [name], [out_name], name=f"expose/{name}"))
        shape = None if info.shape is None else [d if d is not None else None for d in info.shape]
        m.graph.output.append(helper.make_tensor_value_info(out_name, info.elem_type, shape))
    return m


def exposed_name(model: onnx.ModelProto, name: str) -> str:
    """The output name under which `expose_tensors` exposes `name`."""
    graph_inputs = {i.name for i in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    return f"{name}__exposed" if (name in graph_inputs or name in inits) else name
