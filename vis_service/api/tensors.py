"""proto <-> numpy for tensors, and splitting result tensors into chunks."""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from ..datatypes import NUMPY_BY_DATATYPE, datatype_of
from ..errors import InvalidArgument
from ..gen import vis_pb2

DEFAULT_CHUNK_BYTES = 1 << 20


def tensor_from_proto(t: vis_pb2.Tensor, field: str) -> np.ndarray:
    dtype = NUMPY_BY_DATATYPE.get(t.datatype)
    if dtype is None:
        raise InvalidArgument(f"{field}.datatype", f"{t.datatype!r} not allowed; use one of {', '.join(NUMPY_BY_DATATYPE)}")
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"negative dimension in {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(t.raw_contents) != count * dtype.itemsize:
        raise InvalidArgument(f"{field}.raw_contents", f"holds {len(t.raw_contents)} bytes but {t.datatype} {list(shape)} needs {count * dtype.itemsize}")
    arr = np.frombuffer(t.raw_contents, dtype=dtype).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def tensor_to_proto(name: str, arr: np.ndarray) -> vis_pb2.Tensor:
    arr = np.asarray(arr)
    dt = datatype_of(arr.dtype)
    data = np.ascontiguousarray(arr, dtype=NUMPY_BY_DATATYPE[dt]).tobytes()
    return vis_pb2.Tensor(name=name, datatype=dt, shape=list(arr.shape), raw_contents=data)


def chunk_tensor(name: str, arr: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[vis_pb2.ResultChunk]:
    """One tensor as ResultChunks of at most `chunk_bytes` payload each (at least one)."""
    arr = np.asarray(arr)
    dt = datatype_of(arr.dtype)
    data = memoryview(np.ascontiguousarray(arr, dtype=NUMPY_BY_DATATYPE[dt]).reshape(-1).view(np.uint8))
    total = len(data)
    offset = 0
    while True:
        piece = bytes(data[offset:offset + chunk_bytes])
        yield vis_pb2.ResultChunk(tensor=vis_pb2.TensorChunk(
            name=name, datatype=dt, shape=list(arr.shape), total_bytes=total, offset=offset, data=piece))
        offset += len(piece)
        if offset >= total:
            break


def result_stream(tensors: Mapping[str, np.ndarray], *, scalars: Mapping[str, float] | None = None,
                  labels: Mapping[str, list[str]] | None = None, text: Mapping[str, str] | None = None,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[vis_pb2.ResultChunk]:
    """The tail of every analysis stream: the tensors' chunks, then one ResultInfo."""
    for name, arr in tensors.items():
        yield from chunk_tensor(name, arr, chunk_bytes)
    info = vis_pb2.ResultInfo()
    for k, v in (scalars or {}).items():
        info.scalars[k] = float(v)
    for k, v in (labels or {}).items():
        info.labels[k].values.extend(v)
    for k, v in (text or {}).items():
        info.text[k] = v
    yield vis_pb2.ResultChunk(info=info)
