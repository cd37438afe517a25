"""Client exceptions. Every client call raises :class:`VisError` (or a subclass) instead of
``grpc.RpcError``; the gRPC status code stays visible as ``.code``."""
from __future__ import annotations

import grpc

__all__ = ["VisError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "ResourceExhausted",
           "PermissionDenied", "Unimplemented", "Unavailable", "DeadlineExceeded", "Cancelled", "from_rpc_error"]


class VisError(Exception):
    """A failed service call: ``.code`` is the ``grpc.StatusCode``, ``.details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str = ""):
        self.code = code
        self.details = details or ""
        super().__init__(f"{code.name}: {self.details}" if self.details else code.name)


class InvalidArgument(VisError):
    """INVALID_ARGUMENT (bad request field, unknown layer name, wrong input shape, ...)."""


class NotFound(VisError):
    """NOT_FOUND (unknown model)."""


class AlreadyExists(VisError):
    """ALREADY_EXISTS (an upload named after a model repository entry)."""


class FailedPrecondition(VisError):
    """FAILED_PRECONDITION (e.g. gradients not supported by the model)."""


class ResourceExhausted(VisError):
    """RESOURCE_EXHAUSTED (message or upload too large, server busy)."""


class PermissionDenied(VisError):
    """PERMISSION_DENIED (shared memory asked for from another host)."""


class Unimplemented(VisError):
    """UNIMPLEMENTED (method, op rule or feature not available)."""


class Unavailable(VisError):
    """UNAVAILABLE (server not reachable)."""


class DeadlineExceeded(VisError):
    """DEADLINE_EXCEEDED (the client's timeout elapsed)."""


class Cancelled(VisError):
    """The call was cancelled (by the caller's ``cancel`` event or the server)."""

    def __init__(self, details: str = "cancelled"):
        super().__init__(grpc.StatusCode.CANCELLED, details)


_BY_CODE: dict[grpc.StatusCode, type[VisError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(err: grpc.RpcError) -> VisError:
    """Convert a ``grpc.RpcError`` into the matching :class:`VisError` subclass."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    code = code or grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(details or "cancelled")
    return _BY_CODE.get(code, VisError)(code, details or "")


class CliError(Exception):
    """A user-facing error of the `vis` command line: printed as one line, exit code 1. Here, not in
    cli.py: run as `python -m vis_client.cli`, that module is loaded twice (as __main__ and as the
    package's cli the subcommand modules import), and a class of its own would be two classes."""
