"""KServe V2 / Triton datatype names <-> numpy dtypes (little-endian)."""
from __future__ import annotations

import numpy as np

NUMPY_BY_DATATYPE: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
    "INT16": np.dtype("<i2"),
    "INT8": np.dtype("i1"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DATATYPE_BY_NUMPY: dict[np.dtype, str] = {v: k for k, v in NUMPY_BY_DATATYPE.items()}


def datatype_of(dtype) -> str:
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return DATATYPE_BY_NUMPY[dt]
    except KeyError:
        raise TypeError(f"dtype {dt} has no KServe datatype; allowed: {', '.join(NUMPY_BY_DATATYPE)}") from None
