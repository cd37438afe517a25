"""Register servicers with a response serializer that lets pre-serialized bytes through.

Result streams yield tensor chunks already encoded (api/tensors.py) next to
ordinary messages; the generated `add_*Servicer_to_server` functions would call
`SerializeToString` on them. This builds the same handlers from the service
descriptor, with that difference, and with requests that carry an InputBatch read
by `requests.request_reader` (large raw inputs stay where they were received).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import grpc
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.descriptor import ServiceDescriptor

from .requests import request_reader, takes_input_batch


def serialize_response(message) -> bytes:
    return message if isinstance(message, (bytes, bytearray)) else message.SerializeToString()


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


# Calls that only read the server's state: they never take a work slot, so that a server whose
# slots are all busy with long calls still answers them (the gRPC health service, outside these
# servicers, never does either).
LIGHT_METHODS = frozenset({"vis.v1.ModelService/List", "vis.v1.ModelService/Inspect", "vis.v1.ModelService/Unload",
                           "vis.v1.VisService/GetServerInfo"})


class WorkSlots:
    """At most `size` calls that do work (uploads, loads, every method) at once; one more is
    answered RESOURCE_EXHAUSTED after a short wait (GRACE_S) rather than queued behind them. The
    server's thread pool has a few threads more than slots, so health checks and the light calls
    above always find one (eight long Maximize streams used to hold every thread: health checks
    timed out)."""

    # A streamed call's last message reaches the client before its handler has unwound and freed
    # the slot, so a client's next call could find it still taken (about 1 in 200 back-to-back
    # calls on a --workers 1 server was refused): a call waits this long for a slot, less if its
    # deadline is nearer.
    GRACE_S = 1.0
    # Calls waiting out the grace at once; more are refused at once. Each waiter holds one of the
    # server's few threads beyond the slots: with eight refused callers waiting, health checks and
    # List waited behind them (2 s and more; 32 callers: 8 s).
    MAX_WAITERS = 2

    def __init__(self, size: int):
        self.size = size
        self._free = threading.BoundedSemaphore(size)
        self._waiting = 0
        self._lock = threading.Lock()

    @contextmanager
    def held(self, context: grpc.ServicerContext):
        if not self._free.acquire(blocking=False):
            remaining = context.time_remaining()
            wait = self.GRACE_S if remaining is None else max(0.0, min(self.GRACE_S, remaining))
            with self._lock:
                waiting = self._waiting < self.MAX_WAITERS
                self._waiting += waiting
            try:
                got = waiting and self._free.acquire(timeout=wait)
            finally:
                with self._lock:
                    self._waiting -= waiting
            if not got:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the server is busy: all {self.size} work slots are taken (its --workers); retry later")
        try:
            yield
        finally:
            self._free.release()


class _Malformed:
    """A request message whose bytes did not parse: gRPC would answer INTERNAL ("Exception
    deserializing request!"); the handler answers INVALID_ARGUMENT instead."""

    def __init__(self, type_name: str, error: BaseException):
        self.message = f"request bytes are not a valid {type_name} message ({type(error).__name__}: {error})"


def _tolerant(parse, type_name: str):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or our reader's checks
            return _Malformed(type_name, exc)
    return deserialize


@contextmanager
def _no_slot(context):
    yield


def _guarded(behaviour, client_streaming: bool, server_streaming: bool, slot):
    """`behaviour` behind a check that answers INVALID_ARGUMENT for a request that did not parse,
    holding a work slot (`slot(context)`, a context manager) while it runs."""
    def check(request, context):
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return request

    if client_streaming:
        def requests(iterator, context):
            for request in iterator:
                yield check(request, context)
        if server_streaming:
            def handler(iterator, context):
                with slot(context):
                    yield from behaviour(requests(iterator, context), context)
        else:
            def handler(iterator, context):
                with slot(context):
                    return behaviour(requests(iterator, context), context)
    elif server_streaming:
        def handler(request, context):
            request = check(request, context)
            with slot(context):
                yield from behaviour(request, context)
    else:
        def handler(request, context):
            request = check(request, context)
            with slot(context):
                return behaviour(request, context)
    return handler


def add_servicer(server: grpc.Server, service: ServiceDescriptor, servicer, slots: WorkSlots | None = None) -> str:
    """Serve `servicer` (a subclass of the generated *Servicer) for `service`; returns its full name.
    Calls other than LIGHT_METHODS each hold one of `slots` while they run."""
    handlers = {}
    for method in service.methods:
        request_cls = GetMessageClass(method.input_type)
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        parse = request_reader(request_cls) if takes_input_batch(request_cls) else request_cls.FromString
        light = slots is None or f"{service.full_name}/{method.name}" in LIGHT_METHODS
        behaviour = _guarded(getattr(servicer, method.name), method.client_streaming, method.server_streaming,
                             _no_slot if light else slots.held)
        handlers[method.name] = make(behaviour, request_deserializer=_tolerant(parse, method.input_type.full_name),
                                     response_serializer=serialize_response)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    return service.full_name
