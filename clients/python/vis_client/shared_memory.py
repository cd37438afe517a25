"""Same-host shared memory for inputs and results (see "Same-host shared memory" in README.md).

When the client and the server run on the same machine, the client can create POSIX
shared memory regions and name one in each streamed call's metadata. Large raw inputs
are written into the region and sent as references (Tensor.in_shared_memory /
shm_offset); the server reads them in place, writes result tensors into the region
after them and streams only where each one lies (TensorChunk.in_shared_memory /
shm_offset). This spares large tensors the trip through gRPC. Tensors that do not
fit travel through gRPC as usual, so results are always complete. Over a network the
server cannot open the region and answers INVALID_ARGUMENT: use it only for a server
on the same host.

Results the server wrote into a region are handed out as numpy views into it, without
a copy: the region is leased to the call's results until every array viewing it is
garbage, and only then serves another call. A small pool of regions lets a caller keep
a few results while making further calls; a call that finds no free region (and the
pool full) is streamed.

An input can also be built in a region from the start (:meth:`SharedResultMemory.input_array`,
``Client.shared_input``): a call whose input is that array leases its region and sends the
input where it lies, without the copy.
"""
from __future__ import annotations

import mmap
import os
import secrets
import threading
import weakref
from collections import deque

import numpy as np

__all__ = ["NAME_KEY", "SIZE_KEY", "SharedResultMemory", "RegionLease", "INPUT_MIN_BYTES", "ALIGNMENT"]

NAME_KEY = "vis-shm-name"
SIZE_KEY = "vis-shm-size"
SHM_DIR = "/dev/shm"
#: raw inputs of at least this many bytes go through the region; smaller ones travel in the request
INPUT_MIN_BYTES = 64 << 10
#: inputs and results start on cache lines
ALIGNMENT = 64
DEFAULT_MAX_REGIONS = 4


class _Region:
    """One POSIX shared memory region (``/dev/shm/vis_<random>``), mapped read-write."""

    __slots__ = ("name", "size", "map", "retired", "pinned", "leased", "address", "_unlinked", "__weakref__")

    def __init__(self, size: int):
        self.name = f"vis_{secrets.token_hex(12)}"
        self.size = size
        self.retired = False
        self.pinned = False  # an input_array lives at its start
        self.leased = False  # a call, or result arrays of one, use it
        self.address = 0  # where the region starts in this process (set when pinned)
        self._unlinked = False
        path = os.path.join(SHM_DIR, self.name)
        # what shm_open(O_CREAT | O_EXCL, 0600) does on Linux; only the owner (and root) can open it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        _track(self.name, True)

    def unlink(self) -> None:
        """Remove the name (the server can no longer open it); the mapping stays valid while used."""
        if not self._unlinked:
            self._unlinked = True
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
            _track(self.name, False)

    def unmap(self) -> None:
        """Unmap now if no array views the region; otherwise it is unmapped when the last one dies."""
        try:
            self.map.close()
        except BufferError:
            pass  # live views keep the mapping (and the memory) until they are garbage


def _unlink_all(live: dict[str, _Region]) -> None:
    """Unlink the regions a pool still holds (a finalizer: must not refer to the pool)."""
    for region in list(live.values()):
        region.unlink()


def _track(name: str, register: bool) -> None:
    """Have multiprocessing's resource tracker unlink the region should this process die without
    closing its client (as ``multiprocessing.shared_memory`` does). Best effort."""
    try:
        from multiprocessing import resource_tracker

        (resource_tracker.register if register else resource_tracker.unregister)("/" + name, "shared_memory")
    except Exception:  # noqa: BLE001 - cleanup of a crashed process only
        pass


class RegionLease:
    """One call's use of a region: inputs written from offset 0 (:meth:`put`), results read as views (:meth:`view`).

    ``buffer`` is the call's uint8 view of the whole region; every array the call hands
    out is a slice of it, and the region goes back to the pool when ``buffer`` and all
    those slices are garbage.
    """

    def __init__(self, pool: "SharedResultMemory", region: _Region):
        self.region = region
        self.metadata = ((NAME_KEY, region.name), (SIZE_KEY, str(region.size)))
        self.buffer: np.ndarray | None = np.frombuffer(region.map, np.uint8)
        weakref.finalize(self.buffer, pool._give_back, region)
        self._pool = pool
        self._used = 0

    def put(self, arr: np.ndarray) -> int | None:
        """Copy a contiguous little-endian array into the region after the inputs so far; its byte
        offset, or None when it does not fit."""
        offset = -(-self._used // ALIGNMENT) * ALIGNMENT
        end = offset + arr.nbytes
        if self.buffer is None or end > self.region.size:
            return None
        if self.region.pinned and arr.ctypes.data == self.region.address + offset:
            self._pool.in_place_inputs += 1  # an input_array of this region: already where it goes
        else:
            target = self.buffer[offset:end].view(arr.dtype).reshape(arr.shape)
            np.copyto(target, arr, casting="no")
        self._used = end
        return offset

    @property
    def inputs_end(self) -> int:
        """Bytes at the start of the region that hold this call's inputs."""
        return self._used

    def retire(self) -> None:
        """The call failed or was cancelled: the server may still write into the region, so it never
        serves another call (unlinked now; unmapped once nothing views it)."""
        self._pool._retire(self.region)

    def end(self) -> None:
        """The call is over: drop the lease's own reference to the region (results keep theirs)."""
        self.buffer = None


class SharedResultMemory:
    """A pool of up to ``max_regions`` regions of ``size`` bytes for one :class:`~vis_client.Client`.

    Each streamed call leases a free region (making one if the pool has room); a call that
    finds none is streamed. A region is free again once the call is over and every result
    array viewing it is garbage. A call that ends with an error or a cancel retires its
    region (unlinked: the server may still be writing into it). :meth:`close` unlinks them
    all; arrays still viewing one keep their memory valid until they are garbage.
    """

    def __init__(self, size: int, max_regions: int = DEFAULT_MAX_REGIONS):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"shared_memory_bytes must be an int >= 0 (0 = off), got {size!r}")
        if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
            raise ValueError(f"max_regions must be an int >= 1, got {max_regions!r}")
        if not os.path.isdir(SHM_DIR):
            raise OSError(f"shared memory needs {SHM_DIR} (Linux); create the Client without shared_memory_bytes")
        self.size = size
        self.max_regions = max_regions
        self._lock = threading.Lock()
        self._free: list[_Region] = []
        self._live: dict[str, _Region] = {}  # not retired: free or leased, by name
        # (region, what ended: "lease" or "pin"), from finalizers (any thread, any time: no lock)
        self._returned: deque[tuple[_Region, str]] = deque()
        self._closed = False
        self.created = 0
        self.in_place_inputs = 0  # inputs a call found already in its region (input_array)
        # a pool never closed (its Client neither closed nor used as a context manager) unlinks its
        # regions when it is garbage or at interpreter exit, whichever comes first: no region is
        # left in /dev/shm and the resource tracker has nothing to warn about
        self._finalizer = weakref.finalize(self, _unlink_all, self._live)
        with self._lock:
            self._free.append(self._create())

    @property
    def name(self) -> str | None:
        """A region's name (the first free one, else any), None when there is none."""
        with self._lock:
            self._collect_returned()
            if self._free:
                return self._free[-1].name
            return next(iter(self._live), None)

    @property
    def names(self) -> list[str]:
        """Names of the regions the pool holds (free or leased)."""
        with self._lock:
            return list(self._live)

    def _create(self) -> _Region:
        region = _Region(self.size)
        self.created += 1
        self._live[region.name] = region
        return region

    def _collect_returned(self) -> None:
        while self._returned:
            region, ended = self._returned.popleft()
            if ended == "lease":
                region.leased = False
            else:
                region.pinned = False
            if self._closed or region.retired:
                region.unmap()
            elif not (region.leased or region.pinned):
                self._free.append(region)  # LIFO: the most recently used region, its pages warm

    def _give_back(self, region: _Region, ended: str = "lease") -> None:
        # a weakref.finalize callback: may run in any thread, even one holding self._lock (no locking here)
        if not (self._closed or region.retired):
            self._returned.append((region, ended))
        # else: dropped; the mapping goes when the dying buffer releases it

    def lease(self, first_input: np.ndarray | None = None) -> RegionLease | None:
        """A region for one call, None when all are in use (or the pool is closed).

        ``first_input``: the call's first large raw input; when it is an :meth:`input_array`
        whose region no call and no result array uses, that region is the one leased (the
        input is then sent where it lies)."""
        with self._lock:
            if self._closed:
                return None
            self._collect_returned()
            region = self._pinned_region_of(first_input)
            if region is None:
                if self._free:
                    region = self._free.pop()
                elif len(self._live) < self.max_regions:
                    region = self._create()
                else:
                    return None
            region.leased = True
        return RegionLease(self, region)

    def _pinned_region_of(self, arr: np.ndarray | None) -> _Region | None:
        if arr is None or not isinstance(arr, np.ndarray) or arr.size == 0:
            return None
        address = arr.ctypes.data
        for region in self._live.values():
            if region.pinned and not region.leased and region.address == address:
                return region
        return None

    def input_array(self, shape, dtype=np.float32) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` at the start of a region of its own.

        Fill it and pass it as a call's (first) input: the call leases its region and the
        input is not copied. Its region serves no other call while the array (or any view of
        it) lives; a call made while earlier results still view that region copies the input
        into another region as usual. Raises ValueError when it would not fit a region and
        RuntimeError when every region is in use (or the pool is closed)."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        if any(d < 0 for d in shape):
            raise ValueError(f"shape must be non-negative, got {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > self.size:
            raise ValueError(f"an input of {nbytes} bytes does not fit a region of {self.size} bytes")
        with self._lock:
            if self._closed:
                raise RuntimeError("the shared memory pool is closed")
            self._collect_returned()
            if self._free:
                region = self._free.pop()
            elif len(self._live) < self.max_regions:
                region = self._create()
            else:
                raise RuntimeError(f"all {self.max_regions} shared memory regions are in use")
            region.pinned = True
        base = np.frombuffer(region.map, np.uint8, count=nbytes)
        region.address = base.ctypes.data
        # every view of the returned array keeps `base` alive: the region stays pinned until all are gone
        weakref.finalize(base, self._give_back, region, "pin")
        return base.view(dtype).reshape(shape)

    def _retire(self, region: _Region) -> None:
        with self._lock:
            region.retired = True
            self._live.pop(region.name, None)
            region.unlink()

    def close(self) -> None:
        """Unlink every region; unmap those no array views (the others when their views die)."""
        with self._lock:
            self._closed = True
            self._collect_returned()
            for region in self._live.values():
                region.unlink()
            for region in self._free:
                region.unmap()
            self._free.clear()
            self._live.clear()
        self._finalizer.detach()
