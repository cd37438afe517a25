"""A summary of a model for the Inspect call: tensors, nodes, parameters, fields.

Parameters are the elements of the floating-point constant tensors that feed
input-dependent nodes (weights, biases, BN statistics, ...). Integer constants
(shapes, axes, pads) are not parameters. Sizes come from initializer dims or
inferred shapes, ConstantOfShape weights from their (small) shape input, so
nothing big is ever materialized. A shared constant counts once in the total
but in every node that reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .constants import NONDETERMINISTIC_OPS, constant_value
from .loading import opset_version, tensor_infos
from .receptive_field import ReceptiveField, receptive_fields, untraced_reason

_DATATYPES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.DOUBLE: "FP64", onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT16: "INT16", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16", onnx.TensorProto.UINT32: "UINT32", onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.STRING: "BYTES",
}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# parameters counted: float weights, and a quantized model's integer ones (its int32 biases included;
# shape constants are int64)
_PARAMETER_TYPES = _FLOATS | {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                              onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.INT4,
                              onnx.TensorProto.UINT4}


def datatype_name(elem_type: int) -> str:
    """KServe-style datatype string ("FP32", "INT64", ...) of an ONNX element type."""
    if elem_type in _DATATYPES:
        return _DATATYPES[elem_type]
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return "UNDEFINED"


@dataclass(frozen=True)
class TensorSummary:
    name: str
    datatype: str                 # "FP32", ...
    shape: tuple | None           # ints, symbols ("N") or None per dim; None if rank unknown


@dataclass(frozen=True)
class NodeSummary:
    name: str                     # node name, or a generated "<op_type>_<index>" when empty
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    output_shapes: tuple           # one shape (or None) per output
    parameter_count: int
    receptive_fields: dict[str, ReceptiveField] = field(default_factory=dict)  # rank-4 float outputs
    constant: bool = False        # depends on no graph input (builds a weight or a shape)


@dataclass(frozen=True)
class ModelSummary:
    inputs: tuple[TensorSummary, ...]
    outputs: tuple[TensorSummary, ...]
    opset: int
    producer_name: str
    producer_version: str
    ir_version: int
    parameter_count: int
    nodes: tuple[NodeSummary, ...]
    fields_at: tuple[int, ...] = ()     # [H, W] the receptive fields hold at (a free-size model), else ()
    fields_note: str = ""               # why there are none (graph.receptive_field.untraced_reason), else ""


def node_display_names(model: onnx.ModelProto) -> list[str]:
    """One unique name per node, in graph order: the node's name, or "<op_type>_<index>"
    (graph index) when it has none; a clash with another name gets a "_<k>" suffix.

    The mapping depends only on the graph, so it is stable between calls.
    """
    taken = {n.name for n in model.graph.node if n.name}
    out: list[str] = []
    used: set[str] = set()
    for idx, node in enumerate(model.graph.node):
        name = node.name
        if not name or name in used:
            base = name or f"{node.op_type}_{idx}"
            name, k = base, 1
            while name in used or (name != node.name and name in taken):
                name = f"{base}_{k}"
                k += 1
        used.add(name)
        out.append(name)
    return out


def _numel(shape) -> int | None:
    if shape is None:
        return None
    n = 1
    for d in shape:
        if not isinstance(d, int):
            return None
        n *= d
    return n


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of tensors that depend on no graph input (initializers included)."""
    g = model.graph
    const = {t.name for t in g.initializer}
    for node in g.node:
        if node.op_type in NONDETERMINISTIC_OPS:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if all((not i) or i in const for i in node.input):
            const.update(o for o in node.output if o)
    return const


def inspect_model(model: onnx.ModelProto, fields: tuple[dict | None, tuple[int, ...]] = (None, ())) -> ModelSummary:
    """Summary of a prepared model (see `loading.prepare_model`). `fields`: receptive fields found for
    it elsewhere and the [H, W] they hold at (a model whose image size is free), else computed here."""
    g = model.graph
    infos = tensor_infos(model)
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    const = constant_tensors(model)

    def summary(name: str) -> TensorSummary:
        info = infos.get(name)
        if info is None:
            return TensorSummary(name, "UNDEFINED", None)
        return TensorSummary(name, datatype_name(info.elem_type), info.shape)

    sizes: dict[str, int] = {}

    def param_size(name: str) -> int:
        """Elements of constant `name` if it is a float tensor, else 0."""
        if name in sizes:
            return sizes[name]
        n = 0
        if name in inits:
            t = inits[name]
            if t.data_type in _PARAMETER_TYPES:
                n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        else:
            info = infos.get(name)
            node = producer.get(name)
            elem = info.elem_type if info is not None else None
            if node is not None and node.op_type == "ConstantOfShape" and elem is None:
                elem = onnx.TensorProto.FLOAT
                for a in node.attribute:
                    if a.name == "value":
                        elem = a.t.data_type
            if elem in _FLOATS:
                numel = _numel(info.shape) if info is not None else None
                if numel is None and node is not None and node.op_type == "ConstantOfShape" and node.input[0] in inits:
                    numel = int(np.prod(numpy_helper.to_array(inits[node.input[0]]), dtype=np.int64))
                if numel is None:
                    v = constant_value(model, name)
                    numel = int(v.size) if v is not None and v.dtype.kind == "f" else 0
                n = numel
        sizes[name] = n
        return n

    rfs = fields[0] if fields[0] is not None else receptive_fields(model)
    names = node_display_names(model)
    nodes = []
    frontier: set[str] = set()
    for idx, node in enumerate(g.node):
        is_const_node = all(o in const for o in node.output if o)
        count = 0
        if not is_const_node:
            for i in dict.fromkeys(node.input):
                if i and i in const:
                    count += param_size(i)
                    frontier.add(i)
        outs = tuple(node.output)
        nodes.append(NodeSummary(
            name=names[idx],
            op_type=node.op_type,
            domain=node.domain,
            inputs=tuple(node.input),
            outputs=outs,
            output_shapes=tuple(infos[o].shape if o in infos else None for o in outs),
            parameter_count=count,
            receptive_fields={o: rfs[o] for o in outs if o in rfs},
            constant=is_const_node,
        ))
    # constants used directly as graph outputs count too
    for o in g.output:
        if o.name in const:
            frontier.add(o.name)
    total = sum(param_size(t) for t in frontier)
    return ModelSummary(
        inputs=tuple(summary(i.name) for i in g.input),
        outputs=tuple(summary(o.name) for o in g.output),
        opset=opset_version(model),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        ir_version=int(model.ir_version),
        parameter_count=int(total),
        nodes=tuple(nodes),
        fields_at=tuple(fields[1]),
        fields_note=untraced_reason(model, rfs, infos),
    )
