"""The data plane: encode a tensor into something a NATS message can carry, decode it anywhere.

    inline     small tensors (≤ inline_threshold_bytes) travel in the message (tensors.py format)
    shm        same host: a pooled /dev/shm segment, mapped zero-copy by the consumer
    ucx        any host: the producer's listener serves ucp://host:port/<id>; pulled by ucxx
    auto       refs carry both (shm segment + ucp uri); the consumer picks shm when it shares
               the producer's host (host_id), UCX otherwise

A stored tensor has a lease: the consumer's decode releases it (UCX: on the ack; shm: when
the consumer's array is garbage collected), `release()` drops it unread, and the reaper
reclaims what nobody claimed within lease_s. Unknown / released / expired references and
dead producers raise DataPlaneError; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from tdist.errors import DataPlaneError
from tdist.runtime.config import DataPlaneConfig
from tdist.runtime.tensors import as_array, dtype_name, numpy_dtype, tensor_from_wire, tensor_to_wire

from . import cuda, segments, views
from tdist.runtime.process_identity import process_alive, self_identity

from .refs import Ref, host_id, is_ref, ucx_uri
from .ucx import Served, UcxClient, UcxServer
from .ucxenv import UcxRuntime, ucx_available, ucx_environment

log = logging.getLogger("tdist.data")

OFFLOAD_BYTES = 4 << 20  # copies bigger than this run in a thread (keeps the event loop live)
SWEEP_EVERY_S = 30.0
TOMBSTONES = 4096


@dataclass(eq=False)
class _Entry:
    ref: Ref
    seg: segments.Segment | None = None  # shm-backed (also the lease of a CUDA IPC entry)
    data: np.ndarray | None = None  # in-process copy, uint8 (UCX only)
    gpu: Any = None  # the producer's CUDA tensor (kept alive while lent)
    busy: bool = False


class DataPlane:
    """One per process. See the module docstring; the API is start/encode/decode/release/close."""

    def __init__(self, config: DataPlaneConfig, *, host: str = "127.0.0.1") -> None:
        self.config = config
        self.host = host
        self._entries: dict[str, _Entry] = {}
        self._tombstones: OrderedDict[str, str] = OrderedDict()
        self._pool: segments.SegmentPool | None = None
        self._server: UcxServer | None = None
        self._client: UcxClient | None = None
        self._ucx_lock = asyncio.Lock()
        self._reaper: asyncio.Task | None = None
        self._started = False
        self._closed = False
        self._last_sweep = 0.0
        self._holds_ucx = False
        self._ucx_broken = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Idempotent. kind=ucx starts the listener now; auto starts it at the first reference."""
        if self._closed:
            raise DataPlaneError("data plane is closed")
        if self._started:
            return
        self._started = True
        if self.config.kind in ("auto", "shm") and segments.shm_available():
            self._pool = segments.SegmentPool()
            views.sweep_dead()
            self._last_sweep = time.monotonic()
        elif self.config.kind == "shm":
            raise DataPlaneError(f"data_plane: shm needs a writable {segments.SHM_DIR}")
        if self.config.kind == "ucx":
            await self._ensure_server()
        self._reaper = asyncio.create_task(self._reap_forever(), name="tdist-data-reaper")

    async def close(self) -> None:
        """Stop serving, unlink this process's segments, drop every stored tensor. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except (asyncio.CancelledError, Exception):
                pass
        try:
            for part in (self._server, self._client):
                if part is not None:
                    try:
                        await asyncio.wait_for(part.close(), 15)
                    except Exception as exc:
                        log.warning("data plane: closing %s failed: %r", type(part).__name__, exc)
        finally:
            self._server = self._client = None
            if self._holds_ucx:
                self._holds_ucx = False
                UcxRuntime.release()
            if self._pool is not None:
                self._pool.close()
            self._entries.clear()
            views.evict_unlinked()

    async def __aenter__(self) -> "DataPlane":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _ucx_env(self) -> dict[str, str]:
        return ucx_environment(dict(self.config.ucx_env), self.host)

    async def _ensure_server(self) -> UcxServer:
        async with self._ucx_lock:
            if self._server is None:
                server = UcxServer(self._ucxx(), self._serve_get, self._release_local)
                server.start()
                self._server = server
        return self._server

    async def _ensure_client(self) -> UcxClient:
        async with self._ucx_lock:
            if self._client is None:
                self._client = UcxClient(self._ucxx())
        return self._client

    def _ucxx(self) -> Any:
        if not self._holds_ucx:
            module = UcxRuntime.acquire(self._ucx_env())
            self._holds_ucx = True
            return module
        return UcxRuntime.module

    # -- encode ---------------------------------------------------------------------------
    async def encode(self, value: Any) -> dict[str, Any]:
        """Inline dict under the threshold, else {"ref": {...}}; the tensor is copied (a later
        change to `value` does not change what the consumer gets)."""
        if cuda.is_cuda_tensor(value):
            if self.config.kind != "inline" and cuda.nbytes(value) > self.config.inline_threshold_bytes:
                return await self._encode_cuda(value)
            value = cuda.to_host(value)
        arr = as_array(value)
        name = dtype_name(arr.dtype)
        blob: bytes | None = None
        if name == "bytes":
            inline = tensor_to_wire(arr)
            blob = inline["data"]
            nbytes = len(blob)
        else:
            nbytes = int(arr.nbytes)
        if self.config.kind == "inline" or nbytes <= self.config.inline_threshold_bytes:
            return inline if blob is not None else tensor_to_wire(arr)
        await self.start()
        if self._closed:
            raise DataPlaneError("data plane is closed")
        src: np.ndarray | bytes = blob if blob is not None else arr
        entry = await self._store(src, name, tuple(int(s) for s in arr.shape), nbytes, "cpu")
        return entry.ref.to_wire()

    async def _maybe_server(self) -> UcxServer | None:
        """kind=ucx: the listener (errors are errors). auto: the listener when ucxx works, else
        None (same-host shm only, said once in the log)."""
        if self.config.kind == "ucx":
            return await self._ensure_server()
        if self.config.kind != "auto" or self._ucx_broken or not ucx_available():
            return None
        try:
            return await self._ensure_server()
        except DataPlaneError as exc:
            self._ucx_broken = True
            log.warning("data plane: UCX unavailable (%s); references are same-host only", exc)
            return None

    async def _store(self, src: np.ndarray | bytes, dtype: str, shape: tuple[int, ...], nbytes: int, memory: str) -> _Entry:
        kind = self.config.kind
        server = await self._maybe_server()
        seg = None
        if kind in ("auto", "shm") and self._pool is not None:
            seg = self._pool.allocate(nbytes)
            try:
                await _maybe_thread(segments.SegmentPool.fill, seg, src, nbytes=nbytes)
            except OSError as exc:
                self._pool.give_back(seg)
                seg = None
                if server is None:
                    raise DataPlaneError(f"could not store the tensor in shared memory: {exc}") from None
                log.warning("data plane: shared memory full (%s); serving over UCX only", exc)
            else:
                self._pool.publish(seg)
        data = None
        if seg is None:
            if server is None:
                raise DataPlaneError("no data-plane path can carry this tensor (no shared memory, no ucxx)")
            data = await _maybe_thread(_snapshot, src, nbytes=nbytes)
        return self._register(seg, data, dtype, shape, nbytes, memory, server)

    def _register(self, seg, data, dtype, shape, nbytes, memory, server, cuda_ipc=None, gpu=None) -> _Entry:
        ref_id = secrets.token_urlsafe(24)
        pid, start = self_identity()
        uri = ucx_uri(self.host, server.port, ref_id) if server is not None else f"shm://{seg.name}"
        ref = Ref(
            id=ref_id, dtype=dtype, shape=shape, nbytes=nbytes, memory=memory,
            expires_at=time.time() + self.config.lease_s, uri=uri, host_id=host_id(),
            pid=pid, pid_start=start,
            shm=seg.name if seg is not None else None, shm_token=seg.token if seg is not None else None,
            cuda_ipc=cuda_ipc,
        )
        entry = _Entry(ref=ref, seg=seg, data=data, gpu=gpu)
        self._entries[ref_id] = entry
        return entry

    async def _encode_cuda(self, value: Any) -> dict[str, Any]:
        await self.start()
        t = cuda.snapshot(value)
        dtype, shape, nbytes = cuda.describe(t)
        kind = self.config.kind
        server = await self._maybe_server()
        seg, handle = None, None
        if kind in ("auto", "shm") and self._pool is not None:
            seg = self._pool.allocate(0)  # a header-only segment: the IPC handle's lease
            self._pool.publish(seg)
            handle = cuda.ipc_handle(t)
        if seg is None and server is None:
            raise DataPlaneError("no data-plane path can carry this CUDA tensor")
        return self._register(seg, None, dtype, shape, nbytes, "cuda", server, cuda_ipc=handle, gpu=t).ref.to_wire()

    # -- decode ---------------------------------------------------------------------------
    async def decode(self, wire: dict[str, Any]) -> Any:
        """The array a wire dict stands for: inline → numpy; a reference → fetched (shm on the
        producer's host, UCX otherwise) and released at its producer."""
        if not is_ref(wire):
            return tensor_from_wire(wire)
        ref = Ref.from_wire(wire)
        await self.start()
        same_host = ref.host_id == host_id()
        if same_host and time.time() > ref.expires_at:
            raise DataPlaneError("tensor reference expired (its lease ran out before it was read)", detail={"id": ref.id[:6]})
        if same_host and ref.pid and not process_alive(ref.pid, ref.pid_start):
            views.sweep_dead()
            raise DataPlaneError(f"the producer of this tensor (pid {ref.pid}) is gone", detail={"pid": ref.pid})
        own = self._entries.get(ref.id)
        if own is not None and own.data is not None and not own.busy and own.ref.pid == ref.pid:
            self._drop(ref.id, "released")  # our own in-process copy: no transfer needed
            return _build(own.data, ref)
        prefer_ucx = self.config.kind == "ucx" and ref.ucx_address is not None
        if ref.memory == "cuda" and same_host and ref.cuda_ipc is not None and cuda.can_open_ipc() and not prefer_ucx:
            return await self._decode_cuda_ipc(ref)
        if same_host and ref.shm is not None and ref.memory == "cpu" and not prefer_ucx:
            payload = await views.take(ref.shm, ref.shm_token or b"", ref.nbytes)
            return _build(payload, ref)
        addr = ref.ucx_address
        if addr is None and ref.memory == "cuda" and same_host:
            raise DataPlaneError(
                "this GPU tensor travels by CUDA IPC, which needs torch with CUDA in the consumer; "
                "or use data_plane: auto / ucx so it can be staged through the host",
                detail={"uri": ref.uri},
            )
        if addr is None:
            raise DataPlaneError(
                "this reference lives in another host's shared memory and its producer does not serve UCX "
                "(data_plane: shm); use data_plane: auto or ucx across hosts",
                detail={"uri": ref.uri},
            )
        client = await self._ensure_client()
        payload = await client.fetch(addr, ref.id, ref.nbytes)
        arr = _build(payload, ref)
        return cuda.to_device(arr) if ref.memory == "cuda" and cuda.device_available() else arr

    async def _decode_cuda_ipc(self, ref: Ref) -> Any:
        lease = await views.take(ref.shm or "", ref.shm_token or b"", 0, lease_only=True)
        try:  # the producer keeps its tensor while we hold the lease: open and clone first
            return cuda.open_ipc(ref.cuda_ipc or b"", ref.dtype, ref.shape)
        except Exception as exc:
            raise DataPlaneError(f"opening the CUDA IPC handle failed: {type(exc).__name__}: {exc}") from None
        finally:
            del lease

    # -- release --------------------------------------------------------------------------
    async def release(self, wire: dict[str, Any]) -> None:
        """Give a reference back unread (no-op for inline). Best effort and idempotent: the
        lease frees it anyway."""
        if not is_ref(wire):
            return
        ref = Ref.from_wire(wire)
        if ref.id in self._entries:
            self._release_local(ref.id)
            return
        if ref.host_id == host_id() and ref.shm is not None:
            views.release_unclaimed(ref.shm, ref.shm_token or b"")
            return
        addr = ref.ucx_address
        if addr is not None and not self._closed:
            try:
                await (await self._ensure_client()).release(addr, ref.id)
            except DataPlaneError as exc:
                log.debug("data plane: release of %s failed: %s", ref.id[:6], exc)

    def _release_local(self, ref_id: str, why: str = "released") -> None:
        entry = self._entries.get(ref_id)
        if entry is None or entry.busy:
            return
        if entry.seg is not None and self._pool is not None and not self._pool.try_reclaim(entry.seg):
            return  # a consumer holds it: it comes back when that consumer lets go
        self._drop(ref_id, why)

    def _drop(self, ref_id: str, why: str) -> None:
        self._entries.pop(ref_id, None)
        self._tombstones[ref_id] = why
        while len(self._tombstones) > TOMBSTONES:
            self._tombstones.popitem(last=False)

    # -- serving (UCX) --------------------------------------------------------------------
    async def _serve_get(self, ref_id: str) -> Served:
        entry = self._entries.get(ref_id)
        if entry is None:
            why = self._tombstones.get(ref_id)
            raise DataPlaneError(f"tensor reference {why}" if why else "unknown tensor reference")
        if time.time() > entry.ref.expires_at:
            self._release_local(ref_id, "expired")
            raise DataPlaneError("tensor reference expired")
        if entry.busy:
            raise DataPlaneError("tensor reference is being read by another consumer")
        if entry.seg is not None and entry.gpu is None:
            seg = entry.seg
            if self._pool is None or self._pool.status(seg) != segments.FILLED or not segments.try_lock(seg.fd):
                self._drop(ref_id, "released")
                raise DataPlaneError("tensor reference released (taken through shared memory)")
            seg.busy = True
            payload = seg.payload(entry.ref.nbytes)
        elif entry.gpu is not None:
            payload = await asyncio.to_thread(cuda.host_bytes, entry.gpu)
        else:
            payload = entry.data
        entry.busy = True

        def done(acked: bool) -> None:
            entry.busy = False
            if entry.seg is not None and entry.gpu is None:
                entry.seg.busy = False
                segments.unlock(entry.seg.fd)
            if acked:
                self._release_local(ref_id)

        return Served(payload=payload, done=done)

    # -- reaper ---------------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        interval = min(1.0, max(0.02, self.config.lease_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self.reap()
            except Exception:  # never let the reaper die
                log.exception("data plane: reaper failed")

    def reap(self) -> None:
        """One pass: reclaim released and expired tensors, trim the pool, sweep dead producers."""
        now = time.time()
        if self._pool is not None:
            for seg in self._pool.collect_released():
                for ref_id, e in list(self._entries.items()):
                    if e.seg is seg:
                        self._drop(ref_id, "released")
        for ref_id, entry in list(self._entries.items()):
            if entry.busy or now <= entry.ref.expires_at:
                continue
            if entry.seg is not None and self._pool is not None:
                if self._pool.try_reclaim(entry.seg):
                    self._drop(ref_id, "expired")
            else:
                self._drop(ref_id, "expired")
        views.evict_unlinked()
        if self._pool is not None:
            self._pool.trim()
            if time.monotonic() - self._last_sweep > SWEEP_EVERY_S:
                self._last_sweep = time.monotonic()
                views.sweep_dead()

    # -- introspection (tests, metrics) ---------------------------------------------------
    @property
    def stored(self) -> int:
        """Tensors this process still holds for consumers."""
        return len(self._entries)

    @property
    def port(self) -> int | None:
        return self._server.port if self._server is not None else None


def _snapshot(src: np.ndarray | bytes) -> np.ndarray:
    if isinstance(src, (bytes, bytearray)):
        return np.frombuffer(bytes(src), dtype=np.uint8).copy()
    le = src.dtype.newbyteorder("<") if src.dtype.itemsize > 1 else src.dtype
    out = np.empty(src.shape, dtype=le)
    np.copyto(out, src, casting="equiv")
    return out.reshape(-1).view(np.uint8)


async def _maybe_thread(fn, *args, nbytes: int):
    if nbytes > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _build(payload: np.ndarray, ref: Ref) -> np.ndarray:
    """The consumer's array over the payload bytes (no copy for numeric dtypes)."""
    if ref.dtype == "bytes":
        return tensor_from_wire({"dtype": "bytes", "shape": list(ref.shape), "data": payload.tobytes()})
    dtype = numpy_dtype(ref.dtype)
    count = int(np.prod(ref.shape, dtype=np.int64)) if ref.shape else 1
    if payload.nbytes != count * dtype.itemsize:
        raise DataPlaneError(f"tensor payload is {payload.nbytes} bytes, expected {count * dtype.itemsize}")
    arr = payload.view(dtype).reshape(ref.shape)
    if dtype.byteorder not in ("=", "|") and dtype != dtype.newbyteorder("="):
        arr = arr.astype(dtype.newbyteorder("="))
    return arr
