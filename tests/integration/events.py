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
