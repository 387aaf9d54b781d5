"""An in-process stand-in for the request plane, for unit tests of the router and frontend.

`InProcessClient` has the two methods operators use from a RequestClient — `infer(...)` (an
async iterator of Responses, cancelling the callee when closed) and `instances(operator)` —
and dispatches to operator objects living in this process. `FakeLLM` is an operator speaking
the team's LLM convention without an engine (echoes words of the prompt, one per chunk).
Also imported by tests/unit/test_router*.py, test_openai*.py and tests/integration (vLLM).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, AsyncIterator

import numpy as np
import pytest

from tdist.errors import NoWorkerError, OperatorError, RequestError, RequestTimeout
from tdist.operators.llm.llm_common import parse_prompt, parse_sampling
from tdist.runtime.config import OperatorConfig, WorkerConfig
from tdist.runtime.operator import Operator, OperatorContext, Request, Response, current_request

_ids = itertools.count(1)


class InProcessClient:
    """Routes `infer(operator, instance=...)` to in-process operators; undirected → round robin."""

    def __init__(self) -> None:
        self.ops: dict[str, dict[str, Operator]] = {}
        self.inflight: dict[tuple[str, str], int] = {}
        self.calls: list[tuple[str, str]] = []  # (operator, instance) per request
        self._rr = itertools.count()

    def add(self, instance: str, op: Operator) -> None:
        self.ops.setdefault(op.name, {})[instance] = op

    def remove(self, instance: str, operator: str) -> None:
        self.ops.get(operator, {}).pop(instance, None)

    async def instances(self, operator: str, *, max_age_s: float = 1.0) -> dict[str, dict[str, Any]]:
        return {
            name: {"operators": [operator], "state": "ready", "per_operator": {operator: {"inflight": self.inflight.get((operator, name), 0), "queued": 0, "stats": {}}}}
            for name in sorted(self.ops.get(operator, {}))
        }

    async def infer(
        self,
        operator: str,
        *,
        inputs: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        instance: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Response]:
        hosts = self.ops.get(operator, {})
        if instance is None:
            if not hosts:
                raise NoWorkerError(f"no ready worker hosts operator {operator!r}", operator=operator)
            instance = sorted(hosts)[next(self._rr) % len(hosts)]
        if instance not in hosts:
            raise NoWorkerError(f"instance {instance!r} does not serve {operator!r}", operator=operator)
        op = hosts[instance]
        rid = request_id or f"r{next(_ids)}"
        parent = current_request.get()
        deadline = time.time() + (timeout_s if timeout_s is not None else 60.0)
        if parent is not None:
            deadline = min(deadline, parent.deadline)
        queue: asyncio.Queue[Response | BaseException] = asyncio.Queue()

        async def send(resp: Response) -> None:
            queue.put_nowait(resp)

        req = Request(id=rid, operator=operator, inputs=dict(inputs or {}), parameters=dict(parameters or {}),
                      deadline=deadline, send=send, worker=instance)
        self.calls.append((operator, instance))
        key = (operator, instance)
        self.inflight[key] = self.inflight.get(key, 0) + 1

        async def run() -> None:
            token = current_request.set(req)
            try:
                await op.execute(req)
                if not req.final_sent:
                    await req.send(final=True)
            except asyncio.CancelledError:
                raise
            except RequestError as exc:
                queue.put_nowait(exc)
            except Exception as exc:
                queue.put_nowait(OperatorError(f"{type(exc).__name__}: {exc}", operator=operator, request_id=rid))
            finally:
                current_request.reset(token)

        task = asyncio.create_task(run())
        try:
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise RequestTimeout("deadline passed", operator=operator, request_id=rid)
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.final:
                    return
        finally:
            self.inflight[key] -= 1
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:
                    pass


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
