"""Tensor codec used by the request plane: the data plane when present, else inline only.

The data plane package (planes/data) moves big tensors out of band and returns references;
without it (or with `data_plane: inline`) every tensor rides inside the NATS message and a
message over the server's max_payload is a typed PayloadTooLarge.
"""

from __future__ import annotations

from typing import Any, Protocol

from tdist.errors import DataPlaneError
from tdist.runtime.config import DataPlaneConfig
from tdist.runtime.tensors import tensor_from_wire, tensor_to_wire


class TensorCodec(Protocol):
    async def start(self) -> None: ...
    async def encode(self, array: Any) -> dict[str, Any]: ...
    async def decode(self, wire: dict[str, Any]) -> Any: ...
    async def release(self, wire: dict[str, Any]) -> None: ...
    async def close(self) -> None: ...


class InlineCodec:
    """Every tensor inline. References from other processes cannot be resolved here."""

    async def start(self) -> None:
        pass

    async def encode(self, array: Any) -> dict[str, Any]:
        return tensor_to_wire(array)

    async def decode(self, wire: dict[str, Any]) -> Any:
        if "ref" in wire:
            raise DataPlaneError(
                "received a tensor reference but this process has no data plane (data_plane: inline)"
            )
        return tensor_from_wire(wire)

    async def release(self, wire: dict[str, Any]) -> None:
        pass

    async def close(self) -> None:
        pass


def make_codec(config: DataPlaneConfig, *, host: str = "127.0.0.1") -> TensorCodec:
    """The data plane for `config`; inline when asked for or when the data plane is not installed."""
    if config.kind == "inline":
        return InlineCodec()
    try:
        from tdist.runtime.planes.data import make_data_plane
    except ImportError:
        return InlineCodec()
    return make_data_plane(config, host=host)


async def encode_tensors(codec: TensorCodec, tensors: dict[str, Any]) -> dict[str, Any]:
    return {name: await codec.encode(arr) for name, arr in tensors.items()}


async def decode_tensors(codec: TensorCodec, wires: dict[str, Any]) -> dict[str, Any]:
    return {name: await codec.decode(w) for name, w in wires.items()}
