"""Checks of the Python arguments that become request fields: a wrong one is a TypeError or
ValueError naming the argument, before protobuf's own message ("Value out of range: 1099511627776",
which names no field) or a server round trip."""
from __future__ import annotations

import numpy as np

INT32_MAX = 2 ** 31 - 1
INT64_MAX = 2 ** 63 - 1
UINT64_MAX = 2 ** 64 - 1


def check_int(value, what: str, minimum: int | None = None, maximum: int = INT32_MAX) -> int:
    """``value`` as an int (a Python or numpy integer, not a bool) within [minimum, maximum]; without a
    ``minimum``, within what the field's type holds (signed, or unsigned for UINT64_MAX): the server
    judges the rest, naming the field and what is allowed."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if minimum is None:
        minimum = 0 if maximum == UINT64_MAX else -maximum - 1
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{what} must be <= {maximum}, got {value}")
    return int(value)


def check_bool(value, what: str) -> bool:
    """``value`` as a bool (a Python or numpy bool; 'no' is not False)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be a bool, got {value!r}")
    return bool(value)
