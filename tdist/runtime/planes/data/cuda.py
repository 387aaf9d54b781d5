"""GPU tensors: CUDA IPC between processes on one host (torch), host staging over UCX otherwise.

Only torch is needed (cupy arrays are taken through DLPack when torch is present, else staged
to host). The IPC handle travels as plain data (no pickle): the fields of
`UntypedStorage._share_cuda_()`, rebuilt with `UntypedStorage._new_shared_cuda`. The consumer
clones the tensor at once, so the producer's copy is only lent until then (its lease is a
header-only shm segment, claimed like a CPU tensor's).
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np


def _torch() -> Any:
    try:
        import torch

        return torch
    except Exception:
        return None


def is_cuda_tensor(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return False
    if getattr(value, "is_cuda", False):
        return True
    return hasattr(value, "__cuda_array_interface__")


def _as_torch(value: Any) -> Any:
    torch = _torch()
    if torch is None:
        raise RuntimeError("torch missing")
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_dlpack(value)


def to_host(value: Any) -> np.ndarray:
    if getattr(value, "is_cuda", False):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes

            return t.view(_torch().int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    get = getattr(value, "get", None)  # cupy
    if get is not None:
        return np.asarray(get())
    return np.asarray(value)


def nbytes(value: Any) -> int:
    if hasattr(value, "element_size"):
        return int(value.numel() * value.element_size())
    return int(getattr(value, "nbytes", 0))


def device_available() -> bool:
    torch = _torch()
    return bool(torch is not None and torch.cuda.is_available())


def can_open_ipc() -> bool:
    return device_available()


_TORCH_TO_WIRE = {
    "torch.bool": "bool", "torch.int8": "int8", "torch.int16": "int16", "torch.int32": "int32",
    "torch.int64": "int64", "torch.uint8": "uint8", "torch.uint16": "uint16", "torch.uint32": "uint32",
    "torch.uint64": "uint64", "torch.float16": "float16", "torch.float32": "float32",
    "torch.float64": "float64", "torch.bfloat16": "bfloat16",
}


def snapshot(value: Any) -> Any:
    """A private contiguous copy on the same device (the producer may change its tensor)."""
    if _torch() is None:
        raise RuntimeError("GPU tensors need torch on the producer")
    return _as_torch(value).detach().contiguous().clone()


def describe(t: Any) -> tuple[str, tuple[int, ...], int]:
    name = _TORCH_TO_WIRE.get(str(t.dtype))
    if name is None:
        from tdist.errors import BadRequest

        raise BadRequest(f"GPU dtype {t.dtype} cannot be sent")
    return name, tuple(int(s) for s in t.shape), nbytes(t)


def ipc_handle(t: Any) -> bytes:
    storage = t.untyped_storage()
    fields = storage._share_cuda_()
    return msgpack.packb(
        {"fields": list(fields), "offset": int(t.storage_offset()), "stride": list(t.stride()), "device": int(t.device.index or 0)},
        use_bin_type=True,
    )


def open_ipc(handle: bytes, dtype: str, shape: tuple[int, ...]) -> Any:
    """The tensor behind an IPC handle, cloned into this process's own memory."""
    torch = _torch()
    info = msgpack.unpackb(handle, raw=False)
    storage = torch.UntypedStorage._new_shared_cuda(*info["fields"])
    tdtype = getattr(torch, dtype)
    with torch.cuda.device(info["device"]):
        t = torch.empty((0,), dtype=tdtype, device=f"cuda:{info['device']}")
        t.set_(storage, info["offset"], shape, info["stride"])
        out = t.clone()
        torch.cuda.current_stream().synchronize()
    return out


def host_bytes(t: Any) -> np.ndarray:
    """The tensor's bytes on the host (UCX path to another host)."""
    torch = _torch()
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)
    return flat.cpu().numpy()


def to_device(arr: np.ndarray) -> Any:
    torch = _torch()
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).cuda()
    return torch.from_numpy(np.ascontiguousarray(arr)).cuda()
