"""Wait for events the test operators publish on NATS (a real signal under a timeout)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import nats


class Events:
    def __init__(self, url: str, subject: str) -> None:
        self.url = url
        self.subject = subject
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seen: list[dict[str, Any]] = []

    async def __aenter__(self) -> "Events":
        self.nc = await nats.connect(self.url)

        async def cb(msg: Any) -> None:
            self.queue.put_nowait(json.loads(msg.data))

        await self.nc.subscribe(self.subject, cb=cb)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.nc.close()

    async def wait(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 20.0) -> dict[str, Any]:
        for ev in self.seen:
            if pred(ev):
                return ev

        async def loop() -> dict[str, Any]:
            while True:
                ev = await self.queue.get()
                self.seen.append(ev)
                if pred(ev):
                    return ev

        return await asyncio.wait_for(loop(), timeout_s)

    async def wait_while(self, pred: Callable[[dict[str, Any]], bool], call: "asyncio.Future[Any]",
                         timeout_s: float = 20.0) -> dict[str, Any]:
        """wait(pred), but if `call` (the request that should cause the event) ends first, fail
        with what it ended with — not a bare timeout 20 s later."""
        waiting = asyncio.ensure_future(self.wait(pred, timeout_s))
        await asyncio.wait({waiting, call}, return_when=asyncio.FIRST_COMPLETED)
        if waiting.done() or not call.done():
            return await waiting
        waiting.cancel()
        try:
            outcome = f"answered {call.result()!r}"
        except BaseException as exc:  # noqa: BLE001 - reported, whatever it is
            outcome = f"failed with {type(exc).__name__}: {exc}"
        raise AssertionError(f"the request ended before the awaited event ({outcome}); events seen: {self.seen}")

