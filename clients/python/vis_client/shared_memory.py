"""Same-host shared memory for result tensors (see "Same-host shared memory" in README.md).

When the client and the server run on the same machine, the client can create a
POSIX shared memory region and name it in each streamed call's metadata; the server
then writes result tensors into the region and streams only where each one lies
(TensorChunk.in_shared_memory / shm_offset), which spares large results the trip
through gRPC. Tensors that do not fit are streamed as usual, so results are always
complete. Over a network the server cannot open the region and answers
INVALID_ARGUMENT: use it only for a server on the same host.
"""
from __future__ import annotations

import secrets
import threading
from contextlib import contextmanager
from multiprocessing import shared_memory
from typing import Iterator

__all__ = ["NAME_KEY", "SIZE_KEY", "SharedResultMemory"]

NAME_KEY = "vis-shm-name"
SIZE_KEY = "vis-shm-size"


class SharedResultMemory:
    """One region per :class:`~vis_client.Client`, reused by its calls one at a time.

    A call that finds the region in use by another thread of the same client has its
    results streamed instead (no waiting, no sharing). A call that ends with an error or
    a cancel retires the region (the server may still be writing into it) and the next
    call gets a fresh one. :meth:`close` unlinks it.
    """

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"shared_memory_bytes must be an int >= 0 (0 = off), got {size!r}")
        self.size = size
        self._lock = threading.Lock()
        self._shm: shared_memory.SharedMemory | None = None
        self._closed = False
        self._create()

    @property
    def name(self) -> str | None:
        """The current region's name (what the server opens), None when there is none."""
        return self._shm.name if self._shm is not None else None

    def _create(self) -> None:
        self._shm = shared_memory.SharedMemory(name=f"vis_{secrets.token_hex(12)}", create=True, size=self.size)

    def _release(self) -> None:
        shm, self._shm = self._shm, None
        if shm is not None:
            shm.close()
            shm.unlink()

    @contextmanager
    def use(self) -> Iterator[tuple[tuple[tuple[str, str], ...], memoryview | None]]:
        """``(call metadata, region buffer)`` for one call; ``((), None)`` when the region is busy or closed."""
        if not self._lock.acquire(blocking=False):
            yield (), None
            return
        try:
            if self._closed:
                yield (), None
                return
            if self._shm is None:
                self._create()
            shm = self._shm
            try:
                yield ((NAME_KEY, shm.name), (SIZE_KEY, str(self.size))), shm.buf
            except BaseException:
                self._release()  # the server may still write into it: never hand it to another call
                raise
        finally:
            self._lock.release()

    def close(self) -> None:
        """Unmap and unlink the region (waits for a call using it to finish)."""
        with self._lock:
            self._closed = True
            self._release()
