"""Expose intermediate tensors as graph outputs (typed, as the checker requires)."""
from __future__ import annotations

import onnx
from onnx import helper

from ..errors import InvalidArgument
from .loading import TensorInfo, opset_version, tensor_infos


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
        info = infos.get(name) or _dropout_mask_info(m, name, infos)
        if info is None:
            where = ("no node of the main graph makes it (a tensor inside a control-flow subgraph cannot be exposed)"
                     if not any(name in n.output for n in m.graph.node) else "ONNX shape inference gives it no type")
            raise InvalidArgument("layers", f"tensor {name!r} cannot be exposed: {where}")
        out_name = name
        if name in graph_inputs or name in inits:
            out_name = f"{name}__exposed"
            m.graph.node.append(helper.make_node("Identity", [name], [out_name], name=f"expose/{name}"))
        shape = None if info.shape is None else [d if d is not None else None for d in info.shape]
        m.graph.output.append(helper.make_tensor_value_info(out_name, info.elem_type, shape))
    return m


def _dropout_mask_info(model: onnx.ModelProto, name: str, infos: dict) -> TensorInfo | None:
    """The mask output of a Dropout, which ONNX shape inference leaves untyped before opset 10:
    the data's shape, and its type there (bool from opset 10 on), as onnxruntime computes it."""
    for node in model.graph.node:
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] == name:
            data = infos.get(node.input[0])
            if data is None:
                return None
            elem = data.elem_type if opset_version(model) < 10 else onnx.TensorProto.BOOL
            return TensorInfo(name, elem, data.shape)
    return None


def exposed_name(model: onnx.ModelProto, name: str) -> str:
    """The output name under which `expose_tensors` exposes `name`."""
    graph_inputs = {i.name for i in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    return f"{name}__exposed" if (name in graph_inputs or name in inits) else name
