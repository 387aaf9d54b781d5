"""In-process LLM deployments for unit tests of the router and frontends, on the in-memory plane.

`InProcessClient` is a real `RequestClient` on a `MemoryBroker` (the in-memory request plane)
whose `add(instance, operator)` hosts an operator object in this process behind a real
`OperatorHost`, published in a `MemoryDiscovery` with its live in-flight counts: requests,
streaming, deadlines, cancellation and typed errors take the production path, minus NATS.
`FakeLLM` is an operator speaking the team's LLM convention without an engine (echoes words of
the prompt, one per chunk). Imported by tests/unit/test_router.py, test_disagg_router.py and
test_openai_frontend.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest

from tdist.errors import NoWorkerError, OperatorError
from tdist.operators.llm.convention import parse_prompt, parse_sampling
from tdist.runtime.config import OperatorConfig, RequestPlaneConfig, WorkerConfig
from tdist.runtime.metrics import WorkerMetrics
from tdist.runtime.operator import Operator, OperatorContext, Request
from tdist.runtime.planes.codec import InlineCodec
from tdist.runtime.planes.discovery import MemoryDiscovery
from tdist.runtime.planes.discovery_entry import OperatorStatus, WorkerEntry
from tdist.runtime.planes.request import RequestClient
from tdist.runtime.planes.request_memory import MemoryBroker
from tdist.runtime.serve import Cancellations, OperatorHost, ServingContext

#: Runner slots of every hosted operator: instances have ample capacity unless a test says otherwise.
HARNESS_MAX_INFLIGHT = 64


class InProcessClient(RequestClient):
    """A RequestClient whose deployment's instances are operator objects of this process."""

    def __init__(self, deployment: str = "test") -> None:
        self.broker = MemoryBroker()
        super().__init__(self.broker.plane(deployment), codec=InlineCodec(), discovery=MemoryDiscovery(ttl_s=3600),
                         config=RequestPlaneConfig())
        self.hosts: dict[tuple[str, str], OperatorHost] = {}  # (operator, instance) → its host
        self.cancelled = Cancellations()
        self._pending: list[tuple[str, Operator | None, str]] = []  # (instance, operator or None: remove, name)
        self._cancel_listener: Any = None

    def add(self, instance: str, op: Operator) -> None:
        """Host `op` as `instance` (from the next request on)."""
        self._pending.append((instance, op, op.name))

    def remove(self, instance: str, operator: str) -> None:
        """Stop hosting `operator` on `instance` and take it out of discovery (from the next request on)."""
        self._pending.append((instance, None, operator))

    async def _apply(self) -> None:
        if self._cancel_listener is None:
            self._cancel_listener = await self.plane.on_cancel(self._on_cancel)
        while self._pending:
            instance, op, name = self._pending.pop(0)
            old = self.hosts.pop((name, instance), None)
            if old is not None:
                await old.drain(0.0)
            if op is None:
                continue
            cfg = op.context.config.model_copy(update={"max_inflight_requests": HARNESS_MAX_INFLIGHT})
            serving = ServingContext(instance=instance, plane=self.plane, codec=InlineCodec(), metrics=WorkerMetrics(instance),
                                     request_plane=self.config, cancelled=self.cancelled)
            host = OperatorHost(serving, cfg, op)
            await host.start_serving()
            self.hosts[(name, instance)] = host

    def _on_cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)
        for host in self.hosts.values():
            host.cancel(request_id)

    async def _listing(self, max_age_s: float) -> Any:
        """Publish every instance's entry with its live figures, then read discovery afresh."""
        await self._apply()
        by_instance: dict[str, dict[str, OperatorHost]] = {}
        for (name, instance), host in self.hosts.items():
            by_instance.setdefault(instance, {})[name] = host
        for key in set((await self.discovery.list())) - set(by_instance):
            await self.discovery.delete(key)
        for instance, hosts in by_instance.items():
            entry = WorkerEntry(
                name=instance, component=instance.split(".")[0], deployment=self.deployment, operators=sorted(hosts),
                kinds={n: h.config.kind for n, h in hosts.items()}, state="ready",
                per_operator={n: OperatorStatus(**h.status(), stats=h.operator.stats()) for n, h in hosts.items()},
            )
            await self.discovery.put(instance, entry.to_wire())
        return await super()._listing(0.0)

    async def infer(self, operator: str, **kw: Any) -> Any:  # type: ignore[override]
        await self._apply()
        async for resp in super().infer(operator, **kw):
            yield resp


def make_context(name: str, kind: str = "python", *, client: Any = None, **config: Any) -> OperatorContext:
    cfg = OperatorConfig(name=name, kind=kind, **config)
    worker = WorkerConfig(name=f"{name}.0", component=name, deployment="test", operators=[cfg])
    return OperatorContext(config=cfg, worker=worker, logger=logging.getLogger(f"test.{name}"), client=client)


class FakeLLM(Operator):
    """Engine-free LLM operator: streams the prompt's words back, one per chunk, then finishes.

    Parameters: delay_s (per chunk), fail (raise OperatorError), tag (prefixed to text).
    """

    def __init__(self, context: OperatorContext) -> None:
        super().__init__(context)
        self.delay_s = float(self.parameters.get("delay_s", 0.0))
        self.tag = str(self.parameters.get("tag", ""))
        self.seen: list[dict[str, Any]] = []
        self.cancelled = 0

    async def execute(self, request: Request) -> None:
        prompt = parse_prompt(request.parameters, request.inputs)
        sampling = parse_sampling(request.parameters)
        self.seen.append(dict(request.parameters))
        if self.parameters.get("fail"):
            raise OperatorError("engine exploded", operator=self.name)
        words = (prompt.routing_key().split() or ["x"]) * sampling.max_tokens
        words = words[: sampling.max_tokens]
        try:
            for i, w in enumerate(words):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                last = i == len(words) - 1
                params: dict[str, Any] = {"text": self.tag + w + " "}
                if last:
                    params["finish_reason"] = "length"
                    params["usage"] = {"prompt_tokens": len(prompt.routing_key().split()), "completion_tokens": len(words)}
                await request.send({"token_ids": np.asarray([i], np.int64)}, parameters=params, final=last)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


# -- self-tests of the harness --------------------------------------------------------------


async def test_in_process_client_streams_and_cancels() -> None:
    client = InProcessClient()
    llm = FakeLLM(make_context("llm", parameters={"delay_s": 0.01}))
    client.add("w0", llm)
    chunks = [r async for r in client.infer("llm", parameters={"prompt": "a b c", "max_tokens": 3})]
    assert [c.parameters["text"] for c in chunks] == ["a ", "b ", "c "]
    assert chunks[-1].final and chunks[-1].parameters["usage"]["completion_tokens"] == 3

    gen = client.infer("llm", parameters={"prompt": "a", "max_tokens": 100})
    await gen.__anext__()
    await gen.aclose()
    await asyncio.sleep(0.02)
    assert llm.cancelled == 1
    with pytest.raises(NoWorkerError):
        async for _ in client.infer("nope", parameters={}):
            pass
