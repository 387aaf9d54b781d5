"""KServe v2 tensors on the wire, pure: datatype names, JSON data, raw/binary bytes.

Apart from I/O (convention 8) so HTTP and gRPC share one conversion and it is unit-testable;
errors are KServeError, which both protocols know how to answer.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

_BF16: Any = None
try:
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover
    pass

KSERVE_TO_NUMPY = {
    "BOOL": np.dtype(bool), "INT8": np.dtype("int8"), "INT16": np.dtype("int16"), "INT32": np.dtype("int32"),
    "INT64": np.dtype("int64"), "UINT8": np.dtype("uint8"), "UINT16": np.dtype("uint16"),
    "UINT32": np.dtype("uint32"), "UINT64": np.dtype("uint64"), "FP16": np.dtype("float16"),
    "FP32": np.dtype("float32"), "FP64": np.dtype("float64"), "BYTES": np.dtype(object),
}  # fmt: skip
if _BF16 is not None:
    KSERVE_TO_NUMPY["BF16"] = _BF16


class KServeError(Exception):
    """An error answer: HTTP status + gRPC status code name + message."""

    def __init__(self, http_status: int, grpc_code: str, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc_code
        self.message = message


def bad(message: str) -> KServeError:
    return KServeError(400, "INVALID_ARGUMENT", message)


def kserve_datatype(arr: np.ndarray) -> str:
    if arr.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    if _BF16 is not None and arr.dtype == _BF16:
        return "BF16"
    for name, dt in KSERVE_TO_NUMPY.items():
        if name not in ("BYTES", "BF16") and dt == arr.dtype:
            return name
    raise KServeError(500, "INTERNAL", f"output dtype {arr.dtype} has no KServe datatype")


def numpy_of(datatype: Any) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in KSERVE_TO_NUMPY:
        raise bad(f"unsupported datatype {datatype!r}; use one of {', '.join(KSERVE_TO_NUMPY)}")
    return KSERVE_TO_NUMPY[datatype]


#: Limits on a shape, checked before anything is allocated: numpy's own dimension limits.
MAX_DIMS = 32
MAX_DIM = 2**31 - 1


def element_count(shape: Any) -> int:
    """Elements of a tensor of `shape` (a list of non-negative ints), in exact integers; 400 otherwise.

    Checked before any allocation, so a shape of 50,000,000 with one element is a client error,
    not a 50-million-slot array.
    """
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
        raise bad(f"shape must be a list of at most {MAX_DIMS} integers (got {str(shape)[:80]})")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DIM:
            raise bad(f"shape {str(list(shape))[:80]}: every dimension must be an integer from 0 to {MAX_DIM}")
    return math.prod(shape)


def serialize_bytes(arr: np.ndarray) -> bytes:
    """BYTES tensor → 4-byte little-endian length + payload per element (KServe/Triton raw form)."""
    parts = []
    for item in arr.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def deserialize_bytes(data: Any, count: int) -> np.ndarray:
    """Raw BYTES (length-prefixed elements) → object array; the count is checked against the
    data's length before the array is allocated (each element takes at least 4 bytes)."""
    if count * 4 > len(data):
        raise bad(f"BYTES tensor of {count} elements needs at least {count * 4} bytes; got {len(data)}")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(data):
            raise bad("truncated BYTES tensor")
        (n,) = struct.unpack_from("<I", data, pos)
        if pos + 4 + n > len(data):
            raise bad(f"BYTES element {i} claims {n} bytes; only {len(data) - pos - 4} remain")
        out[i] = bytes(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if pos != len(data):
        raise bad(f"BYTES tensor has {len(data) - pos} bytes of trailing data")
    return out


def tensor_from_raw(datatype: Any, shape: Any, raw: Any) -> np.ndarray:
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count).reshape(shape)
    dt = numpy_of(datatype)
    if len(raw) != count * dt.itemsize:
        raise bad(f"raw data is {len(raw)} bytes; {datatype}{list(shape)} needs {count * dt.itemsize}")
    return np.frombuffer(raw, dtype=dt.newbyteorder("<") if dt.itemsize > 1 else dt).reshape(shape).astype(dt)


def _flatten(data: Any, limit: int) -> list[Any]:
    """Nested JSON lists → flat list, iteratively (no recursion limit), refused past `limit` elements."""
    if not isinstance(data, list):
        data = [data]
    if not any(isinstance(x, list) for x in data):
        flat = data
    else:
        flat, stack = [], [iter(data)]
        while stack:
            for x in stack[-1]:
                if isinstance(x, list):
                    stack.append(iter(x))
                    break
                flat.append(x)
                if len(flat) > limit:
                    break
            else:
                stack.pop()
                continue
            if len(flat) > limit:
                break
    if len(flat) != limit:
        raise bad(f"data has {'more than ' + str(limit) if len(flat) > limit else len(flat)} elements; the shape says {limit}")
    return flat


_KINDS = {"b": "BOOL", "i": "INT", "u": "UINT", "f": "FP"}


def tensor_from_json(datatype: Any, shape: Any, data: Any) -> np.ndarray:
    """JSON `data` (flat or nested, as KServe allows) → array; element count and element types
    are checked against the shape and datatype before the tensor is built."""
    count = element_count(shape)
    if datatype == "BYTES":
        flat = _flatten(data, count)
        out = np.empty(count, dtype=object)
        for i, x in enumerate(flat):
            if not isinstance(x, str):
                raise bad(f"BYTES data must be strings (element {i} is {type(x).__name__})")
            out[i] = x.encode()
        return out.reshape(shape)
    dt = numpy_of(datatype)
    flat = _flatten(data, count)
    try:
        found = np.array(flat)
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad(f"data does not fit {datatype}{list(shape)}: {exc}") from None
    if count and not _fits(found.dtype.kind, datatype):
        raise bad(f"data does not fit {datatype}{list(shape)}: elements must be "
                  f"{'true/false' if datatype == 'BOOL' else 'integers' if dt.kind in 'iu' else 'numbers'}")
    try:
        if dt.kind in "iu" and count:
            info = np.iinfo(dt)
            if int(found.min()) < info.min or int(found.max()) > info.max:
                raise bad(f"data does not fit {datatype}: values must lie in [{info.min}, {info.max}]")
        arr = found.astype(np.float32 if datatype == "BF16" else dt)
        return arr.astype(dt).reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad(f"data does not fit {datatype}{list(shape)}: {exc}") from None


def _fits(kind: str, datatype: str) -> bool:
    if datatype == "BOOL":
        return kind == "b"
    if datatype.startswith(("INT", "UINT")):
        return kind in "iu"
    return kind in "iuf"  # FP16/32/64, BF16


def tensor_to_raw(arr: np.ndarray) -> bytes:
    if arr.dtype.kind in ("O", "S", "U"):
        return serialize_bytes(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


def tensor_to_json(arr: np.ndarray) -> list[Any]:
    if arr.dtype.kind in ("O", "S", "U"):
        out = []
        for x in arr.reshape(-1):
            if isinstance(x, (bytes, bytearray)):
                try:
                    x = bytes(x).decode()
                except UnicodeDecodeError:
                    x = bytes(x).decode("latin-1")
            out.append(str(x))
        return out
    if _BF16 is not None and arr.dtype == _BF16:
        arr = arr.astype(np.float32)
    return arr.reshape(-1).tolist()


def wire_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Response parameters a KServe client can read (scalars only)."""
    return {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))}
