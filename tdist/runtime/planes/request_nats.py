"""The request plane on NATS (the `RequestPlane` of planes/request_plane.py).

Load-balanced requests go to a JetStream work-queue stream per deployment. Each hosted operator
has a durable pull consumer; its intake keeps a pull window of the host's free runner slots,
asking only for the free share once at least half of it is free, so a busy worker takes nothing
more and the stream holds the rest for other replicas: that is the backpressure. A request is
acked after its final response; if the worker dies first, JetStream redelivers it after
`ack_wait_s`. Directed requests (one instance), responses and cancellations go over core NATS.

A queued request is accepted once JetStream has stored it: every one is published with its PubAck
awaited (many in flight at once on one shared reply subscription), so a missing or full stream
reaches the caller typed (RequestPlaneDown, Overloaded), never as silence.

Surviving NATS restarts and outages is NATS's own reconnect: it never gives up (deadlines bound
requests, attempt counts do not), buffers at most `PENDING_SIZE` bytes of publishes meanwhile, and
re-sends core subscriptions. What lives on the server (the stream, durable consumers, outstanding
pull requests, KV watchers) is re-created by the `on_reconnect` hooks this plane runs after each
reconnect: with file storage it is usually still there; with memory storage it is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

import nats
from nats.errors import ConnectionClosedError, MaxPayloadError, NoServersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

import tdist.runtime.protocol as P
from tdist.errors import Overloaded, PayloadTooLarge, RequestPlaneDown, RequestTimeout, TdistError
from tdist.runtime.config import RequestPlaneConfig
from tdist.runtime.planes.request_nats_intake import PullIntake
from tdist.runtime.planes.request_plane import Delivery

log = logging.getLogger("tdist.request")


class ConnectError(TdistError):
    """The request plane (NATS) cannot be reached."""

    exit_code = 3


def resolve_nats_url(config: RequestPlaneConfig | None = None, url: str | None = None) -> str:
    found = url or (config.url if config else None) or os.environ.get("NATS_SERVER")
    if not found:
        raise ConnectError("no NATS URL: set request_plane in the graph, pass --nats-url, or export NATS_SERVER")
    return found


#: Bytes of publishes nats-py buffers while reconnecting; past it a publish fails at once
#: (RequestPlaneDown) instead of growing memory for as long as the outage lasts.
PENDING_SIZE = 8 * 1024 * 1024


async def connect_nats(url: str, *, name: str = "tdist", connect_timeout_s: float = 5.0,
                       reconnected_cb: Callable[[], Any] | None = None,
                       disconnected_cb: Callable[[], Any] | None = None) -> Any:
    """Connect once (an unreachable URL is an error that names it); once connected, reconnect
    forever: a deployment outlives a nats-server restart, and deadlines bound each request."""

    conn: list[Any] = []

    async def on_disconnected() -> None:
        if conn and (conn[0].is_closed or conn[0].is_draining):
            return  # our own close, not an outage
        log.warning("%s: request plane (NATS) disconnected; reconnecting", name)
        if disconnected_cb is not None:
            disconnected_cb()

    async def on_reconnected() -> None:
        log.warning("%s: request plane (NATS) reconnected", name)
        if reconnected_cb is not None:
            await reconnected_cb()

    try:
        conn.append(await nats.connect(
            url,
            name=name,
            connect_timeout=connect_timeout_s,
            # bounded for the first connect (nats-py's -1 would retry an unreachable URL forever)
            max_reconnect_attempts=3,
            reconnect_time_wait=0.25,
            allow_reconnect=True,
            pending_size=PENDING_SIZE,
            error_cb=_quiet_error_cb,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        ))
        conn[0].options["max_reconnect_attempts"] = -1  # connected: from now on, never give up
        return conn[0]
    except (NoServersError, OSError, asyncio.TimeoutError) as exc:
        raise ConnectError(f"cannot connect to NATS at {url}: {type(exc).__name__}: {exc}") from None


async def _quiet_error_cb(exc: Exception) -> None:
    log.debug("nats error: %s", exc)


async def ensure_stream(js: Any, deployment: str, storage: str = "file") -> None:
    """Create the deployment's work-queue stream if missing (idempotent; any process may race).
    File storage (the default) keeps accepted requests across a nats-server restart."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    name = P.stream_name(deployment)
    try:
        await js.stream_info(name)
        return
    except Exception:
        pass
    try:
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=P.stream_subjects(deployment),
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.MEMORY if storage == "memory" else StorageType.FILE,
            )
        )
    except Exception:
        await js.stream_info(name)  # created by someone else meanwhile; raise if truly missing


def check_size(max_payload: int, payload: bytes, headers: dict[str, str] | None, *,
               operator: str | None = None, request_id: str | None = None, what: str = "request") -> None:
    """Raise PayloadTooLarge, before anything is published, when headers + payload exceed the
    server's max_payload. nats-server closes the whole connection on such a message (every
    request on it is disturbed); nats-py's own check counts the payload only."""
    size = len(payload) + P.headers_size(headers)
    if size > max_payload:
        raise PayloadTooLarge(
            f"{what} is {size} bytes ({len(payload)} payload + {size - len(payload)} header), over the NATS "
            f"max_payload of {max_payload}; use data_plane: auto/ucx/shm so big tensors travel by reference",
            operator=operator, request_id=request_id,
            detail={"bytes": size, "max_payload": max_payload},
        )


class _Subscription:
    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def close(self) -> None:
        try:
            await self._sub.unsubscribe()
        except Exception:
            pass


class NatsRequestPlane:
    """`RequestPlane` over one NATS connection (`nc`; `js` is its JetStream context)."""

    def __init__(self, nc: Any, deployment: str, *, config: RequestPlaneConfig | None = None,
                 owns_connection: bool = False) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.deployment = deployment
        self.config = config or RequestPlaneConfig()
        self._owns = owns_connection
        self._keeps_stream = False  # a serving plane re-creates the stream after a reconnect
        self._intakes: list[PullIntake] = []
        self._hooks: list[Callable[[], Any]] = []
        self.reconnects = 0
        self.down_since: float | None = None  # time.time() the connection was lost, while it is
        self.last_outage_s: float | None = None

    @classmethod
    async def connect(cls, url: str, deployment: str, *, config: RequestPlaneConfig | None = None,
                      name: str = "tdist") -> "NatsRequestPlane":
        """Connect to `url`; the plane owns (and closes) the connection."""
        box: list[NatsRequestPlane] = []

        async def reconnected() -> None:
            if box:
                await box[0]._reconnected()

        def disconnected() -> None:
            if box and box[0].down_since is None:
                box[0].down_since = time.time()

        nc = await connect_nats(url, name=name, reconnected_cb=reconnected, disconnected_cb=disconnected)
        box.append(cls(nc, deployment, config=config, owns_connection=True))
        return box[0]

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    def on_reconnect(self, hook: Callable[[], Any]) -> None:
        """Run `await hook()` after every reconnect (after the stream and intakes are back)."""
        self._hooks.append(hook)

    async def ensure_stream(self) -> None:
        """Create the work-queue stream if missing, now and after every reconnect."""
        self._keeps_stream = True
        await ensure_stream(self.js, self.deployment, self.config.storage)

    async def _reconnected(self) -> None:
        """Re-create what lives on the server; each step on its own, so one failure skips no other."""
        self.reconnects += 1
        if self.down_since is not None:
            self.last_outage_s = round(time.time() - self.down_since, 3)
            self.down_since = None
        steps: list[Callable[[], Any]] = []
        if self._keeps_stream:
            steps.append(lambda: ensure_stream(self.js, self.deployment, self.config.storage))
        steps += [intake.reconnected for intake in self._intakes] + list(self._hooks)
        for step in steps:
            try:
                await step()
            except Exception as exc:
                log.warning("after reconnect, re-creating %s failed: %s", getattr(step, "__qualname__", step), exc)

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    # ---- caller side ------------------------------------------------------------------------

    async def listen(self, inbox: str, deliver: Callable[[str, bytes | None], None]) -> _Subscription:
        async def on_msg(msg: Any) -> None:
            token = msg.subject.rsplit(".", 1)[-1]
            if not msg.data and (msg.headers or {}).get("Status") == "503":
                deliver(token, None)  # "no responders": the directed request reached nobody
                return
            deliver(token, msg.data)

        return _Subscription(await self.nc.subscribe(inbox + ".*", cb=on_msg))

    async def submit(self, msg: P.RequestMessage, payload: bytes) -> None:
        # into the work queue with JetStream's Nats-Msg-Id; a directed request goes without it. The
        # size (these headers included) was checked once by the caller, RequestClient._publish.
        headers = P.request_headers(msg, msg_id=msg.instance is None)
        try:
            if msg.instance is not None:
                # with a reply subject, the server answers "no responders" when nobody listens
                await self.nc.publish(
                    P.direct_subject(self.deployment, msg.operator, msg.instance), payload,
                    reply=msg.reply, headers=headers,
                )
            else:
                await self._store(msg, payload, headers)
        except MaxPayloadError as exc:
            raise PayloadTooLarge(str(exc), operator=msg.operator, request_id=msg.id) from None
        except (OutboundBufferLimitError, ConnectionClosedError) as exc:
            raise RequestPlaneDown(f"the request plane (NATS) is unreachable: {type(exc).__name__}",
                                   operator=msg.operator, request_id=msg.id) from None

    async def _store(self, msg: P.RequestMessage, payload: bytes, headers: dict[str, str]) -> None:
        """Publish into the work queue and wait for JetStream's PubAck until the deadline: accepted
        means stored. Many wait at once on the connection's one shared reply subscription (nats-py's
        request mux), so the cost is latency, not throughput. Not `publish_async`: in nats-py 2.16 its
        reply handler raises an error reply instead of failing the future, which then never ends."""
        try:
            await self.js.publish(P.request_subject(self.deployment, msg.operator), payload,
                                  headers=headers,
                                  timeout=max(0.05, msg.deadline - time.time()))
        except NoStreamResponseError:
            raise RequestPlaneDown(f"deployment {self.deployment!r} has no request stream, so nothing stored the "
                                   "request (no worker started, or the stream was lost)",
                                   operator=msg.operator, request_id=msg.id) from None
        except APIError as exc:
            text = f"{exc.description or exc}"
            if "exceeded" in text or "limit" in text:
                raise Overloaded(f"the work queue refused the request: {text}", operator=msg.operator,
                                 request_id=msg.id, detail={"err_code": exc.err_code}) from None
            raise RequestPlaneDown(f"JetStream did not store the request: {text}", operator=msg.operator,
                                   request_id=msg.id, detail={"err_code": exc.err_code}) from None
        except (asyncio.TimeoutError, NatsTimeoutError):
            if not self.connected:
                raise RequestPlaneDown("the request plane (NATS) was unreachable until the deadline; the request "
                                       "was not confirmed stored", operator=msg.operator, request_id=msg.id) from None
            raise RequestTimeout("JetStream did not confirm storing the request before its deadline",
                                 operator=msg.operator, request_id=msg.id) from None

    async def cancel(self, request_id: str) -> None:
        try:
            await self.nc.publish(P.cancel_subject(self.deployment), P.encode_cancel(request_id))
        except Exception as exc:  # connection closing: nothing more to do
            log.debug("cancel of %s not sent: %s", request_id, exc)

    # ---- serving side -----------------------------------------------------------------------

    async def serve(self, operator: str, instance: str, *, max_inflight: int, window: Callable[[], int],
                    deliver: Callable[[Delivery], None]) -> PullIntake:
        intake = PullIntake(self, operator, instance, max_inflight, window, deliver)
        await intake.start()
        self._intakes.append(intake)
        return intake

    def forget_intake(self, intake: PullIntake) -> None:
        """A closed intake is no longer re-created after a reconnect."""
        if intake in self._intakes:
            self._intakes.remove(intake)

    async def reply(self, subject: str, payload: bytes) -> None:
        await self.nc.publish(subject, payload)

    async def on_cancel(self, callback: Callable[[str], Any]) -> _Subscription:
        async def on_msg(msg: Any) -> None:
            try:
                rid = P.decode_cancel(msg.data)
            except Exception:
                return
            callback(rid)

        return _Subscription(await self.nc.subscribe(P.cancel_subject(self.deployment), cb=on_msg))

    async def flush(self) -> None:
        await self.nc.flush()

    async def close(self) -> None:
        if self._owns:
            if not self.connected:  # draining needs the server: while it is away, just close
                await self.nc.close()
                return
            try:
                await self.nc.drain()
            except Exception:
                await self.nc.close()
