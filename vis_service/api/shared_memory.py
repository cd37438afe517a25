"""Same-host shared memory for result tensors (like Triton's system shared-memory extension).

A client on the server's host creates a POSIX shared memory region and names it
in the call's metadata (`vis-shm-name`, `vis-shm-size`); the server writes
result tensors straight into it and streams only where each one lies (see
TensorChunk in vis.proto). This spares the tensor bytes the trip through gRPC,
which for large activations costs more than computing them.

The server only opens regions the client made: it never creates, resizes or
unlinks one, and it closes its mapping when the call ends. Each call gets its
own `SharedResultRegion`, so concurrent calls with different regions never share
state; tensors are placed one after another from the start of the region.
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from typing import Iterable

import numpy as np

from ..datatypes import NUMPY_BY_DATATYPE, datatype_of
from ..errors import FailedPrecondition, InvalidArgument

NAME_KEY = "vis-shm-name"
SIZE_KEY = "vis-shm-size"
NAME_PATTERN = re.compile(r"^vis_[A-Za-z0-9_-]{1,64}$")
# POSIX shared memory objects are files here on Linux (shm_open("/name") opens /dev/shm/name)
SHM_DIR = "/dev/shm"
# each tensor starts on a cache line: aligned views on the client, no false sharing
ALIGNMENT = 64


class SharedResultRegion:
    """A client's region, mapped read-write for one call; `place` writes a tensor into it."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self._used = 0
        self._lock = threading.Lock()  # close() may come from gRPC's callback thread mid-write
        fd = _open_region(name)
        try:
            actual = os.fstat(fd).st_size
            if size > actual:
                raise InvalidArgument(SIZE_KEY, f"declares {size} bytes but region {name!r} holds {actual} bytes")
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        finally:
            os.close(fd)  # the mapping keeps the memory; the descriptor is not needed
        self._closed = False

    def place(self, arr: np.ndarray) -> int | None:
        """Copy `arr` (little-endian, row-major) into the region; its byte offset, or None if it does not fit."""
        dtype = NUMPY_BY_DATATYPE[datatype_of(arr.dtype)]
        nbytes = arr.size * dtype.itemsize
        with self._lock:
            if self._closed or nbytes == 0:
                return None
            offset = -(-self._used // ALIGNMENT) * ALIGNMENT
            if offset + nbytes > self.size:
                return None
            target = np.frombuffer(self._map, dtype=dtype, count=arr.size, offset=offset).reshape(arr.shape)
            np.copyto(target, arr, casting="no" if arr.dtype == dtype else "equiv")
            del target  # release the buffer export before the mapping can be closed
            self._used = offset + nbytes
            return offset

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._map.close()


def _open_region(name: str) -> int:
    if not os.path.isdir(SHM_DIR):
        raise FailedPrecondition(f"{NAME_KEY}: shared memory results need {SHM_DIR} (Linux); "
                                 "call without the vis-shm-* metadata to have results streamed")
    try:
        # O_NOFOLLOW: a symlink planted under /dev/shm must not redirect the server's writes
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(NAME_KEY, f"no shared memory region {name!r} on the server's host; shared memory "
                                        "works only when client and server run on the same machine") from None
    except OSError as e:
        raise InvalidArgument(NAME_KEY, f"cannot open shared memory region {name!r}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(NAME_KEY, f"{name!r} is not a shared memory region")
    return fd


def region_from_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> SharedResultRegion | None:
    """The region the call's metadata names, opened; None when it names none."""
    values = dict(metadata or ())
    name, size = values.get(NAME_KEY), values.get(SIZE_KEY)
    if name is None and size is None:
        return None
    if name is None:
        raise InvalidArgument(NAME_KEY, f"missing: {SIZE_KEY} was sent without the region's name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidArgument(NAME_KEY, f"{name!r} is not allowed; a region name matches {NAME_PATTERN.pattern}")
    if size is None:
        raise InvalidArgument(SIZE_KEY, "missing: the region's size in bytes is required with " + NAME_KEY)
    if not isinstance(size, str) or not size.isdigit() or int(size) <= 0:
        raise InvalidArgument(SIZE_KEY, f"{size!r} is not allowed; the region's size is a positive decimal integer")
    return SharedResultRegion(name, int(size))
