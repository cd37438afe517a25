"""Same-host shared memory for request inputs and result tensors (like Triton's system shared-memory extension).

A client on the server's host creates a POSIX shared memory region and names it
in the call's metadata (`vis-shm-name`, `vis-shm-size`). Raw inputs the client
wrote into the region arrive as references (Tensor.in_shared_memory /
shm_offset) and are read in place, as read-only views; the server writes result
tensors into the region after the end of the inputs and streams only where each
one lies (see TensorChunk in vis.proto). This spares the tensor bytes the trip
through gRPC, which for large activations costs more than computing them.

The server only opens regions the client made: it never creates, resizes or
unlinks one. Mappings are kept between calls (`RegionMappings`, a few per server,
keyed by name and checked against the file's identity on every call), because
mapping afresh makes every page the call touches fault again. Each call gets its
own `SharedRegion` (its own write cursor); `close()` at the end of the call only
stops further writes: other calls, and views of the call's inputs that a method
still holds, may use the mapping. A mapping is unmapped when it has left the
cache and nothing uses it any more (reference counting; never `mmap.close()`,
which fails while views exist).
"""
from __future__ import annotations

import math
import mmap
import os
import re
import stat
import threading
from collections import OrderedDict
from typing import Iterable

import numpy as np

from ..datatypes import NUMPY_BY_DATATYPE, datatype_of
from ..errors import FailedPrecondition, InvalidArgument

NAME_KEY = "vis-shm-name"
SIZE_KEY = "vis-shm-size"
NAME_PATTERN = re.compile(r"vis_[A-Za-z0-9_-]{1,64}")   # fullmatch: a $ would admit a trailing newline
# POSIX shared memory objects are files here on Linux (shm_open("/name") opens /dev/shm/name)
SHM_DIR = "/dev/shm"
# each result starts on a cache line: aligned views on the client, no false sharing
ALIGNMENT = 64
DEFAULT_CACHED_MAPPINGS = 8


class _Mapping:
    """One region's file mapped read-write, with the identity of the file it maps."""

    __slots__ = ("identity", "map")

    def __init__(self, identity: tuple[int, int, int], fd: int):
        self.identity = identity  # (st_dev, st_ino, st_size)
        self.map = mmap.mmap(fd, identity[2], access=mmap.ACCESS_WRITE)


class RegionMappings:
    """The server's mappings of client regions, at most `capacity` of them (least recently used leaves).

    Every call opens the region's file again (O_NOFOLLOW) and compares its
    (device, inode, size) with the cached mapping's: a region retired and made again
    under the same name, or resized, gets a new mapping, never the old one. Entries
    whose file is gone (the client unlinked the region) are dropped as calls come
    and go, so the memory of retired regions is not pinned by the server.
    """

    def __init__(self, capacity: int = DEFAULT_CACHED_MAPPINGS):
        self.capacity = max(1, int(capacity))
        self._entries: OrderedDict[str, _Mapping] = OrderedDict()
        self._lock = threading.Lock()
        self.mapped = 0  # how many mappings were made (for tests and diagnostics)

    def __len__(self) -> int:
        return len(self._entries)

    def open(self, name: str, size: int) -> "SharedRegion":
        """The call's view of region `name`, whose first `size` bytes the call may use."""
        fd = _open_region(name)
        try:
            st = os.fstat(fd)
            if size > st.st_size:
                raise InvalidArgument(SIZE_KEY, f"declares {size} bytes but region {name!r} holds {st.st_size} bytes")
            identity = (st.st_dev, st.st_ino, st.st_size)
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None and entry.identity == identity:
                    self._entries.move_to_end(name)
                else:
                    entry = _Mapping(identity, fd)
                    self.mapped += 1
                    self._entries[name] = entry
                    while len(self._entries) > self.capacity:
                        self._entries.popitem(last=False)  # unmapped once no call or view uses it
        finally:
            os.close(fd)  # the mapping keeps the memory; the descriptor is not needed
        return SharedRegion(name, size, entry.map, self)

    def sweep(self) -> None:
        """Drop the mappings whose region is gone or was replaced (stat of each name)."""
        with self._lock:
            names = list(self._entries.items())
        stale = []
        for name, entry in names:
            try:
                st = os.stat(os.path.join(SHM_DIR, name), follow_symlinks=False)
            except OSError:
                stale.append((name, entry))
                continue
            if (st.st_dev, st.st_ino, st.st_size) != entry.identity:
                stale.append((name, entry))
        if stale:
            with self._lock:
                for name, entry in stale:
                    if self._entries.get(name) is entry:
                        del self._entries[name]


class SharedRegion:
    """One call's use of a client's region: input views (`input_view`) and result placement (`place`)."""

    def __init__(self, name: str, size: int, mapping: mmap.mmap, owner: RegionMappings | None = None):
        self.name = name
        self.size = size
        self._map: mmap.mmap | None = mapping
        self._owner = owner
        self._used = 0  # end of the inputs and results so far: results go after it
        self._inputs: list[tuple[int, int]] = []
        self._allocated: list[tuple[np.ndarray, int]] = []  # (array `allocate` gave, its offset), not placed yet
        self._lock = threading.Lock()  # close() may come from gRPC's callback thread mid-write

    def input_view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...], field: str) -> np.ndarray:
        """Read-only view of an input tensor the client wrote at `offset` (no copy)."""
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        end = offset + nbytes
        if nbytes > self.size:
            raise InvalidArgument(f"{field}.shm_offset", f"{offset} not allowed: the tensor's {nbytes} bytes do not "
                                                         f"fit in the {self.size}-byte region")
        if offset < 0 or end > self.size:
            raise InvalidArgument(f"{field}.shm_offset", f"{offset} not allowed: the tensor has {nbytes} bytes, so the "
                                                         f"allowed range is 0..{self.size - nbytes} "
                                                         f"(the region has {self.size} bytes)")
        with self._lock:
            if self._map is None:
                raise FailedPrecondition("the call has ended")
            for start, stop in self._inputs:
                if offset < stop and start < end and nbytes:
                    raise InvalidArgument(f"{field}.shm_offset",
                                          f"bytes [{offset}, {end}) overlap another input at [{start}, {stop})")
            self._inputs.append((offset, end))
            self._used = max(self._used, end)
            arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)
        if not arr.flags.aligned:
            arr = arr.copy()  # kernels may assume element alignment; a misaligned offset costs one copy
        arr.flags.writeable = False
        return arr

    def allocate(self, specs: list[tuple[np.dtype, tuple[int, ...]]]) -> list[np.ndarray] | None:
        """Writable arrays in the region, one per (dtype, shape), after everything placed so far, for a
        method to compute its results into (methods/activations.py); None unless all of them fit.
        `place` then only announces them: no copy."""
        with self._lock:
            if self._map is None:
                return None
            used, spans = self._used, []
            for dtype, shape in specs:
                dtype = np.dtype(dtype)
                count = math.prod(shape)
                if count == 0 or not dtype.isnative:
                    return None
                offset = -(-used // ALIGNMENT) * ALIGNMENT
                used = offset + count * dtype.itemsize
                spans.append((offset, count, dtype, shape))
            if used > self.size:
                return None
            arrays = []
            for offset, count, dtype, shape in spans:
                arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)
                self._allocated.append((arr, offset))
                arrays.append(arr)
            self._used = used
            return arrays

    def place(self, arr: np.ndarray) -> int | None:
        """Copy `arr` (little-endian, row-major) into the region after everything placed so far;
        its byte offset, or None if it does not fit (or the call has ended). An array `allocate`
        gave is already there: its offset, without a copy (once; a second time it is copied)."""
        dtype = NUMPY_BY_DATATYPE[datatype_of(arr.dtype)]
        nbytes = arr.size * dtype.itemsize
        with self._lock:
            if self._map is None or nbytes == 0:
                return None
            for i, (given, offset) in enumerate(self._allocated):
                if given is arr:
                    del self._allocated[i]
                    return offset
            offset = -(-self._used // ALIGNMENT) * ALIGNMENT
            if offset + nbytes > self.size:
                return None
            target = np.frombuffer(self._map, dtype=dtype, count=arr.size, offset=offset).reshape(arr.shape)
            np.copyto(target, arr, casting="no" if arr.dtype == dtype else "equiv")
            self._used = offset + nbytes
            return offset

    def close(self) -> None:
        """No further writes for this call. The mapping stays (cached, or alive while views of it live)."""
        with self._lock:
            self._map = None
            self._allocated.clear()
        if self._owner is not None:
            self._owner.sweep()




def _open_region(name: str) -> int:
    if not os.path.isdir(SHM_DIR):
        raise FailedPrecondition(f"{NAME_KEY}: shared memory needs {SHM_DIR} (Linux); "
                                 "call without the vis-shm-* metadata to have tensors travel through gRPC")
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


def is_local_peer(peer: str) -> bool:
    """A gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path") of a client on
    this host: loopback or a unix socket."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    if peer.startswith("ipv4:"):
        return peer[5:].startswith("127.")
    if peer.startswith("ipv6:"):
        host = peer[5:].split("]")[0].lstrip("[").lower()
        return host == "::1" or host.startswith("::ffff:127.")
    return False


def region_from_metadata(metadata: Iterable[tuple[str, str | bytes]],
                         mappings: RegionMappings | None = None) -> SharedRegion | None:
    """The region the call's metadata names, opened (through `mappings`, else mapped for this call only);
    None when it names none."""
    values = dict(metadata or ())
    name, size = values.get(NAME_KEY), values.get(SIZE_KEY)
    if name is None and size is None:
        return None
    if name is None:
        raise InvalidArgument(NAME_KEY, f"missing: {SIZE_KEY} was sent without the region's name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(NAME_KEY, f"{name!r} is not allowed; a region name matches {NAME_PATTERN.pattern}")
    if size is None:
        raise InvalidArgument(SIZE_KEY, "missing: the region's size in bytes is required with " + NAME_KEY)
    if not isinstance(size, str) or not size.isdigit() or int(size) <= 0:
        raise InvalidArgument(SIZE_KEY, f"{size!r} is not allowed; the region's size is a positive decimal integer")
    return (mappings if mappings is not None else RegionMappings(1)).open(name, int(size))
