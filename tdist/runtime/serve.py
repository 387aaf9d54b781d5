"""The serving side of the request plane: how one hosted operator takes and answers requests.

Per operator, `max_inflight_requests` runner tasks take requests from a local queue. The
transport's intake (`RequestPlane.serve`) fills that queue with the operator's queued requests
only while the host's window — runners free minus requests already waiting — is open, which is
the backpressure, plus every request directed to this instance. A queued request is acked after
its final response; if the worker dies first, the transport redelivers it to another replica.

An OperatorHost gets a `ServingContext`, the few things of its worker it uses, not the Worker
itself: so worker.py imports this module and not the other way round, and a host runs in unit
tests on the in-memory plane with no worker around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any

import tdist.runtime.protocol as P
from tdist.errors import (
    OperatorError,
    PayloadTooLarge,
    RequestCancelled,
    RequestError,
    RequestTimeout,
)
from tdist.runtime.calls import Request, Response, current_request
from tdist.runtime.config import OperatorConfig, RequestPlaneConfig
from tdist.runtime.metrics import WorkerMetrics
from tdist.runtime.operator import Operator
from tdist.runtime.planes.codec import TensorCodec, decode_tensors, encode_tensors
from tdist.runtime.planes.request_plane import Delivery, Intake, RequestPlane

log = logging.getLogger("tdist.serve")


class Cancellations:
    """Request ids cancelled lately, kept `keep_s`: a cancellation may arrive before any host
    took the request, which must then not run when it is taken."""

    def __init__(self, keep_s: float = 600.0) -> None:
        self.keep_s = keep_s
        self._until: dict[str, float] = {}

    def add(self, request_id: str) -> None:
        self._until[request_id] = time.time() + self.keep_s

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._until

    def prune(self) -> None:
        now = time.time()
        self._until = {k: v for k, v in self._until.items() if v > now}


@dataclass(frozen=True)
class ServingContext:
    """What an OperatorHost needs of the worker that runs it."""

    instance: str  # this worker's name: the instance requests are directed to, and the responses' `worker`
    plane: RequestPlane
    codec: TensorCodec  # the data plane: tensors in and out
    metrics: WorkerMetrics
    request_plane: RequestPlaneConfig  # ack_wait_s: how often long requests are marked in progress
    cancelled: Cancellations


class OperatorHost:
    """Serves one operator inside a worker."""

    def __init__(self, serving: ServingContext, config: OperatorConfig, operator: Operator) -> None:
        self.serving = serving
        self.config = config
        self.operator = operator
        self.name = config.name
        self.max_inflight = config.max_inflight_requests
        self.busy = 0
        self.served = 0
        self.errors = 0
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._runners: list[asyncio.Task[None]] = []
        self._intake: Intake | None = None
        self.running: dict[str, asyncio.Task[None]] = {}
        self._inflight_msgs: dict[str, Any] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._m_status: dict[str, Any] = {}
        labels = (serving.instance, self.name)
        self._m_inflight = serving.metrics.inflight.labels(*labels)
        self._m_latency = serving.metrics.latency.labels(*labels)
        self._m_responses = serving.metrics.responses.labels(*labels)

    # ---- intake -----------------------------------------------------------------------------

    def window(self) -> int:
        """Requests this host can take now: free runners minus requests already waiting."""
        return self.max_inflight - self.busy - self._queue.qsize()

    def _take(self, item: Delivery) -> None:
        self._queue.put_nowait(item)

    async def start_serving(self) -> None:
        s = self.serving
        self._intake = await s.plane.serve(self.name, s.instance, max_inflight=self.max_inflight,
                                           window=self.window, deliver=self._take)
        self._runners = [asyncio.create_task(self._runner(), name=f"{self.name}-runner-{i}") for i in range(self.max_inflight)]
        self._sweeper = asyncio.create_task(self._keep_in_progress(), name=f"{self.name}-in-progress")

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
                if self._intake is not None:
                    self._intake.wake()

    # ---- one request ------------------------------------------------------------------------

    async def _handle(self, item: Delivery) -> None:
        s = self.serving
        t0 = time.perf_counter()
        try:
            req = P.decode_request(item.data)
        except RequestError as exc:
            if item.reply:
                await self._publish_final_error(item.reply, "?", 0, exc, item.attempt)
            await _term(item.settle)
            return
        if req.id in s.cancelled:
            await self._release_inputs(req.inputs)
            await _term(item.settle)
            return
        if req.expired():
            await self._release_inputs(req.inputs)
            await self._publish_final_error(
                req.reply, req.id, 0, RequestTimeout("deadline passed before a worker took the request", operator=self.name, request_id=req.id), item.attempt
            )
            await _term(item.settle)
            self._count("timeout")
            return

        seq = 0

        async def send(resp: Response) -> None:
            nonlocal seq
            try:
                outputs = await encode_tensors(s.codec, resp.outputs)
                payload = P.encode_response(
                    P.ResponseMessage(
                        id=req.id, seq=seq, final=resp.final, worker=s.instance, attempt=item.attempt,
                        outputs=outputs, parameters=resp.parameters,
                    )
                )
            except RequestError:
                raise
            if len(payload) > s.plane.max_payload:
                raise PayloadTooLarge(
                    f"response is {len(payload)} bytes, over the NATS max_payload of {s.plane.max_payload}; "
                    "enable the data plane (data_plane: auto) for big tensors",
                    operator=self.name, request_id=req.id,
                )
            seq += 1
            await s.plane.reply(req.reply, payload)
            self._m_responses.inc()

        request = Request(
            id=req.id, operator=self.name, inputs={}, parameters=req.parameters,
            deadline=req.deadline, send=send, worker=s.instance, attempt=item.attempt,
        )
        task = asyncio.create_task(self._execute(request, req.inputs), name=f"req-{req.id}")
        self.running[req.id] = task
        if item.settle is not None:
            self._inflight_msgs[req.id] = item.settle
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
                    detail={"type": type(exc).__name__, "worker": s.instance},
                )
                if not request.final_sent:
                    await self._publish_final_error(req.reply, req.id, seq, err, item.attempt)
            else:
                if not request.final_sent:
                    await request.send(final=True)
            await _ack(item.settle)
        finally:
            self.running.pop(req.id, None)
            self._inflight_msgs.pop(req.id, None)
        self._count(status)
        self._m_latency.observe(time.perf_counter() - t0)

    async def _execute(self, request: Request, wire_inputs: dict[str, Any]) -> None:
        current_request.set(request)
        try:
            async with asyncio.timeout(max(0.0, request.time_left_s)):
                request.inputs = await decode_tensors(self.serving.codec, wire_inputs)
                await self.operator.execute(request)
        except TimeoutError:
            raise RequestTimeout(
                "deadline passed while the operator was running; it was cancelled",
                operator=self.name, request_id=request.id,
            ) from None

    async def _keep_in_progress(self) -> None:
        """Tell the transport that long requests are still alive so they are not redelivered meanwhile.

        One sweeper per operator (not a task per request): every ack_wait/3 it marks each
        executing queued request in progress.
        """
        interval = max(0.2, self.serving.request_plane.ack_wait_s / 3)
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
        payload = P.encode_response(P.error_response(rid, seq, err, worker=self.serving.instance, attempt=attempt))
        try:
            await self.serving.plane.reply(reply, payload)
        except Exception as exc:
            log.warning("could not send error for %s: %s", rid, exc)

    async def _release_inputs(self, wires: dict[str, Any]) -> None:
        """Free the producer's copies of tensors nobody will read (best effort; leases catch the rest)."""
        for wire in wires.values():
            try:
                await self.serving.codec.release(wire)
            except Exception as exc:
                log.debug("release failed: %s", exc)

    def _count(self, status: str) -> None:
        if status == "ok":
            self.served += 1
        else:
            self.errors += 1
        counter = self._m_status.get(status)
        if counter is None:
            counter = self._m_status[status] = self.serving.metrics.requests.labels(self.serving.instance, self.name, status)
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
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._intake is not None:
            await self._intake.close()
        deadline = time.monotonic() + timeout_s
        while (self.busy or not self._queue.empty()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in self._runners:
            t.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        while not self._queue.empty():  # taken but never started: hand back at once
            item = self._queue.get_nowait()
            if item.settle is not None:
                try:
                    await item.settle.nak()
                except Exception:
                    pass

    def status(self) -> dict[str, Any]:
        return {"inflight": self.busy, "queued": self._queue.qsize(), "served": self.served, "errors": self.errors}


async def _ack(settle: Any) -> None:
    if settle is not None:
        try:
            await settle.ack()
        except Exception as exc:
            log.debug("ack failed: %s", exc)


async def _term(settle: Any) -> None:
    if settle is not None:
        try:
            await settle.term()
        except Exception as exc:
            log.debug("term failed: %s", exc)
