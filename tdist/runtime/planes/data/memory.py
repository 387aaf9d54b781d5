"""An in-memory data plane for unit tests of the layers above (request plane, worker).

Same API and error behaviour as DataPlane, no I/O: references name tensors in a dict shared by
every InMemoryDataPlane of the process (so a "producer" plane and a "consumer" plane in one
test can talk). Leases are honoured on decode.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import numpy as np

from tdist.errors import DataPlaneError
from tdist.runtime.config import DataPlaneConfig
from tdist.runtime.tensors import as_array, dtype_name, tensor_from_wire, tensor_to_wire

from .refs import is_ref

_STORE: dict[str, tuple[np.ndarray, float]] = {}


class InMemoryDataPlane:
    def __init__(self, config: DataPlaneConfig | None = None, *, host: str = "127.0.0.1") -> None:
        self.config = config or DataPlaneConfig()
        self.host = host
        self._mine: set[str] = set()

    async def start(self) -> None:
        return None

    async def encode(self, value: Any) -> dict[str, Any]:
        arr = as_array(value)
        wire = tensor_to_wire(arr)
        if self.config.kind == "inline" or len(wire["data"]) <= self.config.inline_threshold_bytes:
            return wire
        ref_id = secrets.token_urlsafe(24)
        expires = time.time() + self.config.lease_s
        _STORE[ref_id] = (tensor_from_wire(wire), expires)
        self._mine.add(ref_id)
        return {"ref": {"id": ref_id, "uri": f"mem://{ref_id}", "dtype": dtype_name(arr.dtype), "shape": list(arr.shape),
                        "memory": "cpu", "nbytes": len(wire["data"]), "expires_at": expires}}

    async def decode(self, wire: dict[str, Any]) -> Any:
        if not is_ref(wire):
            return tensor_from_wire(wire)
        ref_id = str(wire["ref"].get("id"))
        item = _STORE.pop(ref_id, None)
        if item is None:
            raise DataPlaneError("unknown, released or expired tensor reference")
        if time.time() > item[1]:
            raise DataPlaneError("tensor reference expired")
        return item[0]

    async def release(self, wire: dict[str, Any]) -> None:
        if is_ref(wire):
            _STORE.pop(str(wire["ref"].get("id")), None)

    async def close(self) -> None:
        for ref_id in self._mine:
            _STORE.pop(ref_id, None)
        self._mine.clear()

    @property
    def stored(self) -> int:
        return sum(1 for r in self._mine if r in _STORE)
