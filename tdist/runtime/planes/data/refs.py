"""Tensor references on the wire: pure building/parsing, host identity, process liveness.

A big tensor stays with its producer; the message carries {"ref": {...}} instead:

    id          unguessable (secrets.token_urlsafe), names the tensor at its producer
    uri         "ucp://host:port/<id>" when the producer serves it over UCX, else "shm://<name>"
    shm         name of the /dev/shm segment holding it (same-host fast path), with shm_token
    cuda_ipc    a CUDA IPC handle (GPU tensors, same host), with shm/shm_token as its lease
    dtype, shape, nbytes, memory ("cpu" | "cuda"), expires_at (unix time)
    host_id, pid, pid_start   who produced it: same host_id ⇒ shm/IPC usable, pid ⇒ liveness

Everything is msgpack-able (str, int, float, bytes, lists). No I/O besides reading /proc.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tdist.errors import DataPlaneError

REF_VERSION = 1
SHM_DIR = "/dev/shm"
SHM_PREFIX = "tdist-dp-"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """Who can share memory with whom: same boot, same hostname, same /dev/shm mount, same pid
    namespace. Two containers on one machine differ (hostname, /dev/shm mount) and fall back to UCX."""
    try:
        st = os.stat(SHM_DIR)
        shm = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        shm = "-"
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = "-"
    raw = "|".join((_read("/proc/sys/kernel/random/boot_id"), socket.gethostname(), shm, pidns))
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def is_ref(wire: Any) -> bool:
    return isinstance(wire, dict) and isinstance(wire.get("ref"), dict)


@dataclass(frozen=True)
class Ref:
    """A parsed reference (see module docstring)."""

    id: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    memory: str
    expires_at: float
    uri: str
    host_id: str
    pid: int
    pid_start: int | None
    shm: str | None = None
    shm_token: bytes | None = None
    cuda_ipc: bytes | None = None

    @property
    def ucx_address(self) -> tuple[str, int] | None:
        """(host, port) when the producer serves this reference over UCX."""
        if not self.uri.startswith("ucp://"):
            return None
        parts = urlsplit(self.uri)
        if parts.hostname is None or parts.port is None:
            raise DataPlaneError(f"malformed tensor reference uri {self.uri!r}")
        return parts.hostname, parts.port

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": REF_VERSION,
            "id": self.id,
            "uri": self.uri,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "memory": self.memory,
            "expires_at": self.expires_at,
            "host_id": self.host_id,
            "pid": self.pid,
            "pid_start": self.pid_start,
        }
        if self.shm is not None:
            body["shm"] = self.shm
            body["shm_token"] = self.shm_token
        if self.cuda_ipc is not None:
            body["cuda_ipc"] = self.cuda_ipc
        return {"ref": body}

    @staticmethod
    def from_wire(wire: dict[str, Any]) -> "Ref":
        body = wire.get("ref") if isinstance(wire, dict) else None
        if not isinstance(body, dict):
            raise DataPlaneError("not a tensor reference", detail={"got": type(wire).__name__})
        try:
            ref = Ref(
                id=str(body["id"]),
                dtype=str(body["dtype"]),
                shape=tuple(int(s) for s in body["shape"]),
                nbytes=int(body["nbytes"]),
                memory=str(body.get("memory", "cpu")),
                expires_at=float(body["expires_at"]),
                uri=str(body["uri"]),
                host_id=str(body.get("host_id", "")),
                pid=int(body.get("pid", 0)),
                pid_start=None if body.get("pid_start") is None else int(body["pid_start"]),
                shm=None if body.get("shm") is None else str(body["shm"]),
                shm_token=None if body.get("shm_token") is None else bytes(body["shm_token"]),
                cuda_ipc=None if body.get("cuda_ipc") is None else bytes(body["cuda_ipc"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataPlaneError(f"malformed tensor reference: {exc!r}", detail={"ref": _safe(body)}) from None
        if ref.shm is not None and (not ref.shm.startswith(SHM_PREFIX) or "/" in ref.shm):
            raise DataPlaneError(f"malformed shared-memory name {ref.shm!r}")
        return ref


def _safe(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if isinstance(v, (str, int, float)) and k != "shm_token"}


def ucx_uri(host: str, port: int, ref_id: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"ucp://{h}:{port}/{ref_id}"
