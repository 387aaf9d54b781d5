"""The request plane in memory: the `RequestPlane` of planes/request_plane.py within one process.

For unit tests of what sits above the transport — RequestClient, OperatorHost, the worker, the
router, the disaggregated flow, the frontends — without a nats-server. It keeps the NATS plane's
semantics, so the layers above behave the same on both:

- a work queue per (deployment, operator), created when the first host serves it (a request to
  a deployment with no queue is a NoWorkerError, like a missing JetStream stream);
- a queued request goes to a host only while that host's window (free runner slots) is open,
  round robin among the open ones: per-worker max_inflight backpressure;
- queued requests are settled once (ack / term / nak); an unsettled one is redelivered with the
  next attempt number after `ack_wait_s` (`in_progress` restarts that clock), at most
  `max_deliver` times, as JetStream does;
- a directed request goes to its instance only, or its caller gets "no responders";
- messages are the encoded bytes (planes stay byte-for-byte what NATS would carry).

`MemoryBroker` plays the server: every plane of one test (callers and workers) shares one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import tdist.runtime.protocol as P
from tdist.errors import NoWorkerError
from tdist.runtime.planes.request_plane import Delivery

#: NATS's default max_payload, so size limits show up in unit tests as they would in production.
DEFAULT_MAX_PAYLOAD = 1024 * 1024


@dataclass
class _Queued:
    data: bytes
    reply: str | None
    attempt: int = 1


@dataclass
class _Settle:
    """A delivered queued request until its host settles it (or its ack wait runs out)."""

    broker: "MemoryBroker"
    key: tuple[str, str]
    item: _Queued
    timer: asyncio.TimerHandle | None = None
    settled: bool = False

    def arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.broker.ack_wait_s, self._expired)

    def _done(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        if self.timer is not None:
            self.timer.cancel()
        return True

    def _expired(self) -> None:
        if self._done():
            self.broker._requeue(self.key, self.item)

    async def ack(self) -> None:
        self._done()

    async def term(self) -> None:
        self._done()

    async def nak(self) -> None:
        if self._done():
            self.broker._requeue(self.key, self.item)

    async def in_progress(self) -> None:
        if not self.settled:
            self.arm()


@dataclass
class _Intake:
    broker: "MemoryBroker"
    key: tuple[str, str]
    instance: str
    window: Callable[[], int]
    deliver: Callable[[Delivery], None]
    closed: bool = False

    def wake(self) -> None:
        if not self.closed:
            self.broker._dispatch(self.key)

    async def close(self) -> None:
        self.closed = True
        self.broker._remove_intake(self)


@dataclass
class _Listener:
    remove: Callable[[], None]

    async def close(self) -> None:
        self.remove()


@dataclass
class MemoryBroker:
    """The shared state of in-memory planes: queues, hosts, inboxes and cancellation listeners."""

    max_payload: int = DEFAULT_MAX_PAYLOAD
    ack_wait_s: float = 5.0
    max_deliver: int = 3
    queues: dict[tuple[str, str], deque[_Queued]] = field(default_factory=dict)
    streams: set[str] = field(default_factory=set)
    _intakes: dict[tuple[str, str], list[_Intake]] = field(default_factory=dict)
    _direct: dict[tuple[str, str, str], _Intake] = field(default_factory=dict)
    _inboxes: dict[str, Callable[[str, bytes | None], None]] = field(default_factory=dict)
    _cancel: dict[str, list[Callable[[str], Any]]] = field(default_factory=dict)
    _rr: Any = field(default_factory=itertools.count)

    def plane(self, deployment: str) -> "MemoryRequestPlane":
        return MemoryRequestPlane(self, deployment)

    def _dispatch(self, key: tuple[str, str]) -> None:
        """Hand queued requests to hosts whose window is open, round robin among them."""
        queue = self.queues.get(key)
        while queue:
            open_ = [i for i in self._intakes.get(key, []) if not i.closed and i.window() > 0]
            if not open_:
                return
            intake = open_[next(self._rr) % len(open_)]
            item = queue.popleft()
            settle = _Settle(self, key, item)
            settle.arm()
            intake.deliver(Delivery(item.data, item.attempt, item.reply, settle))

    def _requeue(self, key: tuple[str, str], item: _Queued) -> None:
        if item.attempt >= self.max_deliver:
            return  # dropped as poison, as JetStream does after max_deliver
        self.queues.setdefault(key, deque()).appendleft(_Queued(item.data, item.reply, item.attempt + 1))
        self._dispatch(key)

    def _remove_intake(self, intake: _Intake) -> None:
        hosts = self._intakes.get(intake.key, [])
        if intake in hosts:
            hosts.remove(intake)
        dkey = (*intake.key, intake.instance)
        if self._direct.get(dkey) is intake:
            del self._direct[dkey]

    def _to_inbox(self, subject: str, payload: bytes | None) -> None:
        inbox, _, token = subject.rpartition(".")
        deliver = self._inboxes.get(inbox)
        if deliver is not None:  # nobody listening: dropped, as core NATS does
            deliver(token, payload)


class MemoryRequestPlane:
    """One process's (or one test party's) view of a MemoryBroker, for one deployment."""

    def __init__(self, broker: MemoryBroker, deployment: str) -> None:
        self.broker = broker
        self.deployment = deployment

    @property
    def max_payload(self) -> int:
        return self.broker.max_payload

    async def listen(self, inbox: str, deliver: Callable[[str, bytes | None], None]) -> _Listener:
        self.broker._inboxes[inbox] = deliver
        return _Listener(lambda: self.broker._inboxes.pop(inbox, None))

    async def submit(self, msg: P.RequestMessage, payload: bytes) -> None:
        b = self.broker
        if msg.instance is not None:
            intake = b._direct.get((self.deployment, msg.operator, msg.instance))
            if intake is None or intake.closed:
                b._to_inbox(msg.reply, None)  # "no responders"
            else:
                intake.deliver(Delivery(payload, 1, msg.reply, None))
            return
        if self.deployment not in b.streams:
            raise NoWorkerError(
                f"deployment {self.deployment!r} has no request stream (no worker ever started)",
                operator=msg.operator, request_id=msg.id,
            )
        key = (self.deployment, msg.operator)
        b.queues.setdefault(key, deque()).append(_Queued(payload, msg.reply))
        b._dispatch(key)

    async def cancel(self, request_id: str) -> None:
        for callback in list(self.broker._cancel.get(self.deployment, [])):
            callback(request_id)

    async def serve(self, operator: str, instance: str, *, max_inflight: int, window: Callable[[], int],
                    deliver: Callable[[Delivery], None]) -> _Intake:
        b = self.broker
        b.streams.add(self.deployment)
        key = (self.deployment, operator)
        intake = _Intake(b, key, instance, window, deliver)
        b._intakes.setdefault(key, []).append(intake)
        b._direct[(self.deployment, operator, instance)] = intake
        b._dispatch(key)
        return intake

    async def reply(self, subject: str, payload: bytes) -> None:
        self.broker._to_inbox(subject, payload)

    async def on_cancel(self, callback: Callable[[str], Any]) -> _Listener:
        listeners = self.broker._cancel.setdefault(self.deployment, [])
        listeners.append(callback)
        return _Listener(lambda: listeners.remove(callback) if callback in listeners else None)

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass
