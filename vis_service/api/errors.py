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


def _is_abort(exc: BaseException, context) -> bool:
    """True for what context.abort() raised, which must pass through: an _AbortionError, or (grpcio
    1.85, from inside a client stream's request iterator) a bare Exception after the context got
    its status; rewrapping it answered INTERNAL in place of that status."""
    if type(exc).__name__ == "_AbortionError" or isinstance(exc, grpc.RpcError):
        return True
    code = getattr(context, "code", None)
    try:
        status = code() if callable(code) else None
    except Exception:  # noqa: BLE001 - a context without the accessor
        return False
    return status is not None and status != grpc.StatusCode.OK


def handles_errors(fn):
    """Wrap a servicer method (unary or generator) so every error becomes a status."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(self, request, context):
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001
                if _is_abort(exc, context):
                    raise
                _abort(context, exc)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            if _is_abort(exc, context):
                raise
            _abort(context, exc)
    return wrapper
