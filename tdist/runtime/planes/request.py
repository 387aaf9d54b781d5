"""Request plane on NATS: the caller side (`RequestClient`) and shared connection set-up.

Load-balanced requests go to a JetStream work-queue stream per deployment; each worker pulls
only what its `max_inflight_requests` allows (backpressure) and acks after its final response,
so a request whose worker dies is redelivered to another replica after `ack_wait_s`.
Directed requests (one instance) go over core NATS. Responses stream back on the caller's
inbox: partials then exactly one final, or a typed error. Deadlines and cancellation travel
with every request and fan out to the calls it makes (see operator.current_request).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, AsyncIterator

import nats
from nats.errors import MaxPayloadError, NoServersError
from nats.js.errors import NoStreamResponseError

from tdist.errors import (
    NoWorkerError,
    PayloadTooLarge,
    RequestCancelled,
    RequestError,
    RequestTimeout,
    TdistError,
    WorkerLost,
)
from tdist.runtime import protocol as P
from tdist.runtime.config import DataPlaneConfig, DiscoveryConfig, RequestPlaneConfig
from tdist.runtime.operator import Response, current_client, current_request
from tdist.runtime.planes.codec import TensorCodec, decode_tensors, encode_tensors, make_codec
from tdist.runtime.planes.discovery import Discovery, make_discovery

log = logging.getLogger("tdist.request")


class ConnectError(TdistError):
    """The request plane (NATS) cannot be reached."""

    exit_code = 3


def resolve_nats_url(config: RequestPlaneConfig | None = None, url: str | None = None) -> str:
    found = url or (config.url if config else None) or os.environ.get("NATS_SERVER")
    if not found:
        raise ConnectError("no NATS URL: set request_plane in the graph, pass --nats-url, or export NATS_SERVER")
    return found


async def connect_nats(url: str, *, name: str = "tdist", connect_timeout_s: float = 5.0) -> Any:
    """Connect with bounded retries and no reconnect storm; errors say which URL failed."""
    try:
        return await nats.connect(
            url,
            name=name,
            connect_timeout=connect_timeout_s,
            max_reconnect_attempts=5,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            error_cb=_quiet_error_cb,
        )
    except (NoServersError, OSError, asyncio.TimeoutError) as exc:
        raise ConnectError(f"cannot connect to NATS at {url}: {type(exc).__name__}: {exc}") from None


async def _quiet_error_cb(exc: Exception) -> None:
    log.debug("nats error: %s", exc)


async def ensure_stream(js: Any, deployment: str) -> None:
    """Create the deployment's work-queue stream if missing (idempotent; any process may race)."""
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
                storage=StorageType.MEMORY,
            )
        )
    except Exception:
        await js.stream_info(name)  # created by someone else meanwhile; raise if truly missing


class RequestClient:
    """Sends requests to operators of one deployment and streams their responses back.

    One per process is enough (it multiplexes every request on one inbox subscription).
    Use `async with RequestClient.connect(url, deployment) as client:` or `await client.close()`.
    """

    def __init__(
        self,
        nc: Any,
        deployment: str,
        *,
        config: RequestPlaneConfig | None = None,
        codec: TensorCodec | None = None,
        discovery: Discovery | None = None,
        owns_connection: bool = False,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.deployment = deployment
        self.config = config or RequestPlaneConfig()
        self.codec = codec
        self.discovery = discovery or make_discovery(DiscoveryConfig(), deployment, js=self.js)
        self._owns = owns_connection
        self._inbox_prefix = f"_INBOX.tdist.{P.new_request_id()}"
        self._queues: dict[str, asyncio.Queue[P.ResponseMessage]] = {}
        self._sub: Any = None
        self._workers_cache: tuple[float, dict[str, dict[str, Any]]] = (0.0, {})
        self._stream_known = False  # set after the first acknowledged publish into the stream
        #: how often a request waiting on a known worker checks that it is still in discovery,
        #: and how long it must have been missing before the request ends with WorkerLost
        self.liveness_check_s = 2.0
        self.worker_lost_after_s = 2 * float(getattr(self.discovery, "ttl_s", 5.0))

    @classmethod
    async def connect(
        cls,
        url: str | None,
        deployment: str,
        *,
        config: RequestPlaneConfig | None = None,
        data_plane: DataPlaneConfig | None = None,
        discovery: DiscoveryConfig | None = None,
    ) -> "RequestClient":
        nc = await connect_nats(resolve_nats_url(config, url), name=f"tdist-client-{deployment}")
        codec = make_codec(data_plane or DataPlaneConfig())
        await codec.start()
        disc = make_discovery(discovery or DiscoveryConfig(), deployment, js=nc.jetstream())
        client = cls(nc, deployment, config=config, codec=codec, discovery=disc, owns_connection=True)
        await client.start()
        return client

    async def start(self) -> None:
        if self.codec is None:
            self.codec = make_codec(DataPlaneConfig(kind="inline"))
            await self.codec.start()
        if self._sub is None:
            self._sub = await self.nc.subscribe(self._inbox_prefix + ".*", cb=self._on_response)

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
        if self._owns:
            if self.codec is not None:
                await self.codec.close()
            await self.discovery.close()
            try:
                await self.nc.drain()
            except Exception:
                await self.nc.close()

    async def __aenter__(self) -> "RequestClient":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _on_response(self, msg: Any) -> None:
        if not msg.data and (msg.headers or {}).get("Status") == "503":
            # "no responders": a directed request reached no subscriber (the instance is gone)
            rid = msg.subject.rsplit(".", 1)[-1]
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(_NO_RESPONDERS)
            return
        try:
            resp = P.decode_response(msg.data)
        except RequestError as exc:
            log.warning("dropping malformed response on %s: %s", msg.subject, exc)
            return
        q = self._queues.get(resp.id)
        if q is not None:
            q.put_nowait(resp)

    # ---- discovery view -------------------------------------------------------------------

    async def workers(self, *, max_age_s: float = 1.0) -> dict[str, dict[str, Any]]:
        """Live worker entries (name → entry), cached for max_age_s."""
        stamp, cached = self._workers_cache
        if time.monotonic() - stamp > max_age_s:
            cached = await self.discovery.list()
            self._workers_cache = (time.monotonic(), cached)
        return cached

    async def instances(self, operator: str, *, max_age_s: float = 1.0) -> dict[str, dict[str, Any]]:
        """Ready workers hosting `operator` (name → discovery entry)."""
        return {
            name: e
            for name, e in (await self.workers(max_age_s=max_age_s)).items()
            if operator in e.get("operators", []) and e.get("state") == "ready"
        }

    async def _check_served(self, operator: str, instance: str | None) -> dict[str, dict[str, Any]]:
        found = await self.instances(operator)
        if not found or (instance is not None and instance not in found):  # maybe the cache is stale: look again now
            found = await self.instances(operator, max_age_s=0.0)
        if instance is not None:
            if instance not in found:
                raise NoWorkerError(
                    f"instance {instance!r} does not serve {operator!r} or is not ready"
                    + (f"; ready instances: {', '.join(sorted(found))}" if found else ""),
                    operator=operator,
                )
        elif not found:
            raise NoWorkerError(f"no ready worker hosts operator {operator!r}", operator=operator)
        return found

    # ---- requests -------------------------------------------------------------------------

    async def infer(
        self,
        operator: str,
        *,
        inputs: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        instance: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Response]:
        """Send one request; yield its responses (partials, then the final). Errors raise typed.

        Inside an operator the deadline is capped by the current request's, and cancelling
        the current task cancels this request on its worker.
        """
        await self.start()
        assert self.codec is not None
        parent = current_request.get()
        now = time.time()
        deadline = now + (timeout_s if timeout_s is not None else self.config.default_timeout_s)
        if parent is not None:
            deadline = min(deadline, parent.deadline)
        rid = request_id or P.new_request_id()
        found = await self._check_served(operator, instance)

        wire_inputs = await encode_tensors(self.codec, dict(inputs or {}))
        msg = P.RequestMessage(
            id=rid,
            operator=operator,
            inputs=wire_inputs,
            parameters=dict(parameters or {}),
            deadline=deadline,
            reply=f"{self._inbox_prefix}.{rid}",
            parent=parent.id if parent is not None else None,
            instance=instance,
        )
        payload = P.encode_request(msg)
        queue: asyncio.Queue[P.ResponseMessage] = asyncio.Queue()
        self._queues[rid] = queue
        finished = False
        try:
            await self._publish(msg, payload)
            accepted_attempt: int | None = None
            yielded = 0
            loop = asyncio.get_running_loop()
            # The worker known to hold the request (directed, or the one that answered): if it
            # leaves discovery while we wait, the request ends with WorkerLost, not at its deadline.
            watch = _Watch(instance, _identity(found[instance])) if instance is not None else None
            while True:
                try:
                    # one cheap timer per wait (asyncio.timeout), not a task per wait (wait_for)
                    wait_s = deadline - time.time()
                    if watch is not None:
                        wait_s = min(wait_s, self.liveness_check_s)
                    async with asyncio.timeout_at(loop.time() + wait_s):
                        resp = await queue.get()
                except TimeoutError:
                    if time.time() < deadline and watch is not None:
                        await self._check_alive(watch, operator, rid)
                        continue
                    raise RequestTimeout(
                        f"no final response within the deadline ({timeout_s or self.config.default_timeout_s:g} s)",
                        operator=operator,
                        request_id=rid,
                    ) from None
                if resp is _NO_RESPONDERS:
                    finished = True
                    raise NoWorkerError(
                        f"instance {instance!r} of {operator!r} is not listening (gone since discovery last saw it)",
                        operator=operator,
                        request_id=rid,
                    )
                if resp.worker and (watch is None or watch.worker != resp.worker):
                    watch = _Watch(resp.worker, None)
                elif watch is not None:
                    watch.missing_since = None
                if accepted_attempt is None:
                    accepted_attempt = resp.attempt
                elif resp.attempt != accepted_attempt:
                    if resp.attempt < accepted_attempt:
                        continue  # a straggler of an older delivery
                    if yielded:
                        raise WorkerLost(
                            f"the worker died after {yielded} partial response(s); the redelivered request "
                            "cannot continue the same stream",
                            operator=operator,
                            request_id=rid,
                        )
                    accepted_attempt = resp.attempt
                if resp.error is not None:
                    finished = True
                    err = RequestError.from_wire(resp.error)
                    err.request_id = err.request_id or rid
                    raise err
                outputs = await decode_tensors(self.codec, resp.outputs) if resp.outputs else {}
                if resp.final:
                    finished = True
                yielded += 1
                yield Response(
                    request_id=rid,
                    outputs=outputs,
                    parameters=resp.parameters,
                    final=resp.final,
                    worker=resp.worker,
                )
                if resp.final:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await self.cancel(rid)

    async def _publish(self, msg: P.RequestMessage, payload: bytes) -> None:
        headers = {P.HDR_REPLY: msg.reply, P.HDR_ID: msg.id, P.HDR_DEADLINE: repr(msg.deadline)}
        limit = self.nc.max_payload
        if len(payload) > limit:
            raise PayloadTooLarge(
                f"request is {len(payload)} bytes, over the NATS max_payload of {limit}; "
                "use data_plane: auto/ucx/shm so big tensors travel by reference",
                operator=msg.operator,
                request_id=msg.id,
                detail={"bytes": len(payload), "max_payload": limit},
            )
        try:
            if msg.instance is not None:
                # with a reply subject, the server answers "no responders" when nobody listens
                await self.nc.publish(
                    P.direct_subject(self.deployment, msg.operator, msg.instance), payload,
                    reply=msg.reply, headers=headers,
                )
            elif self._stream_known:
                # The stream exists and a ready worker pulls from it (checked above): a core
                # publish is stored by JetStream without a PubAck round trip per request.
                await self.nc.publish(P.request_subject(self.deployment, msg.operator), payload, headers=headers)
            else:
                await self.js.publish(
                    P.request_subject(self.deployment, msg.operator),
                    payload,
                    headers={**headers, "Nats-Msg-Id": msg.id},
                    timeout=max(0.1, min(5.0, msg.deadline - time.time())),
                )
                self._stream_known = True
        except MaxPayloadError as exc:
            raise PayloadTooLarge(str(exc), operator=msg.operator, request_id=msg.id) from None
        except NoStreamResponseError:
            raise NoWorkerError(
                f"deployment {self.deployment!r} has no request stream (no worker ever started)",
                operator=msg.operator,
                request_id=msg.id,
            ) from None
        except asyncio.TimeoutError:
            raise RequestTimeout("publishing the request timed out", operator=msg.operator, request_id=msg.id) from None

    async def _check_alive(self, watch: "_Watch", operator: str, rid: str) -> None:
        """Raise WorkerLost once the worker holding the request has been absent from discovery for
        worker_lost_after_s (2 TTLs: its heartbeats stopped — killed, hung or cut off; one late
        heartbeat is not enough), or is back as another process (restarted: what it held is gone)."""
        try:
            entry = (await self.workers(max_age_s=self.liveness_check_s / 2)).get(watch.worker)
        except Exception as exc:  # discovery unreadable for a moment: no verdict
            log.debug("liveness check of %s failed: %s", watch.worker, exc)
            return
        now = time.monotonic()
        if entry is not None:
            ident = _identity(entry)
            if watch.ident is None:
                watch.ident = ident
            elif ident != watch.ident:
                raise WorkerLost(f"worker {watch.worker} restarted while serving the request",
                                 operator=operator, request_id=rid)
            watch.missing_since = None
            return
        if watch.missing_since is None:
            watch.missing_since = now
        elif now - watch.missing_since >= self.worker_lost_after_s:
            raise WorkerLost(
                f"worker {watch.worker} left discovery while serving the request (no heartbeat for over "
                f"{self.worker_lost_after_s:g} s)",
                operator=operator,
                request_id=rid,
            )

    async def cancel(self, request_id: str) -> None:
        """Tell every worker to stop `request_id` (and, through it, the calls it made)."""
        try:
            await self.nc.publish(P.cancel_subject(self.deployment), P.encode_cancel(request_id))
        except Exception as exc:  # connection closing: nothing more to do
            log.debug("cancel of %s not sent: %s", request_id, exc)


@dataclasses.dataclass
class _Watch:
    """The worker known to hold a request: its name and process identity (host, pid, start)."""

    worker: str
    ident: tuple[Any, ...] | None
    missing_since: float | None = None


def _identity(entry: dict[str, Any]) -> tuple[Any, ...]:
    return (entry.get("host"), entry.get("pid"), entry.get("started_at"))


#: Queued in place of a response when the server reports that a directed request reached nobody.
_NO_RESPONDERS: Any = object()


def set_process_client(client: RequestClient) -> None:
    """Make `client` the default for RemoteOperator in this context (the worker does this)."""
    current_client.set(client)


__all__ = [
    "ConnectError",
    "RequestCancelled",
    "RequestClient",
    "connect_nats",
    "ensure_stream",
    "resolve_nats_url",
    "set_process_client",
]
