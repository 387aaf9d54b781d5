"""Operators of the frontend-limits integration tests (tests/integration/test_frontend_limits.py).

`Held` is spine_ops.Slow with two differences that matter there, since the test cancels as
soon as it sees "started", so the cancellation can land while that report is still being
flushed: the flush runs under asyncio.shield (cancelling nats-py's flush leaves a cancelled PONG
future its read loop then fails on, losing the worker's connection), and a cancellation during
the "started" report is reported as "cancelled" too.
"""

from __future__ import annotations

import asyncio
import json
import os

from tdist.runtime import Operator, Request


class Held(Operator):
    """Holds a request `sleep_s` seconds; reports started / cancelled on the `events` subject."""

    async def event(self, kind: str, request: Request) -> None:
        nc = self.context.client.nc
        body = {"kind": kind, "id": request.id, "worker": self.context.worker.name, "pid": os.getpid()}
        await nc.publish(str(self.parameters["events"]), json.dumps(body).encode())
        await asyncio.shield(nc.flush())

    async def execute(self, request: Request) -> None:
        try:  # a cancellation may land while "started" is still being flushed: report it too
            await self.event("started", request)
            await asyncio.sleep(float(request.parameters.get("sleep_s", 30)))
        except asyncio.CancelledError:
            await self.event("cancelled", request)
            raise
        await request.send(final=True)
