"""Deployments on the in-memory request plane, for unit tests of the layers above it.

`MemoryDeployment` runs real `Worker`s (operators loaded by "pkg.mod:Class", OperatorHosts,
discovery entries, cancellation) and real `RequestClient`s on one `MemoryBroker` and one
`MemoryDiscovery`: the whole request path of production except the NATS transport. Used by
tests/unit/test_request_plane_memory.py and the router / frontend tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator

from tdist.runtime.config import DataPlaneConfig, OperatorConfig, RequestPlaneConfig, WorkerConfig
from tdist.runtime.planes.codec import InlineCodec
from tdist.runtime.planes.discovery import MemoryDiscovery
from tdist.runtime.planes.request import RequestClient
from tdist.runtime.planes.request_memory import MemoryBroker
from tdist.runtime.worker import Worker


class MemoryDeployment:
    """Workers and clients of one deployment sharing a MemoryBroker and a MemoryDiscovery."""

    def __init__(self, name: str = "test", *, heartbeat_s: float = 0.05, ack_wait_s: float = 5.0) -> None:
        self.name = name
        self.broker = MemoryBroker(ack_wait_s=ack_wait_s)
        self.discovery = MemoryDiscovery(ttl_s=5.0)
        self.request_plane = RequestPlaneConfig(heartbeat_interval_s=heartbeat_s, ack_wait_s=ack_wait_s)
        self.workers: dict[str, Worker] = {}
        self._tasks: dict[str, asyncio.Task[int]] = {}
        self._clients: list[RequestClient] = []

    def config(self, instance: str, *operators: OperatorConfig) -> WorkerConfig:
        return WorkerConfig(
            name=instance, component=instance.split(".")[0], deployment=self.name, operators=list(operators),
            request_plane=self.request_plane, data_plane=DataPlaneConfig(kind="inline"),
        )

    async def start_worker(self, instance: str, *operators: OperatorConfig, timeout_s: float = 10.0) -> Worker:
        """Start a worker hosting `operators`; returns once its discovery entry says ready."""
        worker = Worker(self.config(instance, *operators), drain_timeout_s=2.0)
        self.workers[instance] = worker
        self._tasks[instance] = asyncio.create_task(
            worker.serve(self.broker.plane(self.name), self.discovery, InlineCodec()), name=f"worker-{instance}")
        deadline = time.monotonic() + timeout_s
        while worker.state != "ready":
            task = self._tasks[instance]
            if task.done():
                raise RuntimeError(f"worker {instance} ended while starting: {worker.error or task.result()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {instance} not ready within {timeout_s} s")
            await asyncio.sleep(0.01)
        return worker

    async def stop_worker(self, instance: str) -> int:
        """Drain and stop a worker (as SIGTERM does); returns its exit code."""
        self.workers[instance].request_stop()
        return await asyncio.wait_for(self._tasks.pop(instance), 10.0)

    async def client(self) -> RequestClient:
        client = RequestClient(self.broker.plane(self.name), codec=InlineCodec(), discovery=self.discovery,
                               config=self.request_plane)
        await client.start()
        self._clients.append(client)
        return client

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        for instance in list(self._tasks):
            with contextlib.suppress(Exception):
                await self.stop_worker(instance)


@contextlib.asynccontextmanager
async def memory_deployment(name: str = "test", **kw: Any) -> AsyncIterator[MemoryDeployment]:
    dep = MemoryDeployment(name, **kw)
    try:
        yield dep
    finally:
        await dep.close()


def operator(name: str, implementation: str, **kw: Any) -> OperatorConfig:
    return OperatorConfig(name=name, implementation=implementation, **kw)
