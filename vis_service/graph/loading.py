"""Parse, validate and normalize ONNX models before anything else touches them.

Every model the service holds goes through `prepare_model`: old IR versions are
raised (shape inference needs IR >= 4 to treat initializers as constants),
initializers are removed from `graph.input` (so only real inputs remain and ORT may
constant-fold weights), the batch dimension is made symbolic, and shapes are
inferred so that every intermediate tensor has a type and shape.

Exporters leave constants computed at run time (TorchScript's pads for F.pad, torch.chunk's
split points from Shape): those nodes become Constant nodes in place (`constants.fold_constants`;
integer results, small float Resize parameters), so shape inference sees static shapes. A model
exported at batch 1 hard-codes that batch (Reshape targets [1, ...], Resize sizes [1, C, H, W]):
those are freed where the reshaped tensor's dim 0 is the symbolic batch, which gives the same
result at batch 1 and the per-image results at any other; where a batch cannot be freed (it is
mixed, selected or dropped), the input keeps its batch of 1.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from ..errors import InvalidArgument, ResourceExhausted
from .constants import KnownValues, _subgraph_outer_names, fold_constants, known_values

log = logging.getLogger(__name__)

BATCH_DIM = "N"


@dataclass(frozen=True)
class ExternalData:
    """What a model read from files beside it."""
    size_bytes: int
    digest: bytes   # sha256 over the tensors' names and bytes; b"" when there were none


def parse_model(data: bytes, *, base_dir: Path | None = None, field: str = "model") -> onnx.ModelProto:
    """Deserialize model bytes; resolve external data only inside `base_dir`."""
    return parse_model_files(data, base_dir=base_dir, field=field)[0]


def parse_model_files(data: bytes, *, base_dir: Path | None = None, field: str = "model",
                      max_model_bytes: int | None = None) -> tuple[onnx.ModelProto, ExternalData]:
    """Deserialize model bytes and read their external data, only inside `base_dir`.

    External data that points outside `base_dir` (absolute paths, `..`, symlinks
    escaping it) is refused before any byte of it is read; so is any external data
    when `base_dir` is None (uploads). Subgraphs and sparse tensors are searched too. A model whose
    bytes and external data add up to more than `max_model_bytes` is RESOURCE_EXHAUSTED before any
    of its external data is read.
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
    budget = None if max_model_bytes is None else max_model_bytes - len(data)
    return model, _load_external_data(model, base_dir, field, budget)


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


def _load_external_data(model: onnx.ModelProto, base_dir: Path | None, field: str,
                        max_bytes: int | None = None) -> ExternalData:
    """Read every external tensor into the model, once every location and byte range is checked
    and their sum is within `max_bytes` (a 3 GiB sparse file was read whole before the model's size
    limit refused it; fifteen tensors naming one 200 MiB range, 3 GB).

    Done here, not by onnxruntime: loaded from bytes, it would resolve relative locations
    against the server's working directory.
    """
    tensors = list(_external_tensors(model))
    if not tensors:
        return ExternalData(0, b"")
    if base_dir is None:
        raise InvalidArgument(field, "model uses external data, which is only allowed for models in the repository")
    root = Path(base_dir).resolve()
    ranges = []
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
        if offset < 0 or offset > size or (length is not None and length < 0) or end > size:
            raise InvalidArgument(field, f"external data of tensor {t.name!r}: bytes {offset}..{end} do not lie "
                                         f"inside {loc!r} ({size} bytes)")
        ranges.append((t, path, offset, end))
    total = sum(end - offset for _, _, offset, end in ranges)
    if max_bytes is not None and total > max_bytes:
        raise ResourceExhausted(f"{field}: its external data of {total} bytes exceeds the {max_bytes} bytes the model "
                                "size limit leaves beside the model file")
    digest = hashlib.sha256()
    for t, path, offset, end in ranges:
        with open(path, "rb") as fh:
            fh.seek(offset)
            t.raw_data = fh.read(end - offset)
        digest.update(f"{t.name}\0{end - offset}\0".encode() + t.raw_data)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return ExternalData(total, digest.digest())


def prepare_model(model: onnx.ModelProto, *, symbolic_batch: bool = True, field: str = "model") -> onnx.ModelProto:
    """Return a normalized copy: IR raised, real inputs only, symbolic batch, shapes inferred.

    Exporters leave run-time computations of constants (TorchScript's pads, torch.chunk's split
    points) that ONNX shape inference cannot see through: those are folded into Constant nodes
    (`constants.fold_constants`), so every shape they decide is static. A model exported at
    batch 1 gets the symbolic batch `N` where its hard-coded batch can be freed (Reshape targets,
    Resize sizes: `_free_hardcoded_batch`); where a batch-1 input's batch cannot be freed (a
    construct that mixes or drops the batch, see `_batch_left_hardcoded`), the input keeps its
    fixed batch 1, so that it runs as exported instead of failing at a larger batch.
    """
    m = _real_inputs_copy(model, field)
    freed = _make_batch_symbolic(m) if symbolic_batch else []
    prepared = _normalize(m, field, free=symbolic_batch)
    if freed and _batch_left_hardcoded(prepared, _batch_symbols(prepared)):
        m = _real_inputs_copy(model, field)
        _make_batch_symbolic(m, free_ones=False)
        prepared = _normalize(m, field, free=False)
    return prepared


def free_input_axes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Input name -> the axes of its shape that are free (symbolic or unknown), the batch excepted
    (dim 0 of an input of rank >= 2 named by a batch symbol): a network whose image size is free
    has its height and width here."""
    batch = _batch_symbols(model)
    out = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tt.shape.dim
        axes = tuple(k for k, d in enumerate(dims) if not d.HasField("dim_value")
                     and not (k == 0 and len(dims) >= 2 and d.dim_param in batch))
        if axes:
            out[vi.name] = axes
    return out


def with_static_sizes(model: onnx.ModelProto, sizes: dict[str, dict[int, int]], field: str = "input", *,
                      refuse_empty: bool = True) -> onnx.ModelProto:
    """A copy of a prepared model whose inputs' free axes take the given sizes ({input: {axis: size}}),
    shapes inferred again and what they decide folded (`_normalize`); the batch stays free.

    Why: the backward rules need static spatial sizes (a pooling window's input size, a strided
    Conv's output padding, a Slice's range), which a network exported with a free image size
    lacks; specialized to the size of the images it is run on, its gradient can be built, once
    per size. Sizes that do not fit the graph are the request's (INVALID_ARGUMENT on `field`), also
    sizes too small for it (`refuse_empty`: an empty feature map, see too_small).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    changed = False
    for vi in m.graph.input:
        given = sizes.get(vi.name)
        if not given or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        for axis, size in given.items():
            if 0 <= axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].Clear()
                dims[axis].dim_value = int(size)
                changed = True
    if not changed:
        return model
    _clear_inferred(m)
    m = _normalize(m, field, free=True)
    why = too_small(m, sizes) if refuse_empty else ""
    if why:
        raise InvalidArgument(field, why)
    return m


def shapes_at(model: onnx.ModelProto, sizes: dict[str, dict[int, int]], field: str = "input") -> onnx.ModelProto:
    """The weightless graph (initializers of more than 64 Ki elements keep name, type and shape only)
    with the inputs' free axes at `sizes`, shapes inferred: what planning reads where a size decides
    (a SAME pad's split, a window's reach), without copying the weights."""
    from .weights import structure_only

    return with_static_sizes(structure_only(model, keep=1 << 16), sizes, field, refuse_empty=False)


def too_small(specialized: onnx.ModelProto, sizes: dict[str, dict[int, int]]) -> str:
    """Why inputs of `sizes` are too small for the model `specialized` to them ("" if they are not)."""
    empty = empty_feature_map(specialized)
    if empty is None:
        return ""
    at = ", ".join(f"{vi.name!r} of shape {list(_shape_of(vi))}" for vi in specialized.graph.input if vi.name in sizes)
    return (f"the input is too small for the model: with {at}, tensor {empty[0]!r} would have shape "
            f"{list(empty[1])}; send larger images")


def empty_feature_map(model: onnx.ModelProto) -> tuple[str, tuple] | None:
    """(name, shape) of the first float tensor of rank >= 3 whose inferred size along a spatial axis
    (2 and on) is 0 or less, else None: a window or stride larger than what is left of an image too
    small for the network. onnxruntime's optimized kernels divide by such sizes (a ceil-mode MaxPool
    giving 0 x 0, then a pooling: SIGFPE, the whole server process gone)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    for vi in list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if tt.elem_type not in floats or not tt.HasField("shape") or len(tt.shape.dim) < 3:
            continue
        if any(d.HasField("dim_value") and d.dim_value <= 0 for d in tt.shape.dim[2:]):
            return vi.name, _shape_of(vi)
    return None


def _real_inputs_copy(model: onnx.ModelProto, field: str) -> onnx.ModelProto:
    """A copy with IR >= 4 and the initializers out of graph.input."""
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
    return m


def _normalize(m: onnx.ModelProto, field: str, *, free: bool) -> onnx.ModelProto:
    """Infer shapes; fold constants and free hard-coded batches until nothing changes."""
    m = infer(m, field)
    if _cast_likes_to_casts(m):
        m = infer(m, field)
    batch = _batch_symbols(m)
    _recover_batch_symbols(m, batch)
    # A freed Reshape can reveal the next hard-coded one downstream (ShuffleNet's channel
    # shuffle), a folded value the next foldable node: repeat until nothing changes.
    for _ in range(32):
        shapes = tensor_shapes(m)
        known = known_values(m, shapes, _batch_dependent(m, batch) if free else set())
        changed = fold_constants(m, known)
        changed |= _inline_constant_ifs(m, known)
        changed |= _rewrite_shape_targets(m, known, shapes)
        if free:
            changed |= _free_hardcoded_batch(m, known, shapes, batch)
            changed |= _free_flat_gathers(m, known, shapes, batch)
        if not changed:
            break
        _clear_inferred(m)
        m = infer(m, field)
        _recover_batch_symbols(m, batch)
    return m


def _cast_likes_to_casts(m: onnx.ModelProto) -> bool:
    """CastLike(x, like) becomes Cast(x, to=like's type), where that type is known; True if any did.

    CastLike reads `like` for its type alone, but as an input it made its result depend on `like`:
    torch.onnx's dynamo exporter (optimize=False) writes a bias-free Conv's zero bias as
    Expand(CastLike(0.0, input), [C]), so the bias looked computed from the image (no backward rule,
    and a scalar made from a batch tensor kept the batch at 1)."""
    types = {t.name: t.data_type for t in m.graph.initializer}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in m.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
    changed = False
    for node in m.graph.node:
        if node.op_type != "CastLike" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        to = types.get(node.input[1])
        if not to:
            continue
        node.op_type = "Cast"
        del node.input[1:]
        node.attribute.append(onnx.helper.make_attribute("to", int(to)))
        changed = True
    return changed


# standard ops whose output has their input's shape, which ONNX inference leaves shapeless (it types
# them only): every tensor downstream would have an unknown rank
_SHAPE_KEEPING_UNINFERRED = frozenset({"MeanVarianceNormalization", "GroupNormalization"})


def infer(m: onnx.ModelProto, field: str = "model") -> onnx.ModelProto:
    """A copy of `m` with shapes inferred. Inference runs on the weightless graph (what it reads of a
    large initializer is its type and shape; small ones, the shape constants, keep their values):
    it serializes the model it is given, weights and all, and prepare_model infers once per folding
    round (a TorchScript Swin: 19 rounds, 11 s with the weights)."""
    from .weights import structure_only

    try:
        light = structure_only(m, keep=1 << 16)
        data_prop = _data_propagation_bounded(light)
        inferred = shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=data_prop)
        for _ in range(32):   # each given shape can let inference reach the next gap
            if not _complete_shapes(inferred):
                break
            inferred = shape_inference.infer_shapes(inferred, check_type=False, strict_mode=False,
                                                    data_prop=data_prop)
    except Exception as exc:
        raise InvalidArgument(field, f"shape inference failed: {exc}") from None
    out = onnx.ModelProto()
    out.CopyFrom(m)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


# ONNX's data propagation keeps the values of every 1-D tensor it can compute (shape vectors, but
# also any other), each element a TensorShapeProto dim of ~150 bytes
DATA_PROPAGATION_MAX_ELEMENTS = 1 << 16


def _data_propagation_bounded(m: onnx.ModelProto) -> bool:
    """Whether inference with data propagation is safe for `m`: no 0-D / 1-D tensor of more than
    DATA_PROPAGATION_MAX_ELEMENTS elements, by a plain inference first. A 2 KB upload doubling a
    one-element constant by Concat 34 times took the server past its memory in that propagation
    (4 M elements already took 0.6 GB); without it such a model loads, with fewer shapes known."""
    plain = shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=False)
    for vi in list(plain.graph.value_info) + list(plain.graph.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else None
        if dims is not None and len(dims) == 1 and dims[0].HasField("dim_value") \
                and dims[0].dim_value > DATA_PROPAGATION_MAX_ELEMENTS:
            log.info("shape inference without data propagation: tensor %r has %d elements", vi.name,
                     dims[0].dim_value)
            return False
    return True


def _complete_shapes(m: onnx.ModelProto) -> bool:
    """Shapes ONNX inference leaves out although they are known; True if any was given.

    The outputs of _SHAPE_KEEPING_UNINFERRED nodes get their input's shape; a Resize with sizes
    computed from shapes (TorchScript's F.interpolate(size=...) at opset 11: Concat(Shape(x)[:2],
    [H, W]), which Resize-11's inference does not read) gets those sizes, symbols included.
    """
    infos = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}

    def complete(vi) -> bool:
        return vi is not None and vi.type.tensor_type.HasField("shape") and all(
            d.HasField("dim_value") or d.dim_param for d in vi.type.tensor_type.shape.dim)

    def give(out: str, elem_type: int, dims: list) -> None:
        target = infos.get(out)
        if target is None:
            target = m.graph.value_info.add()
            target.name = out
            infos[out] = target
        target.type.tensor_type.elem_type = elem_type
        shape = target.type.tensor_type.shape
        shape.ClearField("dim")
        for d in dims:
            if isinstance(d, str):
                shape.dim.add().dim_param = d
            else:
                shape.dim.add().dim_value = int(d)

    def dims_of(vi) -> list:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    weights = {t.name: t for t in m.graph.initializer}

    def rank_known(vi) -> bool:
        return vi is not None and vi.type.tensor_type.HasField("shape")

    given = False
    known = None
    for node in m.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output or not node.input:
            continue
        source, out = infos.get(node.input[0]), infos.get(node.output[0])
        if node.op_type in _SHAPE_KEEPING_UNINFERRED and complete(source) and not complete(out):
            give(node.output[0], source.type.tensor_type.elem_type, dims_of(source))
            given = True
        elif node.op_type == "Expand" and len(node.input) > 1 and (complete(source) or node.input[0] in weights):
            # a target known partly before run time (torch's expand(B, -1, -1) under the TorchScript
            # exporter: [batch, 1, 1]), which inference does not read: numpy broadcasting of the two
            if known is None:
                known = known_values(m, tensor_shapes(m))
            target = known.elements(node.input[1])
            if target is None or any(e is None for e in target):
                continue
            if node.input[0] in weights:   # a weight (a ViT's class token), not in value_info
                dims, elem_type = list(weights[node.input[0]].dims), weights[node.input[0]].data_type
            else:
                dims, elem_type = dims_of(source), source.type.tensor_type.elem_type
            rank = max(len(dims), len(target))
            dims, target = [1] * (rank - len(dims)) + dims, [1] * (rank - len(target)) + target
            shape = [t if d == 1 else d if t == 1 or t == d else None for d, t in zip(dims, target)]
            if any(d is None or d == 0 for d in shape) or (out is not None and rank_known(out) and dims_of(out) == shape):
                continue
            give(node.output[0], elem_type, shape)
            given = True
        elif (node.op_type == "Reshape" and len(node.input) > 1 and source is not None and not rank_known(out)
              and source.type.tensor_type.elem_type):
            # a target shape computed at run time: opset-13 inference gives no rank (tf2onnx's Keras
            # LayerNormalization), though the target's length is the rank; the elements known
            # before run time are sizes too, the others fresh symbols
            target = infos.get(node.input[1])
            if not complete(target) or len(target.type.tensor_type.shape.dim) != 1:
                continue
            length = target.type.tensor_type.shape.dim[0].dim_value
            if not length:
                continue
            if known is None:
                known = known_values(m, tensor_shapes(m))
            elements = known.elements(node.input[1]) or [None] * length
            source_dims = dims_of(source) if complete(source) else []
            dims = []
            for i, e in enumerate(elements):
                if isinstance(e, str) or (isinstance(e, int) and e > 0):
                    dims.append(e)
                elif e == 0 and i < len(source_dims) and not _attr(node, "allowzero", 0):
                    dims.append(source_dims[i])
                else:
                    dims.append(f"{node.output[0]}_dim{i}")
            give(node.output[0], source.type.tensor_type.elem_type, dims)
            given = True
        elif node.op_type == "Resize" and len(node.input) > 3 and node.input[3] and source is not None:
            if known is None:
                known = known_values(m, tensor_shapes(m))
            # sizes computed from shapes only (constant sizes inference reads itself, and a batch
            # of 1 in them is freed later); inference may have named the dims afresh (unk__3)
            sizes = known.elements(node.input[3]) if node.input[3] in known.partial else None
            if (sizes and all(isinstance(d, str) or (isinstance(d, int) and d >= 0) for d in sizes)
                    and (out is None or not out.type.tensor_type.HasField("shape") or dims_of(out) != sizes)):
                give(node.output[0], source.type.tensor_type.elem_type, sizes)
                given = True
    return given


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


def _make_batch_symbolic(m: onnx.ModelProto, *, free_ones: bool = True) -> list[str]:
    """Inputs of rank >= 2 whose first dim is a fixed 1 (`free_ones`) or unknown get a symbolic batch dim.

    Outputs' fixed batch dims are cleared too (shape inference recomputes them). Returns the
    inputs whose fixed 1 became symbolic.
    """
    changed, freed = False, []
    for vi in m.graph.input:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) >= 2:
            d0 = tt.shape.dim[0]
            if d0.HasField("dim_value") and d0.dim_value == 1 and free_ones:
                d0.Clear()
                d0.dim_param = BATCH_DIM
                changed = True
                freed.append(vi.name)
            elif not d0.HasField("dim_value") and not d0.dim_param:
                d0.dim_param = BATCH_DIM
                changed = True
    if changed:
        _clear_inferred(m)
    return freed


def _batch_symbols(m: onnx.ModelProto) -> set[str]:
    """The dim symbols of the inputs' batch dims (dim 0 of inputs of rank >= 2)."""
    out = set()
    for vi in m.graph.input:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) >= 2 and tt.shape.dim[0].dim_param:
            out.add(tt.shape.dim[0].dim_param)
    return out


def _batch_dependent(m: onnx.ModelProto, batch: set[str]) -> set[str]:
    """Tensors computed from an input with a symbolic batch dim."""
    deps = set()
    for vi in m.graph.input:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) >= 2 and tt.shape.dim[0].dim_param in batch:
            deps.add(vi.name)
    for node in m.graph.node:
        if any(i in deps for i in node.input) or any(i in deps for i in _subgraph_outer_names(node)):
            deps.update(o for o in node.output if o)
    return deps


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value) -> None:
    for k, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[k]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _new_initializer(m: onnx.ModelProto, value: np.ndarray, base: str) -> str:
    taken = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output} | \
        {i.name for i in m.graph.input}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    m.graph.initializer.append(numpy_helper.from_array(np.array(value), name))
    return name


def _keeps_batch(node: onnx.NodeProto, known: KnownValues, shapes: dict, b: str) -> bool:
    """True if the node's first output provably has its first input's dim 0 (the batch `b`)
    where ONNX shape inference names it afresh (Resize with scales, Tile, ...)."""
    op, inp = node.op_type, list(node.input)
    rank = len(shapes.get(inp[0]) or ())

    def value(k):
        return known.elements(inp[k]) if len(inp) > k and inp[k] else None

    def axis0(axes):
        return any(int(a) in (0, -rank) for a in axes)

    if op in ("Resize", "Upsample"):
        axes = _attr(node, "axes")
        if axes is not None and not axis0(axes):
            return True
        if op == "Upsample" and _attr(node, "scales") is not None:
            return float(_attr(node, "scales")[0]) == 1.0
        scales_at = 1 if op == "Upsample" or len(inp) == 2 else 2
        if len(inp) > 3 and inp[3] and axes is None:
            sizes = value(3)
            return bool(sizes) and sizes[0] == b
        scales = known.value(inp[scales_at]) if len(inp) > scales_at and inp[scales_at] else None
        return scales is not None and scales.size == rank and axes is None and float(scales.reshape(-1)[0]) == 1.0
    if op == "Tile":
        reps = value(1)
        return bool(reps) and reps[0] == 1
    if op == "Pad":
        pads = value(1) if len(inp) > 1 else list(_attr(node, "pads", []) or [])
        if not pads:
            return False
        axes = value(3) if len(inp) > 3 and inp[3] else list(range(rank))
        if axes is None or len(pads) != 2 * len(axes):
            return False
        return all(pads[k] == 0 and pads[k + len(axes)] == 0 for k, a in enumerate(axes) if int(a) in (0, -rank))
    if op == "Slice":
        if len(inp) < 3:
            axes = _attr(node, "axes", list(range(len(_attr(node, "starts", [])))))
            starts, ends, steps = _attr(node, "starts", []), _attr(node, "ends", []), None
        else:
            starts, ends = value(1), value(2)
            axes = value(3) if len(inp) > 3 and inp[3] else (list(range(len(starts))) if starts else None)
            steps = value(4) if len(inp) > 4 and inp[4] else None
        if starts is None or ends is None or axes is None:
            return False
        for k, a in enumerate(axes):
            if int(a) in (0, -rank):
                step = steps[k] if steps else 1
                if not (step == 1 and starts[k] in (0, -(2 ** 63)) and (ends[k] == b or (isinstance(ends[k], int) and ends[k] >= 2 ** 31 - 1))):
                    return False
        return True
    if op == "Expand":
        shape = value(1)
        return shape is not None and (len(shape) < rank or (len(shape) == rank and shape[0] in (1, b)))
    if op == "Reshape":
        target = value(1)
        return bool(target) and (target[0] == b or (target[0] == 0 and not _attr(node, "allowzero", 0)))
    return False


def _recover_batch_symbols(m: onnx.ModelProto, batch: set[str]) -> None:
    """Give the batch symbol back to dims that ONNX inference names afresh though they are the batch
    (a Resize with scales, a Tile: `unk__0`), renaming that symbol everywhere."""
    if not batch:
        return
    shapes = tensor_shapes(m)
    protected = set(batch)
    for vi in m.graph.input:
        if vi.type.tensor_type.HasField("shape"):
            protected.update(d.dim_param for d in vi.type.tensor_type.shape.dim if d.dim_param)
    known = None
    rename: dict[str, str] = {}

    def dim0(name):
        shape = shapes.get(name)
        if not shape:
            return None
        return rename.get(shape[0], shape[0]) if isinstance(shape[0], str) else shape[0]

    for node in m.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.input or not node.output or not node.output[0]:
            continue
        b = dim0(node.input[0])
        d = dim0(node.output[0])
        if not (isinstance(b, str) and b in batch) or not isinstance(d, str) or d == b or d in protected:
            continue
        if known is None:
            known = known_values(m, shapes)
        if _keeps_batch(node, known, shapes, b):
            rename[d] = b
    if not rename:
        return
    for vi in list(m.graph.value_info) + list(m.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for dim in vi.type.tensor_type.shape.dim:
                if dim.dim_param in rename:
                    dim.dim_param = rename[dim.dim_param]


def _rewrite_shape_targets(m: onnx.ModelProto, known: KnownValues, shapes: dict) -> bool:
    """Reshape targets computed from shapes where a dim is a symbol (the batch): where each such
    entry is the reshaped tensor's own dim at the same place, the target becomes a constant with 0
    ('copy this dim') there, which shape inference sees through (torch.repeat_interleave,
    TorchScript views of x.size(0))."""
    changed = False
    for node in m.graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        part = known.partial.get(node.input[1])
        src = shapes.get(node.input[0])
        if part is None or part[1] != 1 or src is None:
            continue
        target = []
        for k, e in enumerate(part[0]):
            if isinstance(e, int):
                target.append(e)
            elif isinstance(e, str) and k < len(src) and src[k] == e:
                target.append(0)
            else:
                break
        else:
            allowzero = _attr(node, "allowzero", 0)
            literal = [e for e in part[0] if isinstance(e, int)]
            if allowzero and 0 in literal:
                continue
            if allowzero:
                _set_attr(node, "allowzero", 0)
            node.input[1] = _new_initializer(m, np.array(target, np.int64), f"{node.input[1]}__static")
            changed = True
    return changed


def _free_hardcoded_batch(m: onnx.ModelProto, known: KnownValues, shapes: dict, batch: set[str]) -> bool:
    """Constant Reshape targets and Resize sizes that hard-code batch 1 (exporters do this) on a
    tensor whose dim 0 is the symbolic batch: the target's 1 becomes 0 = 'copy dim 0', a target
    [-1, rest] whose rest is one sample becomes [0, rest]; the sizes leave the batch axis out.

    At batch 1 the rewritten node computes exactly what it did.
    """
    changed = False
    opset = opset_version(m)
    for node in list(m.graph.node):
        if node.domain not in ("", "ai.onnx") or not node.input:
            continue
        src = shapes.get(node.input[0])
        if not src or not (isinstance(src[0], str) and src[0] in batch):
            continue
        if node.op_type == "Reshape" and len(node.input) > 1:
            target = known.value(node.input[1])
            if target is None or target.ndim != 1 or target.size < 1 or target.dtype.kind not in "iu":
                continue
            allowzero = bool(_attr(node, "allowzero", 0))
            rest = [int(e) for e in target[1:]]
            if allowzero and 0 in rest:
                continue
            if int(target[0]) == 1:
                pass
            elif int(target[0]) == -1 and -1 not in rest and all(isinstance(d, int) for d in src[1:]):
                sample = int(np.prod(src[1:], dtype=np.int64))
                dims = [src[k + 1] if e == 0 and k + 1 < len(src) else e for k, e in enumerate(rest)]
                if any(not isinstance(d, int) for d in dims) or int(np.prod(dims, dtype=np.int64)) != sample:
                    continue
            else:
                continue
            if allowzero:
                _set_attr(node, "allowzero", 0)
            new = np.array([0] + rest, np.int64)
            node.input[1] = _new_initializer(m, new, f"{node.input[1]}__batch_{node.output[0]}")
            changed = True
        elif node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
            sizes = known.value(node.input[3])
            if sizes is None or sizes.ndim != 1 or sizes.size != len(src) or int(sizes[0]) != 1:
                continue
            if _attr(node, "axes") is not None:
                continue
            if opset >= 18:
                _set_attr(node, "axes", list(range(1, len(src))))
                node.input[3] = _new_initializer(m, sizes[1:].astype(np.int64), f"{node.input[3]}__spatial_{node.output[0]}")
            else:
                node.input[3] = _batch_from_shape(m, node, sizes, opset)
            changed = True
    return changed



def _free_flat_gathers(m: onnx.ModelProto, known: KnownValues, shapes: dict, batch: set[str]) -> bool:
    """Gather(Reshape(x, [-1]), arange(k).reshape([1, ...])), where x is [batch, ...] with k elements
    per image, becomes Reshape(x, [0, ...]): torch's as_strided as the dynamo exporter writes it
    (ConvNeXt's pooled channels-last view). At batch 1 the gather reads every element of x in
    order; at a larger batch it read the first image's only, so the batch was kept at 1."""
    changed = False
    flats = []
    producer = {o: n for n in m.graph.node for o in n.output}
    for node in list(m.graph.node):
        if (node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) != 2
                or _attr(node, "axis", 0) != 0):
            continue
        flat = producer.get(node.input[0])
        if flat is None or flat.op_type != "Reshape" or len(flat.input) < 2:
            continue
        target, idx = known.value(flat.input[1]), known.value(node.input[1])
        src = shapes.get(flat.input[0])
        if (target is None or target.tolist() != [-1] or idx is None or idx.dtype.kind not in "iu" or idx.ndim < 1
                or idx.shape[0] != 1 or not src or not (isinstance(src[0], str) and src[0] in batch)
                or not all(isinstance(d, int) for d in src[1:])):
            continue
        per_image = int(np.prod(src[1:], dtype=np.int64))
        if idx.size != per_image or not np.array_equal(idx.reshape(-1), np.arange(per_image)):
            continue
        node.op_type = "Reshape"
        node.input[0] = flat.input[0]
        node.input[1] = _new_initializer(m, np.array([0] + list(idx.shape[1:]), np.int64),
                                         f"{node.input[1]}__per_image_{node.output[0]}")
        del node.attribute[:]
        flats.append(flat)
        changed = True
    outputs = {o.name for o in m.graph.output}
    for flat in flats:   # read by nothing now (it merged the batch axis): removed
        if flat in m.graph.node and flat.output[0] not in outputs and \
                not any(flat.output[0] in n.input for n in m.graph.node):
            m.graph.node.remove(flat)
    return changed


def _batch_from_shape(m: onnx.ModelProto, node: onnx.NodeProto, sizes: np.ndarray, opset: int) -> str:
    """Insert nodes computing Concat(Shape(x)[0:1], sizes[1:]) before `node`; the result's name."""
    idx = next(k for k, n in enumerate(m.graph.node) if n is node)
    base = node.name or node.output[0]
    rest = _new_initializer(m, sizes[1:].astype(np.int64), f"{base}/batch_sizes_rest")
    batch = f"{base}/batch_sizes_batch"
    if opset >= 15:
        new = [onnx.helper.make_node("Shape", [node.input[0]], [batch], name=f"{base}/batch_sizes_shape", start=0, end=1)]
    else:
        shape = f"{base}/batch_sizes_shape"
        zero = _new_initializer(m, np.array([0], np.int64), f"{base}/batch_sizes_zero")
        one = _new_initializer(m, np.array([1], np.int64), f"{base}/batch_sizes_one")
        new = [onnx.helper.make_node("Shape", [node.input[0]], [shape], name=shape),
               onnx.helper.make_node("Slice", [shape, zero, one, zero], [batch], name=f"{base}/batch_sizes_slice")]
    out = f"{base}/batch_sizes"
    new.append(onnx.helper.make_node("Concat", [batch, rest], [out], name=out, axis=0))
    for k, n in enumerate(new):
        m.graph.node.insert(idx + k, n)
    return out


def _inline_constant_ifs(m: onnx.ModelProto, known: KnownValues) -> bool:
    """An If whose condition is known (TorchScript's squeeze of a dim known to be 1) becomes, in
    place, the one node its taken branch computes (or an Identity), keeping its name and output."""
    changed = False
    for node in m.graph.node:
        if node.op_type != "If" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        cond = known.value(node.input[0])
        if cond is None or cond.size != 1:
            continue
        branch = _attr(node, "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
        if branch is None or len(branch.output) != 1 or branch.sparse_initializer:
            continue
        constants = [n for n in branch.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")]
        compute = [n for n in branch.node if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx"))]
        result = branch.output[0].name
        if len(compute) > 1 or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                   for n in compute for a in n.attribute):
            continue
        if compute and list(compute[0].output) != [result]:
            continue
        values = {}
        for c in constants:
            v = _attr(c, "value")
            if not isinstance(v, onnx.TensorProto) or len(c.output) != 1:
                values = None
                break
            values[c.output[0]] = numpy_helper.to_array(v)
        if values is None:
            continue
        for t in branch.initializer:
            values[t.name] = numpy_helper.to_array(t)
        renamed = {k: _new_initializer(m, v, f"{node.output[0]}__{k}") for k, v in values.items()}
        if compute:
            inner = compute[0]
            op_type, domain, inputs = inner.op_type, inner.domain, [renamed.get(i, i) for i in inner.input]
            attributes = list(inner.attribute)
        else:
            op_type, domain, inputs, attributes = "Identity", "", [renamed.get(result, result)], []
        del node.input[:]
        node.input.extend(inputs)
        del node.attribute[:]
        node.attribute.extend(attributes)
        node.op_type, node.domain = op_type, domain
        changed = True
    return changed


# ops whose output's dim 0 is not their input's dim 0 by design
_BATCH_MOVING_OPS = frozenset({"Shape", "Size", "NonZero", "If", "Loop", "Scan", "Einsum", "SequenceConstruct",
                               "SplitToSequence", "ConcatFromSequence"})


def _mixes_batch(node: onnx.NodeProto, rank: int, ints, opset: int) -> bool:
    """True for ops that combine or reorder the images of a batch while keeping its size (the
    other batch-mixing constructs change the batch dim's size, which the caller sees): a softmax
    or normalization over the batch axis, a running sum along it, a Slice that reverses or
    shifts it. At batch 1 such an op gives what the exporter saw; at a larger batch each image's
    result would depend on the others. Unknown axes count as the batch axis."""
    op = node.op_type

    def batch_axis(axis) -> bool:
        return axis is None or int(axis) in (0, -rank)

    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        # before opset 13 the op works on [prod(dims[:axis]), prod(dims[axis:])] (default axis 1)
        return batch_axis(_attr(node, "axis", -1 if opset >= 13 else 1))
    if op in ("LpNormalization", "LayerNormalization", "RMSNormalization"):   # Layer/RMS: axis..end
        return batch_axis(_attr(node, "axis", -1))
    if op == "MeanVarianceNormalization":
        return any(batch_axis(a) for a in _attr(node, "axes", [0, 2, 3]))
    if op == "CumSum":
        axis = ints(node.input[1]) if len(node.input) > 1 else None
        return batch_axis(axis[0] if axis else None)
    if op == "BatchNormalization":
        return bool(_attr(node, "training_mode", 0))
    if op == "Slice":
        if len(node.input) < 3:   # opset < 10: attributes, no steps
            starts, ends = _attr(node, "starts", []), _attr(node, "ends", [])
            axes, steps = _attr(node, "axes", list(range(len(starts)))), [1] * len(starts)
        else:
            starts, ends = ints(node.input[1]), ints(node.input[2])
            axes = ints(node.input[3]) if len(node.input) > 3 and node.input[3] else (
                list(range(len(starts))) if starts is not None else None)
            steps = ints(node.input[4]) if len(node.input) > 4 and node.input[4] else (
                [1] * len(starts) if starts is not None else None)
        if starts is None or ends is None or axes is None or steps is None:
            return True
        # a slice of the batch that keeps its size is the whole batch, in order
        return any(batch_axis(a) and not (st == 1 and s in (0, -(2 ** 63)) and e >= 2 ** 31 - 1)
                   for a, s, e, st in zip(axes, starts, ends, steps))
    return False


def _batch_left_hardcoded(m: onnx.ModelProto, batch: set[str]) -> str | None:
    """Why the batch of this model cannot be freed, or None: a node that turns a tensor whose dim
    0 is the symbolic batch into one with a fixed dim 0 or rank 0 (a Reshape to [1, ...] that
    could not be freed, a reduction or selection over the batch), drops the batch axis (Squeeze)
    or concatenates a batch tensor with a fixed-batch one."""
    if not batch:
        return None
    shapes = tensor_shapes(m)
    inits = {t.name: t for t in m.graph.initializer}
    constant_nodes = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant" and len(n.output) == 1}

    def ints(name):
        t = inits[name] if name in inits else _attr(constant_nodes[name], "value") if name in constant_nodes else None
        return numpy_helper.to_array(t).reshape(-1).tolist() if isinstance(t, onnx.TensorProto) else None

    def batched(name):
        shape = shapes.get(name)
        return bool(shape) and isinstance(shape[0], str) and shape[0] in batch

    for node in m.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in _BATCH_MOVING_OPS:
            continue
        inputs = [i for i in node.input if i and batched(i)]
        if not inputs:
            continue
        op = node.op_type
        rank = len(shapes[inputs[0]])
        if op == "Transpose" and (not _attr(node, "perm") or _attr(node, "perm")[0] != 0):
            continue
        axes = _attr(node, "axes")
        if axes is None and op in ("Unsqueeze", "Squeeze") and len(node.input) > 1 and node.input[1]:
            axes = ints(node.input[1])
        if op == "Unsqueeze" and (axes is None or 0 in axes):
            continue
        if op == "Squeeze" and batched(node.input[0]) and (axes is None or any(int(a) in (0, -rank) for a in axes)):
            return f"{op} node {node.name!r} removes the batch axis"
        if op == "Concat":
            axis = int(_attr(node, "axis", 0))
            if axis not in (0, -rank) and any(
                    i and shapes.get(i) and isinstance(shapes[i][0], int) for i in node.input):
                return f"Concat node {node.name!r} joins a batch tensor with a fixed-batch one"
        if op == "Gather" and int(_attr(node, "axis", 0)) in (0, -rank) and batched(node.input[0]):
            return f"Gather node {node.name!r} selects along the batch axis"
        if op in ("Reshape", "Flatten") and batched(node.input[0]) and not batched(node.output[0]):
            return f"{op} node {node.name!r} merges the batch axis with others"
        if batched(node.input[0]) and _mixes_batch(node, rank, ints, opset_version(m)):
            return f"{op} node {node.name!r} mixes the images of a batch"
        for o in node.output:
            shape = shapes.get(o) if o else None
            if shape is not None and (len(shape) == 0 or isinstance(shape[0], int)):
                return f"{op} node {node.name!r} turns a batch tensor into one of shape {list(shape)}"
    dependent = _batch_dependent(m, batch)
    for o in m.graph.output:
        shape = shapes.get(o.name)
        if o.name in dependent and shape is not None and (len(shape) == 0 or isinstance(shape[0], int)):
            return f"output {o.name!r} has the fixed shape {list(shape)}"
    return None


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
