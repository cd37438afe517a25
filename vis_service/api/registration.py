"""Register servicers with a response serializer that lets pre-serialized bytes through.

Result streams yield tensor chunks already encoded (api/tensors.py) next to
ordinary messages; the generated `add_*Servicer_to_server` functions would call
`SerializeToString` on them. This builds the same handlers from the service
descriptor, with that difference, and with requests that carry an InputBatch read
by `requests.request_reader` (large raw inputs stay where they were received).
"""
from __future__ import annotations

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


def add_servicer(server: grpc.Server, service: ServiceDescriptor, servicer) -> str:
    """Serve `servicer` (a subclass of the generated *Servicer) for `service`; returns its full name."""
    handlers = {}
    for method in service.methods:
        request_cls = GetMessageClass(method.input_type)
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=(request_reader(request_cls) if takes_input_batch(request_cls)
                                                           else request_cls.FromString),
                                     response_serializer=serialize_response)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    return service.full_name
