"""The caller side of the request plane: `RequestClient`, over any `RequestPlane` transport.

It sends a request (to an operator's work queue, or directed to one instance), then streams its
responses back from one inbox per client: partials, then exactly one final, or a typed error.
Deadlines travel with every request and are capped by the calling request's (inside an
operator), and leaving early cancels the request on its worker, which fans out to the calls it
made. A worker that leaves discovery, or restarts, while holding the request ends it with
WorkerLost instead of a wait until the deadline. The transport (NATS or in memory) is
planes/request_nats.py / request_memory.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator

import tdist.runtime.protocol as P
from tdist.errors import NoWorkerError, RequestError, RequestPlaneDown, RequestTimeout, TdistError, WorkerLost
from tdist.runtime.calls import Response, current_client, current_request
from tdist.runtime.config import DataPlaneConfig, DiscoveryConfig, RequestPlaneConfig
from tdist.runtime.planes.codec import TensorCodec, decode_tensors, encode_tensors, make_codec
from tdist.runtime.planes.discovery import Discovery, make_discovery
from tdist.runtime.planes.discovery_entry import WorkerEntry
from tdist.runtime.planes.request_nats import NatsRequestPlane, check_size, resolve_nats_url
from tdist.runtime.planes.request_plane import Listener, RequestPlane

log = logging.getLogger("tdist.request")


class RequestClient:
    """Sends requests to operators of one deployment and streams their responses back.

    One per process is enough (it multiplexes every request on one inbox subscription).
    Use `async with RequestClient.connect(url, deployment) as client:` or `await client.close()`.
    """

    def __init__(
        self,
        plane: RequestPlane,
        *,
        config: RequestPlaneConfig | None = None,
        codec: TensorCodec | None = None,
        discovery: Discovery | None = None,
        owns_plane: bool = False,
    ) -> None:
        self.plane = plane
        self.deployment = plane.deployment
        self.config = config or RequestPlaneConfig()
        self.codec = codec
        # NATS KV discovery by default: the other transports come with their own discovery
        if discovery is None:
            discovery = make_discovery(DiscoveryConfig(), self.deployment, js=getattr(plane, "js", None),
                                       storage=self.config.storage)
            follow_reconnects(plane, discovery)
        self.discovery = discovery
        self._owns = owns_plane
        self._inbox_prefix = f"_INBOX.tdist.{P.new_request_id()}"
        self._queues: dict[str, asyncio.Queue[P.ResponseMessage]] = {}
        self._listener: Listener | None = None
        self._workers_cache: tuple[float, dict[str, dict[str, Any]], dict[str, WorkerEntry]] = (0.0, {}, {})
        #: how often a request waiting on a known worker checks that it is still in discovery,
        #: and how long it must have been missing before the request ends with WorkerLost
        self.liveness_check_s = 2.0
        self.worker_lost_after_s = 2 * float(getattr(self.discovery, "ttl_s", 5.0))

    @property
    def nc(self) -> Any:
        """The NATS connection of a client on the NATS plane (for code that speaks NATS itself)."""
        return self.plane.nc  # type: ignore[attr-defined]

    @property
    def js(self) -> Any:
        """The JetStream context of a client on the NATS plane."""
        return self.plane.js  # type: ignore[attr-defined]

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
        plane = await NatsRequestPlane.connect(resolve_nats_url(config, url), deployment, config=config,
                                               name=f"tdist-client-{deployment}")
        codec = make_codec(data_plane or DataPlaneConfig())
        await codec.start()
        disc = make_discovery(discovery or DiscoveryConfig(), deployment, js=plane.js,
                              storage=(config or RequestPlaneConfig()).storage)
        follow_reconnects(plane, disc)
        client = cls(plane, config=config, codec=codec, discovery=disc, owns_plane=True)
        await client.start()
        return client

    async def start(self) -> None:
        if self.codec is None:
            self.codec = make_codec(DataPlaneConfig(kind="inline"))
            await self.codec.start()
        if self._listener is None:
            self._listener = await self.plane.listen(self._inbox_prefix, self._on_response)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._owns:
            if self.codec is not None:
                await self.codec.close()
            await self.discovery.close()
            await self.plane.close()

    async def __aenter__(self) -> "RequestClient":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _on_response(self, token: str, payload: bytes | None) -> None:
        if payload is None:  # a directed request reached no listener (the instance is gone)
            q = self._queues.get(token)
            if q is not None:
                q.put_nowait(_NO_RESPONDERS)
            return
        try:
            resp = P.decode_response(payload)
        except RequestError as exc:
            log.warning("dropping a malformed response for %s: %s", token, exc)
            return
        q = self._queues.get(resp.id)
        if q is not None:
            q.put_nowait(resp)

    # ---- discovery view -------------------------------------------------------------------

    async def _listing(self, max_age_s: float) -> tuple[dict[str, dict[str, Any]], dict[str, WorkerEntry]]:
        """Discovery's listing as published and typed, read at most every max_age_s (the typed
        view is parsed once per read, not once per request)."""
        stamp, raw, typed = self._workers_cache
        if time.monotonic() - stamp > max_age_s:
            try:
                raw = await self.discovery.list()
            except TdistError:
                raise
            except Exception as exc:  # the plane is down or restarting: a typed answer, not a traceback
                raise RequestPlaneDown(f"discovery is unreadable: {type(exc).__name__}: {exc}") from None
            typed = {name: e for name, e in ((n, WorkerEntry.read(d)) for n, d in raw.items()) if e is not None}
            self._workers_cache = (time.monotonic(), raw, typed)
        return raw, typed

    async def workers(self, *, max_age_s: float = 1.0) -> dict[str, dict[str, Any]]:
        """Live worker entries as published (name → the JSON object), cached for max_age_s."""
        return (await self._listing(max_age_s))[0]

    async def worker_entries(self, *, max_age_s: float = 1.0) -> dict[str, WorkerEntry]:
        """Live worker entries, typed (name → entry); what is not a worker entry is left out."""
        return dict((await self._listing(max_age_s))[1])

    async def instances(self, operator: str, *, max_age_s: float = 1.0) -> dict[str, WorkerEntry]:
        """Ready workers hosting `operator` (name → discovery entry)."""
        return {name: e for name, e in (await self.worker_entries(max_age_s=max_age_s)).items() if e.serves(operator)}

    async def _check_served(self, operator: str, instance: str | None) -> dict[str, WorkerEntry]:
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
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # cancelled while the publish waited for JetStream's PubAck, and the cancellation was
                # swallowed (Python 3.11's wait_for returns a result that arrives with the cancel)
                raise asyncio.CancelledError
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
        # headers count (the server's limit is on headers + payload); the largest header set a
        # transport sends (with JetStream's Nats-Msg-Id), so every transport answers alike
        check_size(self.plane.max_payload, payload, P.request_headers(msg, msg_id=True),
                   operator=msg.operator, request_id=msg.id)
        await self.plane.submit(msg, payload)

    async def _check_alive(self, watch: "_Watch", operator: str, rid: str) -> None:
        """Raise WorkerLost once the worker holding the request has been absent from discovery for
        worker_lost_after_s (2 TTLs: its heartbeats stopped — killed, hung or cut off; one late
        heartbeat is not enough), or is back as another process (restarted: what it held is gone)."""
        try:
            entry = (await self.worker_entries(max_age_s=self.liveness_check_s / 2)).get(watch.worker)
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
        await self.plane.cancel(request_id)


@dataclasses.dataclass
class _Watch:
    """The worker known to hold a request: its name and process identity (host, pid, start)."""

    worker: str
    ident: tuple[Any, ...] | None
    missing_since: float | None = None


def _identity(entry: Any) -> tuple[Any, ...] | None:
    """A worker's process identity; None for something in discovery that is not a worker entry."""
    typed = WorkerEntry.read(entry)
    return typed.identity() if typed is not None else None


#: Queued in place of a response when the server reports that a directed request reached nobody.
_NO_RESPONDERS: Any = object()


def follow_reconnects(plane: Any, discovery: Any) -> None:
    """Have `discovery` re-create its bucket and watcher after each reconnect of `plane` (NATS)."""
    if hasattr(plane, "on_reconnect") and hasattr(discovery, "reconnected"):
        plane.on_reconnect(discovery.reconnected)


def set_process_client(client: RequestClient) -> None:
    """Make `client` the default for RemoteOperator in this context (the worker does this)."""
    current_client.set(client)


__all__ = ["RequestClient", "follow_reconnects", "set_process_client"]
