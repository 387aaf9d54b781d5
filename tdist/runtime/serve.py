"""The worker side of the request plane: how one hosted operator takes and answers requests.

Per operator, `max_inflight_requests` runner tasks take requests from a local queue. A pull loop
fills the queue from the operator's durable JetStream consumer, asking only for the free share
of the window (and only once at least half of it is free), so a busy worker takes nothing more
and the stream holds the rest for other replicas: that is the backpressure. Directed requests
arrive on a core-NATS subject of this instance and join the same queue. A request is acked after
its final response; if the worker dies first, JetStream redelivers it after ack_wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tdist.errors import (
    OperatorError,
    PayloadTooLarge,
    RequestCancelled,
    RequestError,
    RequestTimeout,
)
from tdist.runtime import protocol as P
from tdist.runtime.config import OperatorConfig
from tdist.runtime.operator import Operator, Request, Response, current_request
from tdist.runtime.planes.codec import decode_tensors, encode_tensors

if TYPE_CHECKING:  # pragma: no cover
    from tdist.runtime.worker import Worker

log = logging.getLogger("tdist.serve")


@dataclass
class _Item:
    data: bytes
    msg: Any  # the JetStream message to ack, or None for a directed (core) request
    attempt: int
    reply: str | None


class OperatorHost:
    """Serves one operator inside a worker."""

    def __init__(self, worker: "Worker", config: OperatorConfig, operator: Operator) -> None:
        self.worker = worker
        self.config = config
        self.operator = operator
        self.name = config.name
        self.max_inflight = config.max_inflight_requests
        self.pull_threshold = max(1, self.max_inflight // 2)
        self.busy = 0
        self.served = 0
        self.errors = 0
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._capacity = asyncio.Event()
        self._runners: list[asyncio.Task[None]] = []
        self._pull_task: asyncio.Task[None] | None = None
        self._psub: Any = None
        self._dsub: Any = None
        self._stopping = False
        self._credits = 0  # messages our outstanding pull requests may still deliver
        self._last_pull = 0.0
        self._inbox = ""
        self._next_subject = ""
        self.running: dict[str, asyncio.Task[None]] = {}
        self._inflight_msgs: dict[str, Any] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._m_status: dict[str, Any] = {}
        labels = (worker.config.name, self.name)
        self._m_inflight = worker.metrics.inflight.labels(*labels)
        self._m_latency = worker.metrics.latency.labels(*labels)
        self._m_responses = worker.metrics.responses.labels(*labels)

    # ---- intake -----------------------------------------------------------------------------

    async def start_serving(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        w = self.worker
        rp = w.config.request_plane
        stream = P.stream_name(w.deployment)
        durable = P.consumer_name(self.name)
        consumer = ConsumerConfig(
            durable_name=durable,
            filter_subject=P.request_subject(w.deployment, self.name),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=rp.ack_wait_s,
            max_deliver=rp.max_deliver,
            max_ack_pending=100_000,
            max_waiting=4096,
        )
        try:
            await w.js.add_consumer(stream, config=consumer)
        except Exception as exc:  # exists with another config (another replica raced): reuse it
            log.debug("add_consumer %s: %s", durable, exc)
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = w.nc.new_inbox()
        self._psub = await w.nc.subscribe(self._inbox, cb=self._on_pulled)
        self._dsub = await w.nc.subscribe(
            P.direct_subject(w.deployment, self.name, w.config.name), cb=self._on_direct
        )
        self._runners = [asyncio.create_task(self._runner(), name=f"{self.name}-runner-{i}") for i in range(self.max_inflight)]
        self._pull_task = asyncio.create_task(self._pull_loop(), name=f"{self.name}-pull")
        self._sweeper = asyncio.create_task(self._keep_in_progress(), name=f"{self.name}-in-progress")

    async def _on_direct(self, msg: Any) -> None:
        if self._stopping:
            return
        reply = (msg.headers or {}).get(P.HDR_REPLY)
        self._queue.put_nowait(_Item(msg.data, None, 1, reply))

    async def _on_pulled(self, msg: Any) -> None:
        """A message for one of our pull requests: a request (one credit used) or a status."""
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None and not msg.data:
            if status in ("408", "409"):  # the pull request ended (expired / limits): credits come back
                try:
                    returned = int(headers.get("Nats-Pending-Messages", "0"))
                except ValueError:
                    returned = 0
                self._credits = max(0, self._credits - returned)
                if status == "409":
                    log.warning("pull request for %s ended: %s", self.name, headers.get("Description"))
                self._capacity.set()
            return  # 100 idle heartbeat / 404 no messages: nothing to do
        self._credits = max(0, self._credits - 1)
        try:
            attempt = int(msg.metadata.num_delivered)
        except Exception:
            attempt = 1
        self._queue.put_nowait(_Item(msg.data, msg, attempt, headers.get(P.HDR_REPLY)))

    async def _pull_loop(self) -> None:
        """Keep a pull window of max_inflight: ask for the free share once half of it is free.

        Pull requests are long-lived (expires) credits on a private inbox, so a busy operator
        costs one pull request per half-window, not one round trip per request.
        """
        import json

        expires_s = 5.0
        while not self._stopping:
            self._capacity.clear()
            free = self.max_inflight - self.busy - self._queue.qsize() - self._credits
            if self._credits and time.monotonic() - self._last_pull > expires_s + 1.0:
                self._credits = 0  # every pull request has expired by now, whatever we heard
                continue
            if free >= self.pull_threshold:
                self._credits += free
                self._last_pull = time.monotonic()
                body = json.dumps({"batch": free, "expires": int(expires_s * 1e9)}).encode()
                try:
                    await self.worker.nc.publish(self._next_subject, body, reply=self._inbox)
                except Exception as exc:
                    self._credits -= free
                    log.warning("pull request for %s failed: %s", self.name, exc)
                continue
            try:  # woken when a request finishes or a pull request ends; re-pull at least every expires_s
                await asyncio.wait_for(self._capacity.wait(), expires_s)
            except asyncio.TimeoutError:
                pass

    async def _runner(self) -> None:
        while True:
            item = await self._queue.get()
            self.busy += 1
            self._m_inflight.inc()
            try:
                await self._handle(item)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one request kill a runner
                log.exception("internal error handling a request of %s", self.name)
            finally:
                self.busy -= 1
                self._m_inflight.dec()
                self._capacity.set()

    # ---- one request ------------------------------------------------------------------------

    async def _handle(self, item: _Item) -> None:
        w = self.worker
        t0 = time.perf_counter()
        try:
            req = P.decode_request(item.data)
        except RequestError as exc:
            if item.reply:
                await self._publish_final_error(item.reply, "?", 0, exc, item.attempt)
            await _term(item.msg)
            return
        if w.is_cancelled(req.id):
            await self._release_inputs(req.inputs)
            await _term(item.msg)
            return
        if req.expired():
            await self._release_inputs(req.inputs)
            await self._publish_final_error(
                req.reply, req.id, 0, RequestTimeout("deadline passed before a worker took the request", operator=self.name, request_id=req.id), item.attempt
            )
            await _term(item.msg)
            self._count("timeout")
            return

        seq = 0

        async def send(resp: Response) -> None:
            nonlocal seq
            try:
                outputs = await encode_tensors(w.codec, resp.outputs)
                payload = P.encode_response(
                    P.ResponseMessage(
                        id=req.id, seq=seq, final=resp.final, worker=w.config.name, attempt=item.attempt,
                        outputs=outputs, parameters=resp.parameters,
                    )
                )
            except RequestError:
                raise
            if len(payload) > w.nc.max_payload:
                raise PayloadTooLarge(
                    f"response is {len(payload)} bytes, over the NATS max_payload of {w.nc.max_payload}; "
                    "enable the data plane (data_plane: auto) for big tensors",
                    operator=self.name, request_id=req.id,
                )
            seq += 1
            await w.nc.publish(req.reply, payload)
            self._m_responses.inc()

        request = Request(
            id=req.id, operator=self.name, inputs={}, parameters=req.parameters,
            deadline=req.deadline, send=send, worker=w.config.name, attempt=item.attempt,
        )
        task = asyncio.create_task(self._execute(request, req.inputs), name=f"req-{req.id}")
        self.running[req.id] = task
        if item.msg is not None:
            self._inflight_msgs[req.id] = item.msg
        status = "ok"
        try:
            try:
                await task
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # the worker itself is stopping: leave the message unacked for redelivery
                status = "cancelled"
                if not request.final_sent:
                    await self._publish_final_error(
                        req.reply, req.id, seq, RequestCancelled("cancelled by the caller", operator=self.name, request_id=req.id), item.attempt
                    )
            except RequestError as exc:
                status = exc.kind
                if not request.final_sent:
                    await self._publish_final_error(req.reply, req.id, seq, exc, item.attempt)
            except Exception as exc:
                status = "error"
                log.error("operator %s failed on request %s:\n%s", self.name, req.id, traceback.format_exc())
                err = OperatorError(
                    f"{type(exc).__name__}: {exc}", operator=self.name, request_id=req.id,
                    detail={"type": type(exc).__name__, "worker": w.config.name},
                )
                if not request.final_sent:
                    await self._publish_final_error(req.reply, req.id, seq, err, item.attempt)
            else:
                if not request.final_sent:
                    await request.send(final=True)
            await _ack(item.msg)
        finally:
            self.running.pop(req.id, None)
            self._inflight_msgs.pop(req.id, None)
        self._count(status)
        self._m_latency.observe(time.perf_counter() - t0)

    async def _execute(self, request: Request, wire_inputs: dict[str, Any]) -> None:
        current_request.set(request)
        try:
            async with asyncio.timeout(max(0.0, request.time_left_s)):
                request.inputs = await decode_tensors(self.worker.codec, wire_inputs)
                await self.operator.execute(request)
        except TimeoutError:
            raise RequestTimeout(
                "deadline passed while the operator was running; it was cancelled",
                operator=self.name, request_id=request.id,
            ) from None

    async def _keep_in_progress(self) -> None:
        """Tell JetStream that long requests are still alive so they are not redelivered meanwhile.

        One sweeper per operator (not a task per request): every ack_wait/3 it marks each
        executing JetStream message in progress.
        """
        interval = max(0.2, self.worker.config.request_plane.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            for msg in list(self._inflight_msgs.values()):
                try:
                    await msg.in_progress()
                except Exception:
                    pass

    async def _publish_final_error(self, reply: str | None, rid: str, seq: int, err: RequestError, attempt: int) -> None:
        if not reply:
            return
        err.operator = err.operator or self.name
        err.request_id = err.request_id or rid
        payload = P.encode_response(P.error_response(rid, seq, err, worker=self.worker.config.name, attempt=attempt))
        try:
            await self.worker.nc.publish(reply, payload)
        except Exception as exc:
            log.warning("could not send error for %s: %s", rid, exc)

    async def _release_inputs(self, wires: dict[str, Any]) -> None:
        """Free the producer's copies of tensors nobody will read (best effort; leases catch the rest)."""
        for wire in wires.values():
            try:
                await self.worker.codec.release(wire)
            except Exception as exc:
                log.debug("release failed: %s", exc)

    def _count(self, status: str) -> None:
        if status == "ok":
            self.served += 1
        else:
            self.errors += 1
        counter = self._m_status.get(status)
        if counter is None:
            counter = self._m_status[status] = self.worker.metrics.requests.labels(self.worker.config.name, self.name, status)
        counter.inc()

    def cancel(self, request_id: str) -> bool:
        task = self.running.get(request_id)
        if task is not None and not task.done():
            task.cancel()
            return True
        return False

    # ---- shutdown ---------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Take nothing new, finish what was taken (bounded), then stop the runners."""
        self._stopping = True
        self._capacity.set()
        if self._pull_task is not None:
            self._pull_task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for sub in (self._dsub, self._psub):
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:
                    pass
        deadline = time.monotonic() + timeout_s
        while (self.busy or not self._queue.empty()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in self._runners:
            t.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        while not self._queue.empty():  # taken but never started: hand back at once
            item = self._queue.get_nowait()
            if item.msg is not None:
                try:
                    await item.msg.nak()
                except Exception:
                    pass

    def status(self) -> dict[str, Any]:
        return {"inflight": self.busy, "queued": self._queue.qsize(), "served": self.served, "errors": self.errors}


async def _ack(msg: Any) -> None:
    if msg is not None:
        try:
            await msg.ack()
        except Exception as exc:
            log.debug("ack failed: %s", exc)


async def _term(msg: Any) -> None:
    if msg is not None:
        try:
            await msg.term()
        except Exception as exc:
            log.debug("term failed: %s", exc)
