"""One operator's intake on the NATS request plane: its durable JetStream pull consumer, pulled
within the host's window of free runner slots, plus the core-NATS subject of requests directed to
this instance. Kept apart from request_nats.py (connection, publishing, the caller side) so each
stays readable; it knows the plane only through `IntakePlane`, so the two files import one way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable, Protocol

import tdist.runtime.protocol as P
from tdist.runtime.config import RequestPlaneConfig
from tdist.runtime.planes.request_plane import Delivery

log = logging.getLogger("tdist.request")


class IntakePlane(Protocol):
    """What an intake uses of its NATS request plane."""

    nc: Any
    js: Any
    deployment: str
    config: RequestPlaneConfig

    def forget_intake(self, intake: "PullIntake") -> None: ...


class PullIntake:
    """One operator's intake: its durable JetStream consumer, pulled within the host's window,
    plus the core-NATS subject of requests directed to this instance."""

    def __init__(self, plane: IntakePlane, operator: str, instance: str, max_inflight: int,
                 window: Callable[[], int], deliver: Callable[[Delivery], None]) -> None:
        self.plane = plane
        self.operator = operator
        self.instance = instance
        self.window = window
        self.deliver = deliver
        self.pull_threshold = max(1, max_inflight // 2)
        self._capacity = asyncio.Event()
        self._credits = 0  # messages our outstanding pull requests may still deliver
        self._last_pull = 0.0
        self._closed = False
        self._subs: list[Any] = []
        self._pull_task: asyncio.Task[None] | None = None
        self._inbox = ""
        self._next_subject = ""

    async def start(self) -> None:
        p = self.plane
        await self._ensure_consumer()
        stream, durable = P.stream_name(p.deployment), P.consumer_name(self.operator)
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = p.nc.new_inbox()
        self._subs.append(await p.nc.subscribe(self._inbox, cb=self._on_pulled))
        self._subs.append(await p.nc.subscribe(
            P.direct_subject(p.deployment, self.operator, self.instance), cb=self._on_direct))
        self._pull_task = asyncio.create_task(self._pull_loop(), name=f"{self.operator}-pull")

    async def reconnected(self) -> None:
        """The server may have restarted: our pull requests died with it (their credits are void)
        and a memory-stored consumer is gone. Re-create the consumer, then pull afresh."""
        if self._closed:
            return
        await self._ensure_consumer()
        self._credits = 0
        self._capacity.set()

    async def _ensure_consumer(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        p = self.plane
        stream = P.stream_name(p.deployment)
        durable = P.consumer_name(self.operator)
        consumer = ConsumerConfig(
            durable_name=durable,
            filter_subject=P.request_subject(p.deployment, self.operator),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=p.config.ack_wait_s,
            max_deliver=p.config.max_deliver,
            max_ack_pending=100_000,
            max_waiting=4096,
        )
        try:
            await p.js.add_consumer(stream, config=consumer)
        except Exception as exc:  # exists with another config (another replica raced): reuse it
            log.debug("add_consumer %s: %s", durable, exc)

    def wake(self) -> None:
        self._capacity.set()

    async def close(self) -> None:
        self._closed = True
        self.plane.forget_intake(self)
        self._capacity.set()
        if self._pull_task is not None:
            self._pull_task.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def _on_direct(self, msg: Any) -> None:
        if not self._closed:
            self.deliver(Delivery(msg.data, 1, (msg.headers or {}).get(P.HDR_REPLY), None))

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
                    log.warning("pull request for %s ended: %s", self.operator, headers.get("Description"))
                self._capacity.set()
            return  # 100 idle heartbeat / 404 no messages: nothing to do
        self._credits = max(0, self._credits - 1)
        try:
            attempt = int(msg.metadata.num_delivered)
        except Exception:
            attempt = 1
        self.deliver(Delivery(msg.data, attempt, headers.get(P.HDR_REPLY), msg))

    async def _pull_loop(self) -> None:
        """Keep a pull window of the host's free slots: ask for the free share once half is free.

        Pull requests are long-lived (expires) credits on a private inbox, so a busy operator
        costs one pull request per half-window, not one round trip per request.
        """
        expires_s = 5.0
        while not self._closed:
            self._capacity.clear()
            free = self.window() - self._credits
            if self._credits and time.monotonic() - self._last_pull > expires_s + 1.0:
                self._credits = 0  # every pull request has expired by now, whatever we heard
                continue
            if free >= self.pull_threshold:
                self._credits += free
                self._last_pull = time.monotonic()
                body = json.dumps({"batch": free, "expires": int(expires_s * 1e9)}).encode()
                try:
                    await self.plane.nc.publish(self._next_subject, body, reply=self._inbox)
                except Exception as exc:
                    self._credits -= free
                    log.warning("pull request for %s failed: %s", self.operator, exc)
                continue
            try:  # woken when a request finishes or a pull request ends; re-pull at least every expires_s
                await asyncio.wait_for(self._capacity.wait(), expires_s)
            except asyncio.TimeoutError:
                pass
