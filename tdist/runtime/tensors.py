"""Tensors on the wire, inline: pure encode/decode, no I/O.

A tensor travels as {"dtype": name, "shape": [...], "data": bytes}. Names are numpy's
(`float32`, `int64`, `bool`, ...) plus `bfloat16` (through ml_dtypes) and `bytes` for arrays of
byte strings / str (KServe's BYTES: each element as a 4-byte little-endian length + payload).
The data plane (planes/data) replaces big tensors by references; this module is its inline path.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Any

import numpy as np

from tdist.errors import BadRequest

try:  # bfloat16 for numpy; optional but present with the base install
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - ml_dtypes missing
    _BF16 = None

_LITTLE = sys.byteorder == "little"

NUMERIC_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)


_NAME_OF: dict[np.dtype, str] = {np.dtype(n): n for n in NUMERIC_DTYPES}
_DTYPE_OF: dict[str, np.dtype] = {n: np.dtype(n).newbyteorder("<") if np.dtype(n).itemsize > 1 else np.dtype(n) for n in NUMERIC_DTYPES}


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype; raises BadRequest for dtypes that cannot travel."""
    name = _NAME_OF.get(dtype)  # fast path: native numeric dtypes
    if name is not None:
        return name
    dtype = np.dtype(dtype)
    if _BF16 is not None and dtype == _BF16:
        return "bfloat16"
    if dtype.kind in ("O", "S", "U"):
        return "bytes"
    name = dtype.name
    if name in NUMERIC_DTYPES:
        return name
    raise BadRequest(f"dtype {dtype} cannot be sent; use one of {', '.join(NUMERIC_DTYPES)}, bfloat16 or bytes")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a wire name (inverse of dtype_name for numeric types)."""
    if name == "bfloat16":
        if _BF16 is None:
            raise BadRequest("bfloat16 tensor received but ml_dtypes is not installed")
        return _BF16
    if name == "bytes":
        return np.dtype(object)
    try:
        return _DTYPE_OF[name]  # wire byte order is little-endian whatever the host
    except KeyError:
        raise BadRequest(f"unknown tensor dtype {name!r}") from None


def _encode_bytes_elements(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        if isinstance(item, str):
            item = item.encode()
        elif not isinstance(item, (bytes, bytearray)):
            item = str(item).encode()
        parts.append(struct.pack("<I", len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def _decode_bytes_elements(data: bytes, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    view = memoryview(data)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise BadRequest("truncated bytes tensor")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise BadRequest("bytes tensor has trailing data")
    return out


def as_array(value: Any) -> np.ndarray:
    """Accept numpy arrays, scalars, (nested) lists, and objects with __array__ (torch on CPU)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, str)):
        return np.array([value], dtype=object)
    return np.asarray(value)


def tensor_nbytes(arr: np.ndarray) -> int:
    return int(arr.nbytes) if arr.dtype.kind not in ("O", "S", "U") else sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in arr.reshape(-1))


def tensor_to_wire(value: Any) -> dict[str, Any]:
    """Encode one array inline. Non-contiguous arrays are copied to C order first."""
    arr = as_array(value)
    name = dtype_name(arr.dtype)
    if name == "bytes":
        data = _encode_bytes_elements(arr)
    else:
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        data = np.ascontiguousarray(arr).tobytes()
    return {"dtype": name, "shape": list(arr.shape), "data": data}


def tensor_from_wire(wire: dict[str, Any]) -> np.ndarray:
    """Decode one inline tensor into a writable numpy array with the sent shape and dtype."""
    try:
        name = wire["dtype"]
        shape = tuple(int(s) for s in wire["shape"])
        data = wire["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"malformed tensor: {exc}") from None
    count = math.prod(shape)
    if name == "bytes":
        return _decode_bytes_elements(bytes(data), count).reshape(shape)
    dtype = numpy_dtype(name)
    if len(data) != count * dtype.itemsize:
        raise BadRequest(f"tensor data is {len(data)} bytes, expected {count * dtype.itemsize} for {name}{list(shape)}")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if _LITTLE or dtype.itemsize == 1:
        return arr.copy()  # writable, owns its memory
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)
