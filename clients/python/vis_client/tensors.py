"""Tensor codec (KServe V2 style) and reassembly of chunked result tensors.

A tensor travels as a datatype string, an int64 shape and its raw little-endian
row-major bytes. Result tensors are split into :class:`TensorChunk` pieces that
arrive in order; :class:`ChunkAssembler` puts them back together.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from .gen import vis_pb2

__all__ = ["DATATYPES", "datatype_of", "dtype_of", "to_proto", "from_proto", "ChunkAssembler", "CorruptStream"]

#: datatype string -> numpy little-endian dtype
DATATYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
    "INT16": np.dtype("<i2"),
    "INT8": np.dtype("i1"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_BY_KIND = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}


class CorruptStream(ValueError):
    """A chunked tensor stream is inconsistent (bad offsets, sizes or metadata)."""


def datatype_of(dtype) -> str:
    """Datatype string of a numpy dtype (byte order ignored); TypeError if unsupported."""
    dt = np.dtype(dtype)
    name = _BY_KIND.get((dt.kind, dt.itemsize))
    if name is None:
        raise TypeError(f"unsupported tensor dtype {dt} (supported: "
                        f"{', '.join(str(d) for d in DATATYPES.values())})")
    return name


def dtype_of(datatype: str) -> np.dtype:
    """Little-endian numpy dtype of a datatype string; ValueError if unknown."""
    try:
        return DATATYPES[datatype.upper()]
    except KeyError:
        raise ValueError(f"unknown tensor datatype {datatype!r} (known: {', '.join(DATATYPES)})") from None


def to_proto(name: str, array) -> vis_pb2.Tensor:
    """Encode an array-like as a ``vis_pb2.Tensor`` (little-endian, row-major).

    Non-contiguous and big-endian arrays are converted; Python scalars/lists go through
    ``np.asarray`` (so Python floats become FP64, ints INT64).
    """
    datatype, shape, data = encode(array)
    return vis_pb2.Tensor(name=name, datatype=datatype, shape=shape, raw_contents=data)


def encode(array) -> tuple[str, list[int], bytes]:
    """(datatype, shape, little-endian row-major bytes) of an array-like."""
    arr = np.asarray(array)
    datatype = datatype_of(arr.dtype)
    # np.require keeps a 0-d array 0-d (ascontiguousarray makes it [1]: a scalar input could not be sent)
    arr = np.require(arr.astype(DATATYPES[datatype], copy=False), requirements="C")
    return datatype, list(arr.shape), arr.tobytes()


def _decode(datatype: str, shape, data, what: str, copy: bool = True) -> np.ndarray:
    dt = dtype_of(datatype)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise CorruptStream(f"{what}: negative dimension in shape {shape}")
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(data) != expected:
        raise CorruptStream(f"{what}: {len(data)} bytes for {datatype}{list(shape)}, expected {expected}")
    arr = np.frombuffer(data, dtype=dt).reshape(shape)
    # copy bytes-backed arrays so the result is writable and does not pin the message
    return arr.copy() if copy else arr


def from_proto(t: vis_pb2.Tensor) -> np.ndarray:
    """Decode a ``vis_pb2.Tensor`` (or a complete single ``TensorChunk``) into a numpy array."""
    data = t.raw_contents if isinstance(t, vis_pb2.Tensor) else t.data
    return _decode(t.datatype, t.shape, data, f"tensor {t.name!r}")


class _Pending:
    __slots__ = ("datatype", "shape", "total", "buf", "filled")

    def __init__(self, chunk):
        self.datatype = chunk.datatype
        self.shape = tuple(chunk.shape)
        self.total = chunk.total_bytes
        # not zero-filled (a bytearray would be): every byte is written before the tensor is handed out
        self.buf = np.empty(chunk.total_bytes, np.uint8)
        self.filled = 0


class ChunkAssembler:
    """Reassemble ``TensorChunk`` messages into complete arrays.

    Pieces of one tensor must arrive in order (``offset`` equal to the bytes received so
    far) and share name, datatype, shape and ``total_bytes``; several tensors may be
    interleaved by name. :meth:`add` returns ``(name, array)`` when a tensor completes,
    else ``None``. :meth:`finish` raises :class:`CorruptStream` if a tensor is incomplete.

    ``region``: the call's shared memory buffer (see ``shared_memory.py``); a chunk marked
    ``in_shared_memory`` is a whole tensor the server wrote there. It is copied out at once,
    or with ``views=True`` returned as a view into the region, without a copy (the caller
    then keeps the region from being reused while the view lives). ``reserved``: bytes at
    the start of the region that hold the call's inputs; results never overlap them or
    each other.
    """

    def __init__(self, region: memoryview | np.ndarray | None = None, *, views: bool = False,
                 reserved: int = 0) -> None:
        self._pending: dict[str, _Pending] = {}
        self._done: set[str] = set()
        self._region = (region if region is None or isinstance(region, np.ndarray)
                        else np.frombuffer(region, np.uint8))
        self._views = views
        self._taken: list[tuple[int, int]] = [(0, reserved)] if reserved > 0 else []

    @property
    def pending(self) -> list[str]:
        """Names of tensors started but not yet complete."""
        return list(self._pending)

    def add(self, chunk: vis_pb2.TensorChunk) -> tuple[str, np.ndarray] | None:
        name = chunk.name
        if chunk.in_shared_memory:
            return name, self._from_region(chunk)
        p = self._pending.get(name)
        if p is None:
            if name in self._done:
                raise CorruptStream(f"tensor {name!r}: chunk after the tensor was complete")
            if chunk.offset != 0:
                raise CorruptStream(f"tensor {name!r}: first chunk at offset {chunk.offset}, expected 0")
            if chunk.total_bytes < 0:
                raise CorruptStream(f"tensor {name!r}: negative total_bytes {chunk.total_bytes}")
            dt = dtype_of(chunk.datatype)
            if any(s < 0 for s in chunk.shape):
                raise CorruptStream(f"tensor {name!r}: negative dimension in shape {list(chunk.shape)}")
            expected = int(np.prod(tuple(chunk.shape), dtype=np.int64)) * dt.itemsize
            if chunk.total_bytes != expected:
                raise CorruptStream(f"tensor {name!r}: total_bytes {chunk.total_bytes} does not match "
                                    f"{chunk.datatype}{list(chunk.shape)} ({expected} bytes)")
            p = self._pending[name] = _Pending(chunk)
        else:
            if (chunk.datatype != p.datatype or tuple(chunk.shape) != p.shape
                    or chunk.total_bytes != p.total):
                raise CorruptStream(f"tensor {name!r}: datatype/shape/total_bytes changed between chunks")
            if chunk.offset != p.filled:
                raise CorruptStream(f"tensor {name!r}: chunk at offset {chunk.offset}, expected {p.filled} "
                                    "(missing or out-of-order chunk)")
        n = len(chunk.data)
        if p.filled + n > p.total:
            raise CorruptStream(f"tensor {name!r}: {p.filled + n} bytes received, more than total_bytes {p.total}")
        p.buf[p.filled:p.filled + n] = np.frombuffer(chunk.data, np.uint8)
        p.filled += n
        if p.filled == p.total:
            del self._pending[name]
            self._done.add(name)
            return name, _decode(p.datatype, p.shape, p.buf, f"tensor {name!r}", copy=False)
        return None

    def _from_region(self, chunk: vis_pb2.TensorChunk) -> np.ndarray:
        name = chunk.name
        if self._region is None:
            raise CorruptStream(f"tensor {name!r}: announced in shared memory, but this call shared no region")
        if name in self._done or name in self._pending:
            raise CorruptStream(f"tensor {name!r}: shared memory chunk for a tensor already received")
        # (plain Python, few numpy calls: this runs right after a long wait, with cold caches)
        dt = dtype_of(chunk.datatype)
        shape = tuple(chunk.shape)
        if shape and min(shape) < 0:
            raise CorruptStream(f"tensor {name!r}: negative dimension in shape {list(shape)}")
        start = chunk.shm_offset
        end = start + math.prod(shape) * dt.itemsize
        if chunk.total_bytes != end - start or chunk.offset != 0 or chunk.data:
            raise CorruptStream(f"tensor {name!r}: shared memory chunk with offset {chunk.offset}, "
                                f"{len(chunk.data)} data bytes, total_bytes {chunk.total_bytes} "
                                f"for {chunk.datatype}{list(shape)}")
        size = self._region.nbytes
        if start < 0 or end > size:
            raise CorruptStream(f"tensor {name!r}: bytes [{start}, {end}) lie outside the {size}-byte "
                                "shared memory region")
        for a, b in self._taken:
            if start < b and a < end and end > start:
                raise CorruptStream(f"tensor {name!r}: bytes [{start}, {end}) overlap the call's inputs or another "
                                    f"result at [{a}, {b})")
        self._taken.append((start, end))
        self._done.add(name)
        arr = self._region[start:end].view(dt).reshape(shape)
        # a view when the caller keeps the region for it (Client does), else the one copy out of the region
        return arr if self._views else arr.copy()

    def feed(self, chunks: Iterable[vis_pb2.TensorChunk]) -> Iterator[tuple[str, np.ndarray]]:
        """Consume chunks, yielding ``(name, array)`` for each completed tensor, then :meth:`finish`."""
        for c in chunks:
            out = self.add(c)
            if out is not None:
                yield out
        self.finish()

    def finish(self) -> None:
        """Raise :class:`CorruptStream` if any tensor is still incomplete."""
        if self._pending:
            details = ", ".join(f"{n!r} ({p.filled}/{p.total} bytes)" for n, p in self._pending.items())
            raise CorruptStream(f"stream ended with incomplete tensors: {details}")
