"""Request messages -> library arguments, library results -> response messages."""
from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument
from ..gen import vis_pb2
from ..graph.loading import TensorInfo
from ..graph.receptive_field import in_input_order
from ..methods.gradient import Objective
from ..models.inputs import InputRequest
from ..models.store import LoadedModel
from .shared_memory import SharedRegion
from .tensors import tensor_from_proto


def input_request(batch: vis_pb2.InputBatch, field: str = "input", region: SharedRegion | None = None) -> InputRequest:
    """`region`: the call's shared memory region, where tensors marked `in_shared_memory` lie."""
    tensors = {}
    for i, t in enumerate(batch.tensors):
        if t.name in tensors:
            raise InvalidArgument(f"{field}.tensors[{i}].name", f"input {t.name!r} given twice")
        tensors[t.name] = tensor_from_proto(t, f"{field}.tensors[{i}]", region)
    pre = batch.preprocess if batch.HasField("preprocess") else None
    return InputRequest(tensors, list(batch.images), pre)


def objective(target: vis_pb2.Target) -> Objective:
    kind = target.WhichOneof("kind") or "output"
    if kind == "output":
        return Objective("output", target.output.output, list(target.output.index))
    if kind == "channel":
        return Objective("channel", target.channel.layer, channel=list(target.channel.channel))
    if kind == "neuron":
        n = target.neuron
        return Objective("neuron", n.layer, channel=[n.channel], position=(n.y, n.x))
    t = target.tensor
    if not t.HasField("cotangent"):
        raise InvalidArgument("target.tensor.cotangent", "required")
    return Objective("tensor", t.layer, cotangent=tensor_from_proto(t.cotangent, "target.tensor.cotangent"))


def tensor_spec(info: TensorInfo) -> vis_pb2.TensorSpec:
    from ..datatypes import datatype_of

    spec = vis_pb2.TensorSpec(name=info.name)
    try:
        spec.datatype = datatype_of(info.dtype)
    except TypeError:   # a type no request can carry: still named as KServe would (STRING -> BYTES)
        dt = np.dtype(info.dtype)
        spec.datatype = "BYTES" if dt == np.dtype(object) else dt.name.upper()
    for d in info.shape or ():
        spec.shape.append(d if isinstance(d, int) else -1)
        # onnx shape inference's own symbols (unk__12) name nothing a user wrote: unnamed ("?")
        spec.dim_names.append("" if isinstance(d, int) or not d or d.startswith("unk__") else d)
    return spec


def model_info(model: LoadedModel, gradient_support: tuple[bool, str] | None = None) -> vis_pb2.ModelInfo:
    info = vis_pb2.ModelInfo(id=model.id, names=model.names, source=model.source, size_bytes=model.size_bytes,
                             config=model.config, num_labels=len(model.labels or []))
    for name in model.input_names:
        info.inputs.append(tensor_spec(model.infos[name]))
    for name in model.output_names:
        info.outputs.append(tensor_spec(model.infos[name]))
    if gradient_support is not None:
        info.gradients_supported, info.gradients_unsupported_reason = gradient_support
    return info


def labels_for(model: LoadedModel, indices: np.ndarray) -> list[str] | None:
    if not model.labels:
        return None
    return [model.label(int(i)) or "" for i in indices.reshape(-1)]


def inspect_response(model: LoadedModel, summary, info: vis_pb2.ModelInfo) -> vis_pb2.InspectResponse:
    resp = vis_pb2.InspectResponse(model=info, parameter_count=summary.parameter_count, opset=summary.opset,
                                   ir_version=summary.ir_version,
                                   producer=f"{summary.producer_name} {summary.producer_version}".strip(),
                                   receptive_fields_at=list(summary.fields_at),
                                   receptive_fields_note=summary.fields_note)
    for n in summary.nodes:
        node = resp.nodes.add(name=n.name, op_type=n.op_type, inputs=n.inputs, outputs=n.outputs,
                              parameter_count=n.parameter_count, constant=n.constant)
        for out in n.outputs:
            known = model.infos.get(out)
            node.output_specs.append(tensor_spec(known) if known else vis_pb2.TensorSpec(name=out))
        for tensor, rf in n.receptive_fields.items():
            rf = in_input_order(rf)   # rows and columns of the input, whatever the tensor's axis order
            node.receptive_fields[tensor].CopyFrom(vis_pb2.ReceptiveField(
                size_h=rf.size[0], size_w=rf.size[1], jump_h=rf.jump[0], jump_w=rf.jump[1],
                offset_h=rf.offset[0], offset_w=rf.offset[1], approximate=rf.approximate,
                **{"global": rf.is_global}))
    return resp
