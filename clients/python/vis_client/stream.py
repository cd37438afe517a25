"""Draining ``stream ResultChunk`` answers into a :class:`Result`."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from .errors import Cancelled, from_rpc_error
from .gen import vis_pb2
from .tensors import ChunkAssembler, CorruptStream

__all__ = ["Result", "collect", "is_cancelled", "Unfinished"]


@dataclass
class Result:
    """A complete analysis answer: tensors by name plus the closing ResultInfo."""
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    # rank-4 result -> "NCHW" or "NHWC", where the server traced its axes (Activations)
    layouts: dict[str, str] = field(default_factory=dict)


def is_cancelled(cancel: Any) -> bool:
    """True if a ``threading.Event``-like object (``is_set()``) or a callable says so."""
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    if callable(is_set):
        return bool(is_set())
    if callable(cancel):
        return bool(cancel())
    raise TypeError("cancel must have an is_set() method (e.g. threading.Event) or be callable")


def _watch(call, cancel, done: threading.Event, poll: float = 0.05) -> None:
    """Cancel ``call`` as soon as ``cancel`` is set (runs in a daemon thread)."""
    wait = getattr(cancel, "wait", None)
    while not done.is_set():
        if is_cancelled(cancel):
            call.cancel()
            return
        if callable(wait):
            wait(poll)
        else:
            done.wait(poll)


def collect(call: Iterable[vis_pb2.ResultChunk], *,
            on_progress: Callable[[vis_pb2.Progress], Any] | None = None,
            cancel: Any = None, region: memoryview | np.ndarray | None = None, views: bool = False,
            reserved: int = 0, finish: Callable[[Any], Any] | None = None) -> Result:
    """Drain a ResultChunk stream into a :class:`Result`.

    ``call`` is the object a server-streaming stub returns (an iterator that also has
    ``cancel()``). ``on_progress(progress)`` is called for each Progress message.
    ``cancel`` is a ``threading.Event``-like object (or a callable returning bool); once set
    the RPC is cancelled and :class:`Cancelled` is raised. gRPC failures raise
    :class:`VisError`; an inconsistent chunk stream raises ``CorruptStream``. ``region``: the
    shared memory buffer named in the call's metadata; tensors the server wrote there are
    copied out of it, or with ``views=True`` returned as views into it; ``reserved``: its
    first bytes, holding the call's inputs (see :class:`ChunkAssembler`, ``shared_memory.py``).
    ``finish``: when given, the result is returned as soon as the closing ResultInfo
    arrives and ``finish(call)`` is left to take the OK status that follows (see
    :class:`Unfinished`); otherwise the stream is drained to its end.
    """
    result = Result()
    assembler = ChunkAssembler(region, views=views, reserved=reserved)
    done = threading.Event()
    if cancel is not None:
        if is_cancelled(cancel):
            _cancel(call)
            raise Cancelled("cancelled before the call started")
        threading.Thread(target=_watch, args=(call, cancel, done), daemon=True,
                         name="vis-cancel-watch").start()
    try:
        for msg in call:
            if cancel is not None and is_cancelled(cancel):
                _cancel(call)
                raise Cancelled("cancelled by the caller")
            kind = msg.WhichOneof("kind")
            if kind == "progress":
                if on_progress is not None:
                    on_progress(msg.progress)
            elif kind == "tensor":
                out = assembler.add(msg.tensor)
                if out is not None:
                    result.tensors[out[0]] = out[1]
            elif kind == "info":
                info = msg.info
                for chunk in info.tensors:  # shared memory results announced with the closing message
                    if not chunk.in_shared_memory:
                        raise CorruptStream(f"tensor {chunk.name!r}: ResultInfo.tensors holds only shared memory "
                                            "chunks")
                    name, arr = assembler.add(chunk)
                    result.tensors[name] = arr
                result.scalars.update(info.scalars)
                result.labels.update({k: list(v.values) for k, v in info.labels.items()})
                result.text.update(info.text)
                result.layouts.update(info.layouts)
                if finish is not None:
                    # ResultInfo closes the stream: all that follows is the OK status. Return now
                    # rather than wait for it (a round of wake-ups on both sides)
                    finish(call)
                    break
    except grpc.RpcError as e:
        if cancel is not None and is_cancelled(cancel):
            raise Cancelled("cancelled by the caller") from None
        raise from_rpc_error(e) from None
    except BaseException:
        # CorruptStream, an on_progress callback that raised, Ctrl-C: the server would go on with a
        # call nobody reads (a 100000-step maximize held its work slot while the REPL kept the
        # exception, and with it the call, alive)
        _cancel(call)
        raise
    finally:
        done.set()
    assembler.finish()
    return result


class Unfinished:
    """Calls whose result is complete but whose OK status has not been read yet (``collect(finish=...)``).

    Dropping such a call would cancel it; reading its status right away would cost the caller
    one more message latency. They are kept here and drained (their status read, which by
    then has normally arrived) in the client's next call, once its request is out, and when it closes.
    """

    def __init__(self) -> None:
        self._calls: list = []
        self._lock = threading.Lock()

    def add(self, call) -> None:
        with self._lock:
            self._calls.append(call)

    def drain(self, cancel: bool = False) -> None:
        """Read the status of every call kept; ``cancel``: do not wait for one that has not come
        (a call whose status is already there is not affected)."""
        if not self._calls:
            return
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            try:
                if cancel:
                    _cancel(call)
                for _ in call:  # nothing but the status is left
                    pass
            except grpc.RpcError:
                pass  # the result was complete; a late failure (e.g. the channel closing) changes nothing


def _cancel(call) -> None:
    c = getattr(call, "cancel", None)
    if callable(c):
        c()
