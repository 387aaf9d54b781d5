"""Data plane: tensors inline when small, by reference (shared memory / CUDA IPC on one host,
UCX across hosts) when big. One plane per process:

    plane = make_data_plane(config, host="10.0.0.5")
    await plane.start()
    wire = await plane.encode(array)      # msgpack-able dict (inline or {"ref": {...}})
    array = await plane.decode(wire)      # in any process with its own plane
    await plane.release(wire)             # unread references (the lease frees them anyway)
    await plane.close()
"""

from __future__ import annotations

from typing import Any, Protocol

from tdist.runtime.config import DataPlaneConfig

from .memory import InMemoryDataPlane
from .plane import DataPlane
from .refs import Ref, host_id, is_ref

__all__ = ["DataPlane", "DataPlaneProtocol", "InMemoryDataPlane", "Ref", "host_id", "is_ref", "make_data_plane"]


class DataPlaneProtocol(Protocol):
    async def start(self) -> None: ...
    async def encode(self, value: Any) -> dict[str, Any]: ...
    async def decode(self, wire: dict[str, Any]) -> Any: ...
    async def release(self, wire: dict[str, Any]) -> None: ...
    async def close(self) -> None: ...


def make_data_plane(config: DataPlaneConfig, *, host: str = "127.0.0.1") -> DataPlane:
    """The process's data plane for `config` (kind auto | inline | ucx | shm)."""
    return DataPlane(config, host=host)
