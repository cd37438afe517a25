"""Errors raised by the library layers (graph, engine, runtime, methods).

They carry no gRPC dependency: the API layer maps each class to one status code,
so every layer below it can say *what* went wrong in plain terms.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class VisError(Exception):
    """Base class; `code` names the gRPC status the API layer answers with."""

    code = "INTERNAL"


class InvalidArgument(VisError):
    """A request field holds a value that is not allowed.

    The message must name the field and say what is allowed.
    """

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")


class NotFound(VisError):
    """A named thing (model, layer, tensor) does not exist; suggests close matches."""

    code = "NOT_FOUND"

    def __init__(self, kind: str, name: str, candidates: Iterable[str] = (), limit: int = 5):
        candidates = list(dict.fromkeys(candidates))   # once each, in order
        self.kind = kind
        self.name = name
        self.suggestions = close_matches(name, candidates, limit)
        msg = f"{kind} {shorten(name)} not found"
        if self.suggestions:
            msg += "; did you mean " + ", ".join(repr(s) for s in self.suggestions) + "?"
        elif candidates:
            shown = ", ".join(repr(c) for c in candidates[:limit])
            msg += f"; known: {shown}" + (" ..." if len(candidates) > limit else "")
        super().__init__(msg)


class Unimplemented(VisError):
    """Something the model needs is not supported (e.g. an op without a backward rule)."""

    code = "UNIMPLEMENTED"


class ResourceExhausted(VisError):
    """A configured limit (size, batch, cache) would be exceeded."""

    code = "RESOURCE_EXHAUSTED"


class AlreadyExists(VisError):
    """A name is taken by something that must keep it (e.g. a model repository entry)."""

    code = "ALREADY_EXISTS"


class PermissionDenied(VisError):
    """The caller may not do this from where it is (e.g. shared memory from another host)."""

    code = "PERMISSION_DENIED"


class FailedPrecondition(VisError):
    """The request is valid but the model/server state does not allow it."""

    code = "FAILED_PRECONDITION"


class Cancelled(VisError):
    """The client went away or cancelled; long loops raise this to stop promptly."""

    code = "CANCELLED"


def shorten(text: str, limit: int = 120) -> str:
    """repr of a caller's string for a message: a 100 kB name echoed whole would make the status
    too large for gRPC's metadata (the client then sees RESOURCE_EXHAUSTED, not the error)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


ID_PREFIX = "sha256:"   # models' content ids (models.store)


def close_matches(name: str, candidates: Iterable[str], limit: int = 5) -> list[str]:
    """Closest candidate names: difflib ratio first, then substring hits. A content id (sha256:<hex>)
    is close only to an id sharing its first hex digits (a shortened or mistyped id): any two ids
    share their 'sha256:' prefix, which made every unknown id 'did you mean' another one."""
    candidates = list(dict.fromkeys(candidates))
    if name.startswith(ID_PREFIX):
        stem = name[:len(ID_PREFIX) + 4]
        return [c for c in candidates if c.startswith(stem)][:limit]
    candidates = [c for c in candidates if not c.startswith(ID_PREFIX)]
    found = difflib.get_close_matches(name, candidates, n=limit, cutoff=0.5)
    if len(found) < limit:
        low = name.lower()
        for c in candidates:
            if c not in found and (low in c.lower() or c.lower() in low) and c:
                found.append(c)
                if len(found) >= limit:
                    break
    return found
