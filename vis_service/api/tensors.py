"""proto <-> numpy for tensors, and splitting result tensors into chunks."""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from ..datatypes import NUMPY_BY_DATATYPE, datatype_of
from ..errors import InvalidArgument
from ..gen import vis_pb2
from .shared_memory import SharedRegion

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_TENSOR_BYTES = 1 << 40  # no request tensor (in a message or in shared memory) is near this: a shape
# claiming more is a mistake, said as such rather than as a byte-count mismatch
MAX_RANK = 32   # numpy holds at most 64 dimensions (more was INTERNAL); no model input has near 32


def tensor_from_proto(t: vis_pb2.Tensor, field: str, region: SharedRegion | None = None) -> np.ndarray:
    """The tensor as a read-only numpy array: a view of the message bytes, or of the call's shared
    memory `region` when the client sent it there (`in_shared_memory`); no copy either way."""
    dtype = NUMPY_BY_DATATYPE.get(t.datatype)
    if dtype is None:
        raise InvalidArgument(f"{field}.datatype", f"{t.datatype!r} not allowed; use one of {', '.join(NUMPY_BY_DATATYPE)}")
    shape = tuple(int(d) for d in t.shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"{field}.shape", f"{len(shape)} dimensions; at most {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"negative dimension in {list(shape)}")
    count = 1
    for d in shape:  # Python ints: numpy's int64 product wraps around for huge shapes
        count *= d
    if count * dtype.itemsize > MAX_TENSOR_BYTES:
        raise InvalidArgument(f"{field}.shape", f"{list(shape)} holds {count} elements ({count * dtype.itemsize} bytes); "
                                                f"at most {MAX_TENSOR_BYTES} bytes per tensor")
    if t.in_shared_memory:
        if region is None:
            raise InvalidArgument(f"{field}.in_shared_memory",
                                  "set, but no shared memory region is given for this tensor (only an InputBatch's "
                                  "tensors, in a call whose vis-shm-name / vis-shm-size metadata names a region)")
        if t.raw_contents:
            raise InvalidArgument(f"{field}.raw_contents", "must be empty for a tensor in shared memory")
        arr = region.input_view(int(t.shm_offset), dtype, shape, field)
    else:
        if len(t.raw_contents) != count * dtype.itemsize:
            raise InvalidArgument(f"{field}.raw_contents", f"holds {len(t.raw_contents)} bytes but {t.datatype} {list(shape)} needs {count * dtype.itemsize}")
        # read-only view of the message bytes: the request outlives the call, so no copy is needed
        arr = np.frombuffer(t.raw_contents, dtype=dtype).reshape(shape)
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def tensor_to_proto(name: str, arr: np.ndarray) -> vis_pb2.Tensor:
    arr = np.asarray(arr)
    dt = datatype_of(arr.dtype)
    data = np.ascontiguousarray(arr, dtype=NUMPY_BY_DATATYPE[dt]).tobytes()
    return vis_pb2.Tensor(name=name, datatype=dt, shape=list(arr.shape), raw_contents=data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# wire tags: ResultChunk.tensor = field 2, TensorChunk.data = field 6, both length-delimited
_RESULT_TENSOR_TAG = bytes([(2 << 3) | 2])
_CHUNK_DATA_TAG = bytes([(6 << 3) | 2])


def chunk_tensor(name: str, arr: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """One tensor as serialized ResultChunk messages of at most `chunk_bytes` payload each.

    The messages are encoded here rather than built as protobuf objects: the payload
    is copied once, straight from the array into the wire bytes, instead of into a
    bytes object, a message and then the wire (tensor transfer dominates the
    overhead of large activations). Servicers are registered with a serializer that
    passes bytes through (see `registration.py`).
    """
    arr = np.asarray(arr)
    dt = datatype_of(arr.dtype)
    data = memoryview(np.ascontiguousarray(arr, dtype=NUMPY_BY_DATATYPE[dt]).reshape(-1).view(np.uint8))
    total = len(data)
    offset = 0
    while True:
        piece = data[offset:offset + chunk_bytes]
        header = vis_pb2.TensorChunk(name=name, datatype=dt, shape=list(arr.shape), total_bytes=total,
                                     offset=offset).SerializeToString()
        body_len = len(header) + 1 + len(_varint(len(piece))) + len(piece)
        yield b"".join((_RESULT_TENSOR_TAG, _varint(body_len), header, _CHUNK_DATA_TAG, _varint(len(piece)), piece))
        offset += len(piece)
        if offset >= total:
            break


def shared_memory_chunk(name: str, arr: np.ndarray, shm_offset: int) -> vis_pb2.TensorChunk:
    """The one chunk of a tensor the server wrote into the call's shared memory region: where, no data."""
    dt = datatype_of(arr.dtype)
    return vis_pb2.TensorChunk(name=name, datatype=dt, shape=list(arr.shape),
                               total_bytes=arr.size * NUMPY_BY_DATATYPE[dt].itemsize, offset=0,
                               shm_offset=shm_offset, in_shared_memory=True)


def result_stream(tensors: Mapping[str, np.ndarray], *, scalars: Mapping[str, float] | None = None,
                  labels: Mapping[str, list[str]] | None = None, text: Mapping[str, str] | None = None,
                  layouts: Mapping[str, str] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  region: SharedRegion | None = None) -> Iterator[vis_pb2.ResultChunk | bytes]:
    """The tail of every analysis stream: the tensors' chunks (pre-serialized), then one ResultInfo.

    With the call's shared memory `region` (api/shared_memory.py), each tensor that
    fits in what is left of it (after the call's inputs) is written there (or already
    is: `SharedRegion.allocate`) and announced by a data-less chunk; the others are
    streamed. The announcements ride in the closing ResultInfo (`tensors`), so a result
    that fits is one message; they go out on their own only before a streamed tensor,
    which keeps the tensors in order.
    """
    placed: list[vis_pb2.TensorChunk] = []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        shm_offset = region.place(arr) if region is not None else None
        if shm_offset is not None:
            placed.append(shared_memory_chunk(name, arr, shm_offset))
            continue
        for chunk in placed:
            yield vis_pb2.ResultChunk(tensor=chunk)
        placed.clear()
        yield from chunk_tensor(name, arr, chunk_bytes)
    info = vis_pb2.ResultInfo(tensors=placed)
    for k, v in (scalars or {}).items():
        info.scalars[k] = float(v)
    for k, v in (labels or {}).items():
        info.labels[k].values.extend(v)
    for k, v in (text or {}).items():
        info.text[k] = v
    for k, v in (layouts or {}).items():
        info.layouts[k] = v
    yield vis_pb2.ResultChunk(info=info)
