"""The bulk of a model's bytes: its constant tensors (weights), counted or left out.

A session's memory is mostly its copy of the weights (onnxruntime's, and the packed / blocked
forms it makes of them); a backward graph adds the flipped and transposed weights its rules
write as constants. `session_bytes` estimates it before the session exists. `structure_only`
keeps what is read of a built graph once its session exists (inputs, outputs, node structure,
small constants) without the weights' values, so a cache of sessions does not also hold every
graph's weights in Python.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# initializers up to this many elements keep their values in structure_only: Reshape targets,
# Slice starts and pads, read by graph planning and rules
SMALL_CONSTANT_ELEMENTS = 4096


def _elem_size(elem_type: int) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


# ops whose constant operands onnxruntime packs or reorders into a copy of its own (MLAS GEMM
# packing, NCHWc blocked filters): a weight read by two of them (a Gemm's forward and its adjoint)
# is held three times
_PACKING_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def constant_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's constant tensors at run time: initializers, Constant nodes, and the
    outputs of ConstantOfShape nodes whose shape is an initializer (the onnx wheel's light_*
    models make every weight so)."""
    return sum(size for size, _ in _constants(model).values())


def session_bytes(model: onnx.ModelProto) -> int:
    """Estimated bytes a session of `model` holds for its constants: onnxruntime's copy, plus one
    packed copy per Conv / Gemm / MatMul that reads it (VGG-19 with 0.54 GB of weights measured
    1.15 GB per forward session and 2.0 GB per backward graph, estimated 1.07 and 1.7)."""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in _PACKING_OPS:
            for name in set(node.input):
                readers[name] = readers.get(name, 0) + 1
    return sum(size * (1 + readers.get(source, 0)) for source, (size, _) in _constants(model).items())


def _constants(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """name -> (bytes, element type) of every constant tensor (see constant_bytes)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    out = {t.name: (int(np.prod(t.dims, dtype=np.int64)) * _elem_size(t.data_type), t.data_type)
           for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    out[node.output[0]] = (int(np.prod(a.t.dims, dtype=np.int64)) * _elem_size(a.t.data_type),
                                           a.t.data_type)
        elif node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            dims = numpy_helper.to_array(inits[node.input[0]]).reshape(-1)
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            elem = value.data_type if value is not None else onnx.TensorProto.FLOAT
            out[node.output[0]] = (int(np.prod(dims, dtype=np.int64)) * _elem_size(elem), elem)
    return out


def structure_only(model: onnx.ModelProto, keep: int = SMALL_CONSTANT_ELEMENTS) -> onnx.ModelProto:
    """A copy whose initializers of more than `keep` elements hold their name, type and shape only.

    Built from the parts, never copying the weights it drops (ResNet-50: 50 -> 1.5 ms); node
    attributes (Constant nodes' values) are kept as they are."""
    g = model.graph
    inits = [t if int(np.prod(t.dims, dtype=np.int64)) <= keep
             else onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims) for t in g.initializer]
    light = helper.make_graph(g.node, g.name, g.input, g.output, initializer=inits, value_info=g.value_info)
    light.sparse_initializer.extend(g.sparse_initializer)   # rare, and small: kept whole
    out = helper.make_model(light, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.metadata_props.extend(model.metadata_props)
    out.functions.extend(model.functions)
    return out


def activation_bytes_per_input_byte(model: onnx.ModelProto, image: str, spatial: tuple[int, int],
                                    axes: tuple[int, int] = (2, 3)) -> float | None:
    """Bytes of the float tensors a forward run computes per byte of the image input, with the
    image's spatial dims (`axes`) set to `spatial` and its other dims to 1 where not fixed; None
    where shape inference leaves a rank-2+ float tensor without a size.

    For a convolutional network whose image size is free, activations grow with the image's area,
    so this ratio (at a typical size) times an input's bytes estimates what a run of it computes."""
    import onnx.shape_inference

    m = structure_only(model, keep=1 << 16)
    graph_input = next((i for i in m.graph.input if i.name == image), None)
    if graph_input is None or not graph_input.type.tensor_type.HasField("shape"):
        return None
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) <= max(axes):
        return None
    sizes = []
    for k, d in enumerate(dims):
        value = spatial[axes.index(k)] if k in axes else (d.dim_value if d.HasField("dim_value") else 1)
        d.Clear()
        d.dim_value = int(value)
        sizes.append(int(value))
    for i in m.graph.input:   # other inputs keep what they have; their symbolic dims become 1
        for d in i.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    del m.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - no estimate where inference fails
        return None
    total = 0
    for vi in inferred.graph.value_info:
        tt = vi.type.tensor_type
        if tt.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if len(shape) < 2:
            continue
        if None in shape:
            return None
        total += int(np.prod(shape, dtype=np.int64)) * _elem_size(tt.elem_type)
    input_bytes = int(np.prod(sizes, dtype=np.int64)) * _elem_size(graph_input.type.tensor_type.elem_type)
    return total / max(1, input_bytes)
