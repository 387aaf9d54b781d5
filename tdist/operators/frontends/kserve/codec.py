"""KServe v2 tensors on the wire, pure: datatype names, JSON data, raw/binary bytes.

Apart from I/O (convention 8) so HTTP and gRPC share one conversion and it is unit-testable;
errors are KServeError, which both protocols know how to answer.
"""

from __future__ import annotations

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


def numpy_of(datatype: str) -> np.dtype:
    try:
        return KSERVE_TO_NUMPY[datatype]
    except KeyError:
        raise bad(f"unsupported datatype {datatype!r}; use one of {', '.join(KSERVE_TO_NUMPY)}") from None


def serialize_bytes(arr: np.ndarray) -> bytes:
    """BYTES tensor → 4-byte little-endian length + payload per element (KServe/Triton raw form)."""
    parts = []
    for item in arr.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def deserialize_bytes(data: bytes, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(data):
            raise bad("truncated BYTES tensor")
        (n,) = struct.unpack_from("<I", data, pos)
        out[i] = bytes(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if pos != len(data):
        raise bad("BYTES tensor has trailing data")
    return out


def tensor_from_raw(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if datatype == "BYTES":
        return deserialize_bytes(raw, count).reshape(shape)
    dt = numpy_of(datatype)
    if len(raw) != count * dt.itemsize:
        raise bad(f"raw data is {len(raw)} bytes; {datatype}{shape} needs {count * dt.itemsize}")
    return np.frombuffer(raw, dtype=dt.newbyteorder("<") if dt.itemsize > 1 else dt).reshape(shape).astype(dt)


def tensor_to_raw(arr: np.ndarray) -> bytes:
    if arr.dtype.kind in ("O", "S", "U"):
        return serialize_bytes(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


def tensor_from_json(datatype: str, shape: list[int], data: Any) -> np.ndarray:
    if datatype == "BYTES":
        flat = np.array(data, dtype=object).reshape(-1)
        out = np.empty(flat.size, dtype=object)
        for i, x in enumerate(flat):
            out[i] = x.encode() if isinstance(x, str) else bytes(x)
        return out.reshape(shape)
    dt = numpy_of(datatype)
    try:
        arr = np.array(data, dtype=np.float32 if datatype == "BF16" else dt)
        return arr.astype(dt).reshape(shape)
    except (ValueError, TypeError) as exc:
        raise bad(f"data does not fit {datatype}{shape}: {exc}") from None


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
