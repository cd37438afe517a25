"""Types and shapes that ONNX shape inference cannot give, asked of onnxruntime.

ONNX's inference knows only the standard domains: after an op of another domain that
onnxruntime implements (com.microsoft FusedConv, Gelu, ...), every tensor downstream has
no type, so it could be neither exposed nor differentiated through (a gradient would say
the input does not influence the output). onnxruntime infers them when it builds a
session, and reports the types of graph outputs declared without one.
"""
from __future__ import annotations

import onnx
import onnxruntime as ort
from onnx import helper

_ELEM_TYPES = {f"tensor({name})": value for name, value in (
    ("float", onnx.TensorProto.FLOAT), ("double", onnx.TensorProto.DOUBLE), ("float16", onnx.TensorProto.FLOAT16),
    ("bfloat16", onnx.TensorProto.BFLOAT16), ("int64", onnx.TensorProto.INT64), ("int32", onnx.TensorProto.INT32),
    ("int16", onnx.TensorProto.INT16), ("int8", onnx.TensorProto.INT8), ("uint8", onnx.TensorProto.UINT8),
    ("uint16", onnx.TensorProto.UINT16), ("uint32", onnx.TensorProto.UINT32), ("uint64", onnx.TensorProto.UINT64),
    ("bool", onnx.TensorProto.BOOL))}


def complete_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with value_info added for the top-level tensors ONNX inference left untyped
    (and shapes for graph outputs declared without one).

    Returns `model` itself when it has only standard-domain ops or nothing is missing (no
    session is built), or when onnxruntime cannot build the probe (the caller's own session
    reports why).
    """
    graph = model.graph
    if all(node.domain in ("", "ai.onnx") for node in graph.node):
        # ONNX inference covers the standard ops (what it leaves untyped there, e.g. old Dropout
        # masks, nothing reads); a probe session would only slow every load down
        return model
    typed = {vi.name for vi in list(graph.value_info) + list(graph.input) + list(graph.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    typed |= {t.name for t in graph.initializer}
    # graph outputs declared with a type but no shape are asked about too (a missing shape is not rank 0)
    shapeless = {vi.name for vi in graph.output if not vi.type.tensor_type.HasField("shape")}
    untyped = [o for node in graph.node for o in node.output if o and (o not in typed or o in shapeless)]
    if not untyped:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in untyped if name not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - onnxruntime's own exception types; the caller's session reports it
        return model
    found = {o.name: o for o in session.get_outputs()}
    completed = onnx.ModelProto()
    completed.CopyFrom(model)
    for name in untyped:
        out = found.get(name)
        elem = _ELEM_TYPES.get(out.type) if out is not None else None
        if elem is None:
            continue
        shape = None if out.shape is None else [d if isinstance(d, (int, str)) else None for d in out.shape]
        if name in outputs:
            for vi in completed.graph.output:
                if vi.name == name:
                    vi.CopyFrom(helper.make_tensor_value_info(name, elem, shape))
        else:
            completed.graph.value_info.append(helper.make_tensor_value_info(name, elem, shape))
    return completed
