"""Library errors -> gRPC status codes; unexpected errors -> INTERNAL, server keeps serving."""
from __future__ import annotations

import functools
import inspect
import logging

import grpc

from ..errors import VisError

log = logging.getLogger(__name__)


# Status details travel in HTTP/2 trailers, which gRPC bounds (8 KiB by default): a longer message,
# e.g. one echoing a huge name a caller sent, would reach the client as RESOURCE_EXHAUSTED
# "metadata size exceeds hard limit" instead of the error.
MAX_DETAILS = 1500   # characters: at most 6000 bytes of UTF-8


def _details(text: str) -> str:
    return text if len(text) <= MAX_DETAILS else text[:MAX_DETAILS] + f"... ({len(text)} characters)"


def _abort(context: grpc.ServicerContext, exc: BaseException):
    if isinstance(exc, VisError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        context.abort(code, _details(str(exc)))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, _details(f"internal error: {type(exc).__name__}: {exc}"))


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a bare Exception subclass that must pass through
    return type(exc).__name__ == "_AbortionError" or isinstance(exc, grpc.RpcError)


def handles_errors(fn):
    """Wrap a servicer method (unary or generator) so every error becomes a status."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(self, request, context):
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001
                if _is_abort(exc):
                    raise
                _abort(context, exc)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            if _is_abort(exc):
                raise
            _abort(context, exc)
    return wrapper
