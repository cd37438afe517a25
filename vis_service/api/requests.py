"""Requests whose large raw inputs are read where they were received.

Parsing a request copies a raw input's bytes into the message, and reading its
``raw_contents`` copies them again (upb hands out a new bytes object): ~2 ms for a
4.8 MB batch, next to a 28 ms SqueezeNet run. For a large request (one carrying raw
inputs of at least `IN_PLACE_MIN_BYTES`), `request_reader` parses the request without
those bytes and hands the servicer a `RequestView`: the message, except that
``input.tensors[i].raw_contents`` is a read-only memoryview of the received bytes.
The client writes requests the same way (``vis_client/wire.py``). Anything this
reader does not expect on the wire (a field repeated where protobuf would merge or
replace it, a wire type it does not know) is left to the protobuf parser.
"""
from __future__ import annotations

from typing import Callable

from google.protobuf.message import Message

from ..gen import vis_pb2
from .tensors import _varint

IN_PLACE_MIN_BYTES = 64 << 10

_INPUT_TENSORS = vis_pb2.InputBatch.DESCRIPTOR.fields_by_name["tensors"].number
_RAW_CONTENTS = vis_pb2.Tensor.DESCRIPTOR.fields_by_name["raw_contents"].number


class _View:
    """A message with some attributes replaced; the rest are the message's own."""
    __slots__ = ("_message", "_replaced")

    def __init__(self, message: Message, replaced: dict):
        self._message = message
        self._replaced = replaced

    def __getattr__(self, name):
        replaced = self._replaced
        return replaced[name] if name in replaced else getattr(self._message, name)


class RequestView(_View):
    """A request whose ``input`` is an InputBatch view (tensors with in-place ``raw_contents``)."""
    __slots__ = ()


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    # (the client's wire.py has its own: the client never imports the server)
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


# Most fields this reader walks in one request, all levels together (a real request has a few
# per level, an InputBatch one per image or tensor): past that, protobuf's C parser takes the
# request rather than a Python loop over, say, millions of one-byte fields.
_MAX_FIELDS = 4096


def _fields(b: bytes, start: int, end: int, budget: list[int]):
    """(field number, wire type, key start, value start, value end) of each field in b[start:end];
    ValueError on an encoding this reader does not walk, or once the request's field `budget` (a
    one-element counter shared by all levels) is spent."""
    i = start
    while i < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError("too many fields")
        key_start = i
        key, i = _read_varint(b, i)
        wire_type = key & 7
        value_start = i
        if wire_type == 0:
            _, i = _read_varint(b, i)
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        elif wire_type == 2:
            length, value_start = _read_varint(b, i)
            i = value_start + length
        else:
            raise ValueError(f"wire type {wire_type}")
        if i > end:
            raise ValueError("field runs past its message")
        yield key >> 3, wire_type, key_start, value_start, i


def _split(b: bytes, input_field: int):
    """(wire bytes of the request without the large raw_contents fields, {tensor index: memoryview
    of its raw bytes}); None when there is nothing to take out or the layout is not the plain one."""
    budget = [_MAX_FIELDS]
    inputs = [f for f in _fields(b, 0, len(b), budget) if f[0] == input_field]
    if len(inputs) != 1 or inputs[0][1] != 2:
        return None  # no input, or one in several pieces that protobuf would merge
    _, _, input_key, batch_start, batch_end = inputs[0]
    view = memoryview(b)
    payloads: dict[int, memoryview] = {}
    batch_parts: list = []
    at = batch_start
    index = 0
    for number, wire_type, key_start, start, end in _fields(b, batch_start, batch_end, budget):
        if number != _INPUT_TENSORS or wire_type != 2:
            continue
        raw = [f for f in _fields(b, start, end, budget) if f[0] == _RAW_CONTENTS]
        if len(raw) > 1:
            return None  # protobuf keeps the last one: leave it to the parser
        if raw and raw[0][1] == 2 and raw[0][4] - raw[0][3] >= IN_PLACE_MIN_BYTES:
            _, _, cut_start, data_start, data_end = raw[0]
            payloads[index] = view[data_start:data_end]
            body = [b[start:cut_start], b[data_end:end]]  # the tensor's other fields
            body_length = len(body[0]) + len(body[1])
            key_end = _read_varint(b, key_start)[1]
            batch_parts += [b[at:key_start], b[key_start:key_end], _varint(body_length)] + body
            at = end
        index += 1
    if not payloads:
        return None
    batch_parts.append(b[at:batch_end])
    batch_length = sum(len(p) for p in batch_parts)
    key_end = _read_varint(b, input_key)[1]
    stripped = b"".join([b[:input_key], b[input_key:key_end], _varint(batch_length)] + batch_parts + [b[batch_end:]])
    return stripped, payloads


def request_reader(request_cls) -> Callable[[bytes], Message]:
    """A request deserializer for `request_cls` (a message with an ``input`` InputBatch): the parsed
    message, or for a request with large raw inputs a `RequestView` of the message parsed without
    their bytes."""
    input_field = request_cls.DESCRIPTOR.fields_by_name["input"].number

    def read(b: bytes):
        if len(b) >= IN_PLACE_MIN_BYTES:
            try:
                split = _split(b, input_field)
            except (IndexError, ValueError):
                split = None  # not walkable: the parser says what is wrong with it
            if split is not None:
                stripped, payloads = split
                message = request_cls.FromString(stripped)
                batch = message.input
                tensors = [_View(t, {"raw_contents": payloads[i]}) if i in payloads else t
                           for i, t in enumerate(batch.tensors)]
                return RequestView(message, {"input": _View(batch, {"tensors": tensors})})
        return request_cls.FromString(b)

    return read


def takes_input_batch(request_cls) -> bool:
    field = request_cls.DESCRIPTOR.fields_by_name.get("input")
    return field is not None and field.message_type is vis_pb2.InputBatch.DESCRIPTOR
