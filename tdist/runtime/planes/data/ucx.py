"""UCX transport (ucxx): one listener per process serving stored tensors, pooled client endpoints.

Protocol on one endpoint, strictly request → reply (so a pooled endpoint stays in step):

    consumer → {"op": "get", "id": ...}
    producer → {"ok": true, "nbytes": n} then the payload (n > 0)  |  {"ok": false, "error": ...}
    consumer → {"op": "ack", "id": ...}          (after the payload landed; producer releases)

    consumer → {"op": "release", "id": ...}
    producer → {"ok": true}

The transfer ends with the consumer's acknowledgement: a peer closing right after its last send
makes the other side see UCXXConnectionResetError (FIELD-NOTES). Every wait is bounded; on any
transport error or timeout the endpoint is aborted, never reused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from tdist.errors import DataPlaneError

log = logging.getLogger("tdist.data.ucx")

CONNECT_TIMEOUT_S = 5.0
OP_TIMEOUT_S = 10.0
MIN_BANDWIDTH_BPS = 50e6  # payload deadline = OP_TIMEOUT_S + nbytes / this
MAX_ENDPOINTS_PER_PEER = 8

FRAME = 256  # control messages are fixed-size frames: one UCX message each (send_obj costs two)


def _frame(obj: dict[str, Any]) -> np.ndarray:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > FRAME - 2:
        obj = dict(obj, error=str(obj.get("error", ""))[: FRAME // 2])
        body = msgpack.packb(obj, use_bin_type=True)[: FRAME - 2]
    buf = np.zeros(FRAME, dtype=np.uint8)
    buf[:2] = np.frombuffer(len(body).to_bytes(2, "little"), dtype=np.uint8)
    buf[2 : 2 + len(body)] = np.frombuffer(body, dtype=np.uint8)
    return buf


def _unframe(buf: np.ndarray) -> dict[str, Any]:
    n = int.from_bytes(buf[:2].tobytes(), "little")
    obj = msgpack.unpackb(buf[2 : 2 + n].tobytes(), raw=False)
    if not isinstance(obj, dict):
        raise ValueError("bad data-plane message")
    return obj


TAG_HEAD, TAG_PAYLOAD = 1, 2  # a "get" answer: header and payload on their own tags, so the
# consumer posts both receives up front and the producer sends both at once (one round trip)


async def _send(ep: Any, obj: dict[str, Any], tag: int | None = None) -> None:
    await asyncio.wait_for(ep.send(_frame(obj), tag=tag), OP_TIMEOUT_S)


async def _recv(ep: Any, timeout: float | None = OP_TIMEOUT_S) -> dict[str, Any]:
    buf = np.empty(FRAME, dtype=np.uint8)
    if timeout is None:
        await ep.recv(buf)
    else:
        await asyncio.wait_for(ep.recv(buf), timeout)
    return _unframe(buf)


def payload_timeout(nbytes: int) -> float:
    return OP_TIMEOUT_S + nbytes / MIN_BANDWIDTH_BPS


@dataclass
class Served:
    """What the plane hands the server for one "get": the bytes, and what to do after."""

    payload: np.ndarray  # uint8, C-contiguous
    done: Callable[[bool], None]  # done(acknowledged)


Lookup = Callable[[str], Awaitable[Served]]  # raises DataPlaneError
Release = Callable[[str], None]


class UcxServer:
    """The process's one listener. lookup/release are the plane's store operations."""

    def __init__(self, ucxx: Any, lookup: Lookup, release: Release) -> None:
        self._ucxx = ucxx
        self._lookup = lookup
        self._release = release
        self._listener: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._endpoints: set[Any] = set()
        self.port = 0

    def start(self) -> int:
        if self._listener is None:
            self._listener = self._ucxx.create_listener(self._handle, port=0)
            self.port = int(self._listener.port)
        return self.port

    async def _handle(self, ep: Any) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._endpoints.add(ep)
        try:
            while True:
                try:
                    req = await _recv(ep, None)  # idle endpoints wait here, unbounded
                except Exception:
                    return  # peer closed or died
                if not await self._serve_one(ep, req):
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._endpoints.discard(ep)
            if task is not None:
                self._tasks.discard(task)
            await _close_ep(ep)

    async def _serve_one(self, ep: Any, req: dict[str, Any]) -> bool:
        op, ref_id = req.get("op"), str(req.get("id", ""))
        try:
            if op == "release":
                self._release(ref_id)
                await _send(ep, {"ok": True})
                return True
            if op != "get":
                await _send(ep, {"ok": False, "error": f"unknown op {op!r}"})
                return True
            try:
                served = await self._lookup(ref_id)
            except DataPlaneError as exc:
                await _send(ep, {"ok": False, "error": exc.message}, tag=TAG_HEAD)
                return True
            acked = False
            try:
                n = int(served.payload.nbytes)
                sends = [_send(ep, {"ok": True, "nbytes": n}, tag=TAG_HEAD)]
                if n:
                    sends.append(asyncio.wait_for(ep.send(served.payload, tag=TAG_PAYLOAD), payload_timeout(n)))
                await asyncio.gather(*sends)
                ack = await _recv(ep, payload_timeout(n))
                acked = ack.get("op") == "ack" and ack.get("id") == ref_id
                return acked
            finally:
                served.done(acked)
        except (asyncio.TimeoutError, Exception) as exc:  # transport failure: drop this endpoint
            log.debug("data plane: serving %s failed: %r", ref_id[:6], exc)
            return False

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for ep in list(self._endpoints):
            await _close_ep(ep)
        if tasks:
            await asyncio.wait(tasks, timeout=OP_TIMEOUT_S)
        if self._listener is not None:
            self._listener.close()
            self._listener = None


async def _close_ep(ep: Any) -> None:
    try:
        if not ep.closed:
            ep.abort(period=10**8)
    except Exception:
        pass


class UcxClient:
    """Pooled endpoints to producers: at most MAX_ENDPOINTS_PER_PEER per (host, port), one
    request at a time each; kept open across requests and closed with the plane."""

    def __init__(self, ucxx: Any) -> None:
        self._ucxx = ucxx
        self._idle: dict[tuple[str, int], list[Any]] = {}
        self._open: dict[tuple[str, int], int] = {}
        self._cond = asyncio.Condition()
        self._closed = False

    async def _acquire(self, addr: tuple[str, int], fresh: bool) -> tuple[Any, bool]:
        deadline = asyncio.get_running_loop().time() + OP_TIMEOUT_S
        async with self._cond:
            while True:
                if self._closed:
                    raise DataPlaneError("data plane is closed")
                idle = self._idle.get(addr)
                if idle and not fresh:
                    return idle.pop(), True
                if self._open.get(addr, 0) < MAX_ENDPOINTS_PER_PEER:
                    self._open[addr] = self._open.get(addr, 0) + 1
                    break
                if fresh and idle:  # make room: drop an idle one
                    await _close_ep(idle.pop())
                    continue
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise DataPlaneError(f"no free connection to the producer at {addr[0]}:{addr[1]}")
                try:
                    await asyncio.wait_for(self._cond.wait(), left)
                except asyncio.TimeoutError:
                    pass
        try:
            ep = await asyncio.wait_for(
                self._ucxx.create_endpoint(addr[0], addr[1], connect_timeout=CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S + 1
            )
        except BaseException as exc:
            await self._forget(addr)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise DataPlaneError(
                f"the producer at ucp://{addr[0]}:{addr[1]} is unreachable (gone?): {type(exc).__name__}: {exc}",
                detail={"address": f"{addr[0]}:{addr[1]}"},
            ) from None
        return ep, False

    async def _forget(self, addr: tuple[str, int]) -> None:
        async with self._cond:
            self._open[addr] = max(0, self._open.get(addr, 1) - 1)
            self._cond.notify()

    async def _put_back(self, addr: tuple[str, int], ep: Any, ok: bool) -> None:
        if ok and not self._closed:
            async with self._cond:
                self._idle.setdefault(addr, []).append(ep)
                self._cond.notify()
        else:
            await _close_ep(ep)
            await self._forget(addr)

    async def _call(self, addr: tuple[str, int], fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run fn on a pooled endpoint; a reused endpoint that fails at once is retried fresh
        (the producer may have dropped it); errors become DataPlaneError."""
        for attempt in (0, 1):
            ep, reused = await self._acquire(addr, fresh=attempt > 0)
            ok = False
            try:
                result = await fn(ep)
                ok = True
                return result
            except DataPlaneError as exc:
                ok = not getattr(exc, "discard_endpoint", False)  # an answer: the endpoint is fine
                raise
            except asyncio.CancelledError:
                raise
            except (asyncio.TimeoutError, Exception) as exc:
                if reused and attempt == 0 and isinstance(exc, _Stale):
                    continue
                what = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"failed: {type(exc).__name__}: {exc}"
                raise DataPlaneError(
                    f"fetching from the producer at ucp://{addr[0]}:{addr[1]} {what} (producer gone?)",
                    detail={"address": f"{addr[0]}:{addr[1]}"},
                ) from None
            finally:
                await self._put_back(addr, ep, ok)
        raise AssertionError("unreachable")

    async def fetch(self, addr: tuple[str, int], ref_id: str, nbytes: int) -> np.ndarray:
        """The payload of one reference (uint8); the producer releases it on our ack."""

        async def get(ep: Any) -> np.ndarray:
            head_buf = np.empty(FRAME, dtype=np.uint8)
            buf = np.empty(nbytes, dtype=np.uint8)
            head_t = asyncio.ensure_future(ep.recv(head_buf, tag=TAG_HEAD))
            pay_t = asyncio.ensure_future(ep.recv(buf, tag=TAG_PAYLOAD)) if nbytes else None
            try:
                try:
                    await _send(ep, {"op": "get", "id": ref_id})
                    await asyncio.wait_for(asyncio.shield(head_t), OP_TIMEOUT_S)
                    head = _unframe(head_buf)
                except (asyncio.TimeoutError, Exception) as exc:
                    raise _Stale(str(exc)) from exc
                if not head.get("ok") or int(head.get("nbytes", -1)) != nbytes:
                    err = DataPlaneError(
                        str(head.get("error") or f"producer sent {head.get('nbytes')} bytes, the reference says {nbytes}"),
                        detail={"id": ref_id[:6]},
                    )
                    err.discard_endpoint = True  # our payload receive is still posted on it
                    raise err
                if pay_t is not None:
                    await asyncio.wait_for(asyncio.shield(pay_t), payload_timeout(nbytes))
            finally:
                for t in (head_t, pay_t):
                    if t is not None and not t.done():
                        t.cancel()
            await _send(ep, {"op": "ack", "id": ref_id})
            return buf

        return await self._call(addr, get)

    async def release(self, addr: tuple[str, int], ref_id: str) -> None:
        async def rel(ep: Any) -> None:
            try:
                await _send(ep, {"op": "release", "id": ref_id})
                await _recv(ep)
            except (asyncio.TimeoutError, Exception) as exc:
                raise _Stale(str(exc)) from exc

        await self._call(addr, rel)

    async def close(self) -> None:
        self._closed = True
        async with self._cond:
            idle, self._idle = self._idle, {}
            self._cond.notify_all()
        for eps in idle.values():
            for ep in eps:
                await _close_ep(ep)


class _Stale(Exception):
    """The endpoint failed before the producer answered (possibly a stale pooled endpoint)."""
