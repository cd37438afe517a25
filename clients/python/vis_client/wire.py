"""Messages on the wire: stubs that also take pre-serialized requests, requests whose large raw
inputs are spliced into the wire bytes, and result chunks whose tensor bytes are read in place.

A raw input of a few MiB would otherwise be copied four times before gRPC sees it (``tobytes``,
into the message, ``SerializeToString``, into gRPC's buffers): about 7 ms of client time for a
batch of eight 224x224 images here, a quarter of what SqueezeNet's forward pass at that batch
costs the server.
Protobuf's encoding is simple enough to write such a request ourselves with the payload copied
once, straight from the array (the server does the same for result chunks,
``vis_service/api/tensors.py``). Likewise a received chunk of a large tensor is not parsed into a
message (a copy) whose ``data`` field is then read (another): its metadata is, and ``data`` is a
view of the received bytes (``read_result_chunk``).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from .gen import vis_pb2

__all__ = ["make_stub", "serialize_request", "request_with_payloads", "read_result_chunk"]


def serialize_request(request) -> bytes:
    """A message's wire bytes; bytes (a request encoded by ``request_with_payloads``) pass through."""
    return request if isinstance(request, (bytes, bytearray)) else request.SerializeToString()


def make_stub(channel, service: ServiceDescriptor) -> SimpleNamespace:
    """What the generated ``*Stub(channel)`` gives (one callable per method of `service`), with a
    request serializer that lets pre-serialized bytes through and result streams read by
    ``read_result_chunk``."""
    methods = {}
    for method in service.methods:
        output = GetMessageClass(method.output_type)
        make = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
            (method.client_streaming, method.server_streaming)]
        methods[method.name] = make(f"/{service.full_name}/{method.name}", request_serializer=serialize_request,
                                    response_deserializer=(read_result_chunk if output is vis_pb2.ResultChunk
                                                           else output.FromString),
                                    _registered_method=True)
    return SimpleNamespace(**methods)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _key(field_number: int) -> bytes:
    return _varint((field_number << 3) | 2)  # wire type 2: length-delimited


_TENSORS = _key(vis_pb2.InputBatch.DESCRIPTOR.fields_by_name["tensors"].number)
_RAW_CONTENTS = _key(vis_pb2.Tensor.DESCRIPTOR.fields_by_name["raw_contents"].number)


def request_with_payloads(request: Message, payloads: dict[int, np.ndarray]) -> bytes:
    """The wire bytes of `request` (a message with an ``input`` InputBatch) once
    ``input.tensors[i].raw_contents`` holds the bytes of ``payloads[i]`` (C-contiguous, already of the
    tensor's datatype and little-endian; the tensors' own ``raw_contents`` are empty), each payload
    copied once.

    Fields may come in any order on the wire and a repeated field's elements keep theirs, so the
    request is its other fields, then ``input``: the batch's other fields, then every tensor, each
    its other fields followed by the raw bytes.
    """
    batch = request.input
    rest_of_batch = vis_pb2.InputBatch()
    rest_of_batch.CopyFrom(batch)
    rest_of_batch.ClearField("tensors")
    parts: list = [rest_of_batch.SerializeToString()]
    for i, tensor in enumerate(batch.tensors):
        fields = tensor.SerializeToString()
        payload = payloads.get(i)
        if payload is None:
            parts += [_TENSORS, _varint(len(fields)), fields]
            continue
        data = memoryview(payload).cast("B")
        body = len(fields) + len(_RAW_CONTENTS) + len(_varint(len(data))) + len(data)
        parts += [_TENSORS, _varint(body), fields, _RAW_CONTENTS, _varint(len(data)), data]
    batch_size = sum(len(p) for p in parts)
    rest = type(request)()
    rest.CopyFrom(request)
    rest.ClearField("input")
    input_key = _key(request.DESCRIPTOR.fields_by_name["input"].number)
    return b"".join([rest.SerializeToString(), input_key, _varint(batch_size)] + parts)


# smaller chunks are parsed as usual: copying them costs less than looking at their fields here
_IN_PLACE_MIN_BYTES = 64 << 10
_RESULT_TENSOR_KEY = 0x12  # ResultChunk.tensor: field 2, length-delimited
_DATA_FIELD = vis_pb2.TensorChunk.DESCRIPTOR.fields_by_name["data"].number


class TensorChunkView:
    """A ``TensorChunk`` whose ``data`` is a memoryview of the received message; its other fields
    are those of the parsed metadata."""
    __slots__ = ("_meta", "data")

    def __init__(self, meta: vis_pb2.TensorChunk, data: memoryview):
        self._meta = meta
        self.data = data

    def __getattr__(self, name):
        return getattr(self._meta, name)


class TensorResultChunk:
    """A ``ResultChunk`` holding a :class:`TensorChunkView` (what ``collect`` reads of a message)."""
    __slots__ = ("tensor",)

    def __init__(self, tensor: TensorChunkView):
        self.tensor = tensor

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 - the protobuf method's name
        return "tensor" if group == "kind" else None


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    # (the server's api/requests.py has its own: the client never imports the server)
    value = shift = 0
    while True:
        byte = b[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _data_span(b: bytes, start: int, end: int) -> tuple[int, int, int] | None:
    """(key start, payload start, payload end) of the one ``data`` field in the TensorChunk encoded in
    b[start:end]; None if it has none or several, or an encoding this does not read."""
    found = None
    i = start
    for _ in range(64):  # a TensorChunk has eight fields; a stranger one goes to the parser
        if i >= end:
            break
        key_start = i
        key, i = _read_varint(b, i)
        wire_type = key & 7
        if wire_type == 0:
            _, i = _read_varint(b, i)
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        elif wire_type == 2:
            length, i = _read_varint(b, i)
            if key >> 3 == _DATA_FIELD:
                if found is not None:
                    return None  # repeated: protobuf keeps the last; leave that to the parser
                found = (key_start, i, i + length)
            i += length
        else:
            return None
    return found if i == end else None  # (also None when 64 fields did not reach the end)


def read_result_chunk(b: bytes):
    """A received ``ResultChunk``: parsed as usual, except a large tensor chunk, whose metadata alone
    is parsed and whose data stays where it was received (a :class:`TensorResultChunk`)."""
    if len(b) >= _IN_PLACE_MIN_BYTES and b[0] == _RESULT_TENSOR_KEY:
        try:
            length, body = _read_varint(b, 1)
            span = _data_span(b, body, body + length) if body + length == len(b) else None
        except (IndexError, ValueError):
            span = None
        if span is not None:
            key_start, data_start, data_end = span
            meta = vis_pb2.TensorChunk.FromString(b[body:key_start] + b[data_end:])
            return TensorResultChunk(TensorChunkView(meta, memoryview(b)[data_start:data_end]))
    return vis_pb2.ResultChunk.FromString(b)
