"""Request values checked against the server's limits.

A value over a limit is RESOURCE_EXHAUSTED (the request is well formed, the server will not
spend that much on it); a value that is never allowed (negative, not a number) stays
INVALID_ARGUMENT where the caller checks it. Messages name the field and the limit.
"""
from __future__ import annotations

import os

from ..errors import ResourceExhausted

# the server's --max-batch default; library callers without a server get the same bound
DEFAULT_SERVER_MAX_BATCH = 256
GiB = 1 << 30
# where the machine's memory cannot be read
FALLBACK_MEMORY_BYTES = 64 * GiB


def check_batch(field: str, value: int, limit: int, what: str) -> int:
    """`value` (already >= 0) at most the server's `limit` (--max-batch); `what` names its unit."""
    if value > limit:
        raise ResourceExhausted(f"{field}: {value} {what} exceeds the server's limit of {limit} (--max-batch)")
    return value


def physical_memory_bytes() -> int:
    """The machine's physical memory: a memory budget above it can never be honoured."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return FALLBACK_MEMORY_BYTES


def check_memory_budget(field: str, value: int) -> int:
    """An explicit memory budget (bytes, already >= 0) at most the server's physical memory."""
    limit = physical_memory_bytes()
    if value > limit:
        raise ResourceExhausted(f"{field}: {value} bytes exceeds the server's physical memory of {limit} bytes "
                                f"({limit / GiB:.1f} GiB)")
    return value
