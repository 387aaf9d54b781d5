"""Operators used by the runtime-spine integration tests.

They report what happened inside the worker (started, cancelled, concurrency) as JSON events on
a NATS subject named by the `events` parameter, so tests wait on real signals, not sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np

from tdist.runtime import Operator, Request


class _Reporting(Operator):
    async def event(self, kind: str, request: Request, **extra: object) -> None:
        subject = self.parameters.get("events")
        if subject and self.context.client is not None:
            body = {"kind": kind, "id": request.id, "worker": self.context.worker.name, "pid": os.getpid(), **extra}
            await self.context.client.nc.publish(subject, json.dumps(body).encode())
            await self.context.client.nc.flush()


class Echo(_Reporting):
    """Returns its inputs and which worker (and deployment) answered."""

    async def execute(self, request: Request) -> None:
        await request.send(dict(request.inputs), parameters={"worker": self.context.worker.name,
                                                             "deployment": self.context.worker.deployment}, final=True)


class Stream(_Reporting):
    """Sends `n` partial responses (index i), then a final one."""

    async def execute(self, request: Request) -> None:
        n = int(request.parameters.get("n", 5))
        for i in range(n):
            await request.send({"i": np.array([i])})
        await request.send(parameters={"done": True}, final=True)


class Fail(_Reporting):
    async def execute(self, request: Request) -> None:
        raise ValueError(f"bad value {request.parameters.get('value')!r}")


class Slow(_Reporting):
    """Sleeps `sleep_s`; reports started / cancelled / finished."""

    async def execute(self, request: Request) -> None:
        await self.event("started", request, attempt=request.attempt)
        try:
            await asyncio.sleep(float(request.parameters.get("sleep_s", 30)))
        except asyncio.CancelledError:
            await self.event("cancelled", request)
            raise
        await request.send(parameters={"worker": self.context.worker.name, "attempt": request.attempt}, final=True)


class Parent(_Reporting):
    """Calls `child` (a Slow) one hop down and reports its own cancellation."""

    async def execute(self, request: Request) -> None:
        child = self.context.remote(str(self.parameters.get("child", "slow")))
        await self.event("started", request)
        try:
            async for _ in child.async_infer(parameters=dict(request.parameters)):
                pass
        except asyncio.CancelledError:
            await self.event("cancelled", request)
            raise
        await request.send(final=True)


class Concurrency(_Reporting):
    """Reports how many requests were executing on this worker when it started."""

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        self.active = 0

    async def execute(self, request: Request) -> None:
        self.active += 1
        try:
            seen = self.active
            await asyncio.sleep(float(request.parameters.get("sleep_s", 0.05)))
            await request.send(parameters={"active": seen}, final=True)
        finally:
            self.active -= 1


class StreamThenSleep(_Reporting):
    """Sends two partials, reports `streamed`, then sleeps `sleep_s` before its final."""

    async def execute(self, request: Request) -> None:
        for i in range(2):
            await request.send({"i": np.array([i])})
        await self.event("streamed", request, attempt=request.attempt)
        await asyncio.sleep(float(request.parameters.get("sleep_s", 30)))
        await request.send(final=True)


class Words(_Reporting):
    """Streams the prompt back word by word as `text` deltas (what LLM operators do with tokens)."""

    async def execute(self, request: Request) -> None:
        words = str(request.parameters.get("prompt", "")).split()
        limit = int(request.parameters.get("max_tokens", len(words)))
        for w in words[:limit]:
            await request.send(parameters={"text": w + " "})
        await request.send(parameters={"text": "", "finish_reason": "length"}, final=True)


class Spawner(_Reporting):
    """Starts a helper process at start (as engines do) and reports its pid in stats()."""

    async def start(self) -> None:
        import subprocess

        self.child = subprocess.Popen(["sleep", "300"])

    def stats(self) -> dict:
        return {"child_pid": self.child.pid}

    async def execute(self, request: Request) -> None:
        await request.send(final=True)

    async def stop(self) -> None:
        self.child.kill()
