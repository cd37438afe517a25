"""Parse, validate and normalize ONNX models before anything else touches them.

Every model the service holds goes through `prepare_model`: old IR versions are
raised (shape inference needs IR >= 4 to treat initializers as constants),
initializers are removed from `graph.input` (so only real inputs remain and ORT may
constant-fold weights), the batch dimension is made symbolic, and shapes are
inferred so that every intermediate tensor has a type and shape.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from ..errors import InvalidArgument

BATCH_DIM = "N"


@dataclass(frozen=True)
class ExternalData:
    """What a model read from files beside it."""
    size_bytes: int
    digest: bytes   # sha256 over the tensors' names and bytes; b"" when there were none


def parse_model(data: bytes, *, base_dir: Path | None = None, field: str = "model") -> onnx.ModelProto:
    """Deserialize model bytes; resolve external data only inside `base_dir`."""
    return parse_model_files(data, base_dir=base_dir, field=field)[0]


def parse_model_files(data: bytes, *, base_dir: Path | None = None,
                      field: str = "model") -> tuple[onnx.ModelProto, ExternalData]:
    """Deserialize model bytes and read their external data, only inside `base_dir`.

    External data that points outside `base_dir` (absolute paths, `..`, symlinks
    escaping it) is refused before any byte of it is read; so is any external data
    when `base_dir` is None (uploads). Subgraphs and sparse tensors are searched too.
    """
    if not data:
        raise InvalidArgument(field, "empty model bytes")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidArgument(field, f"not a valid ONNX protobuf ({type(exc).__name__}: {exc})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise InvalidArgument(field, "not an ONNX model: no graph or an empty graph")
    if len(model.graph.output) == 0:
        raise InvalidArgument(field, "ONNX graph has no outputs")
    return model, _load_external_data(model, base_dir, field)


def _graph_tensors(graph: onnx.GraphProto):
    """Every TensorProto a graph holds, subgraphs (If / Loop / Scan bodies) and sparse tensors included."""
    for t in graph.initializer:
        yield t
    for st in graph.sparse_initializer:
        yield st.values
        yield st.indices
    for node in graph.node:
        for a in node.attribute:
            yield from _attribute_tensors(a)


def _attribute_tensors(a: onnx.AttributeProto):
    tensors = [a.t] if a.HasField("t") else []
    tensors += list(a.tensors)
    for st in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
        tensors += [st.values, st.indices]
    yield from tensors
    for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
        yield from _graph_tensors(g)


def _external_tensors(model: onnx.ModelProto):
    for t in _graph_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t


def _load_external_data(model: onnx.ModelProto, base_dir: Path | None, field: str) -> ExternalData:
    """Read every external tensor into the model.

    Done here, not by onnxruntime: loaded from bytes, it would resolve relative locations
    against the server's working directory.
    """
    tensors = list(_external_tensors(model))
    if not tensors:
        return ExternalData(0, b"")
    if base_dir is None:
        raise InvalidArgument(field, "model uses external data, which is only allowed for models in the repository")
    root = Path(base_dir).resolve()
    total = 0
    digest = hashlib.sha256()
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or Path(loc).drive:
            raise InvalidArgument(field, f"external data location {loc!r} of tensor {t.name!r} must be a relative path inside the model directory")
        path = (root / loc).resolve()
        if root != path and root not in path.parents:
            raise InvalidArgument(field, f"external data location {loc!r} of tensor {t.name!r} points outside the model directory; refused")
        if not path.is_file():
            raise InvalidArgument(field, f"external data file {loc!r} of tensor {t.name!r} does not exist")
        try:
            offset = int(info.get("offset") or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise InvalidArgument(field, f"external data of tensor {t.name!r}: offset {info.get('offset')!r} and "
                                         f"length {info.get('length')!r} must be integers") from None
        size = path.stat().st_size
        end = size if length is None else offset + length
        if offset < 0 or (length is not None and length < 0) or end > size:
            raise InvalidArgument(field, f"external data of tensor {t.name!r}: bytes {offset}..{end} do not lie "
                                         f"inside {loc!r} ({size} bytes)")
        with open(path, "rb") as fh:
            fh.seek(offset)
            t.raw_data = fh.read(end - offset)
        total += end - offset
        digest.update(f"{t.name}\0{end - offset}\0".encode() + t.raw_data)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return ExternalData(total, digest.digest())


def prepare_model(model: onnx.ModelProto, *, symbolic_batch: bool = True, field: str = "model") -> onnx.ModelProto:
    """Return a normalized copy: IR raised, real inputs only, symbolic batch, shapes inferred."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if m.ir_version < 4:
        m.ir_version = 4
    init_names = {t.name for t in m.graph.initializer}
    real_inputs = [i for i in m.graph.input if i.name not in init_names]
    if len(real_inputs) != len(m.graph.input):
        del m.graph.input[:]
        m.graph.input.extend(real_inputs)
    if not real_inputs:
        raise InvalidArgument(field, "model has no inputs besides its initializers")
    if symbolic_batch:
        _make_batch_symbolic(m)
    m = _infer(m, field)
    # A freed Reshape can reveal the next hard-coded one downstream (ShuffleNet's
    # channel shuffle): repeat until nothing changes.
    for _ in range(32):
        if not (symbolic_batch and _free_hardcoded_batch_reshapes(m)):
            break
        _clear_inferred(m)
        m = _infer(m, field)
    return m


def _infer(m: onnx.ModelProto, field: str) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise InvalidArgument(field, f"shape inference failed: {exc}") from None


def _clear_inferred(m: onnx.ModelProto) -> None:
    """Forget inferred shapes (value_info and graph outputs) before re-inferring."""
    del m.graph.value_info[:]
    for vi in m.graph.output:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            rank = len(tt.shape.dim)
            tt.ClearField("shape")
            for _ in range(rank):
                tt.shape.dim.add()


def _make_batch_symbolic(m: onnx.ModelProto) -> None:
    """Inputs of rank >= 2 whose first dim is a fixed 1 get a symbolic batch dim.

    Outputs' fixed batch dims are cleared too (shape inference recomputes them).
    """
    changed = False
    for vi in m.graph.input:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) >= 2:
            d0 = tt.shape.dim[0]
            if d0.HasField("dim_value") and d0.dim_value == 1:
                d0.Clear()
                d0.dim_param = BATCH_DIM
                changed = True
            elif not d0.HasField("dim_value") and not d0.dim_param:
                d0.dim_param = BATCH_DIM
                changed = True
    if changed:
        _clear_inferred(m)


def _free_hardcoded_batch_reshapes(m: onnx.ModelProto) -> bool:
    """Reshape targets that hard-code batch 1 (exporters do this) become 0 = 'copy dim 0'.

    Only when the reshaped tensor's first dim is the symbolic batch, so the rewrite
    cannot change what the model computes at batch 1.
    """
    shapes = tensor_shapes(m)
    inits = {t.name: t for t in m.graph.initializer}
    changed = False
    for node in m.graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        src = shapes.get(node.input[0])
        if not src or src[0] != BATCH_DIM:
            continue
        if len(node.input) > 1 and node.input[1] in inits:
            t = inits[node.input[1]]
            arr = numpy_helper.to_array(t)
            if arr.ndim == 1 and arr.size >= 1 and arr[0] == 1:
                allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
                if allowzero:
                    continue
                arr = arr.copy()
                arr[0] = 0
                # the initializer may be shared with other nodes: give this one its own
                new = numpy_helper.from_array(arr.astype(np.int64), name=f"{t.name}__batch_{node.output[0]}")
                m.graph.initializer.append(new)
                inits[new.name] = new
                node.input[1] = new.name
                changed = True
        else:
            for a in node.attribute:
                if a.name == "shape" and len(a.ints) >= 1 and a.ints[0] == 1:
                    a.ints[0] = 0
                    changed = True
    return changed


@dataclass(frozen=True)
class TensorInfo:
    name: str
    elem_type: int            # onnx.TensorProto data type
    shape: tuple | None       # ints, dim_param strings or None per dim; None if rank unknown

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))


def _shape_of(vi: onnx.ValueInfoProto):
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def tensor_infos(m: onnx.ModelProto) -> dict[str, TensorInfo]:
    """name -> TensorInfo for inputs, outputs, value_info and initializers."""
    out: dict[str, TensorInfo] = {}
    for t in m.graph.initializer:
        out[t.name] = TensorInfo(t.name, t.data_type, tuple(int(d) for d in t.dims))
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = TensorInfo(vi.name, vi.type.tensor_type.elem_type, _shape_of(vi))
    return out


def tensor_shapes(m: onnx.ModelProto) -> dict[str, tuple | None]:
    return {k: v.shape for k, v in tensor_infos(m).items()}


def opset_version(m: onnx.ModelProto) -> int:
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1
