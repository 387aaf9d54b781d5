"""Admission at the frontends, on free ports over the in-memory request plane: 429 with
Retry-After past max_concurrent_requests (OpenAI and KServe HTTP + gRPC), 401 without the API
key an OpenAI frontend's api_key_env names. (Body, shape and parameter limits:
test_frontend_guards.py, test_frontend_fuzz.py, tests/integration/test_frontend_limits.py.)"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import numpy as np
import openai
import pytest

from tdist.errors import OperatorLoadError
from tdist.operators.frontends.kserve import KServeFrontend
from tdist.operators.frontends.openai import OpenAIFrontend
from tdist.runtime.config import OperatorConfig, WorkerConfig
from tdist.runtime.operator import Operator, OperatorContext, Request

try:  # tests/unit is a rootdir-less test folder; also importable as a package
    from test_llm_harness import FakeLLM, InProcessClient, make_context
except ImportError:  # pragma: no cover
    from tests.unit.test_llm_harness import FakeLLM, InProcessClient, make_context


class Gate(Operator):
    """Answers once `release` is set; `entered` says a request is inside."""

    entered: asyncio.Event  # set by the test, on its event loop
    release: asyncio.Event

    async def execute(self, request: Request) -> None:
        type(self).entered.set()
        await type(self).release.wait()
        await request.send(dict(request.inputs), final=True)


async def test_openai_answers_429_past_max_concurrent_requests() -> None:
    client = InProcessClient()
    client.add("llm.0", FakeLLM(make_context("llm", parameters={"delay_s": 0.05})))
    fe = OpenAIFrontend(make_context("fe", "frontend", client=client, targets=["llm"],
                                     parameters={"port": 0, "served_model_name": "tiny", "max_concurrent_requests": 1}))
    await fe.start()
    try:
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "go", "max_tokens": 40, "stream": True}
            async with s.post(fe.url + "/v1/completions", json=body) as first:
                assert first.status == 200
                await first.content.readline()  # the first request is streaming now
                async with s.post(fe.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as second:
                    assert second.status == 429 and second.headers["Retry-After"] == "1"
                    err = (await second.json())["error"]
                    assert err["code"] == "rate_limit_exceeded" and "max_concurrent_requests" in err["message"]
                await first.read()
            async with s.post(fe.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as third:
                assert third.status == 200  # the slot came back
        assert fe.admission.inflight == 0
    finally:
        await fe.stop()


async def test_openai_api_key(monkeypatch) -> None:
    monkeypatch.setenv("TDIST_TEST_OPENAI_KEY", "sekrit-123")
    client = InProcessClient()
    client.add("llm.0", FakeLLM(make_context("llm")))
    fe = OpenAIFrontend(make_context("fe", "frontend", client=client, targets=["llm"],
                                     parameters={"port": 0, "served_model_name": "tiny", "api_key_env": "TDIST_TEST_OPENAI_KEY"}))
    await fe.start()
    try:
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit-123"}):
                async with s.post(fe.url + "/v1/completions", json={"prompt": "a"}, headers=headers) as r:
                    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
            async with s.get(fe.url + "/v1/models") as r:
                assert r.status == 401
            async with s.get(fe.url + "/health") as r:
                assert r.status == 200  # probes need no key
        good = openai.AsyncOpenAI(base_url=fe.url + "/v1", api_key="sekrit-123", max_retries=0, timeout=10)
        assert (await good.completions.create(model="tiny", prompt="a b", max_tokens=2)).choices[0].text == "a b "
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=fe.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        await fe.stop()
    monkeypatch.delenv("TDIST_TEST_OPENAI_KEY")
    with pytest.raises(OperatorLoadError, match="TDIST_TEST_OPENAI_KEY"):
        OpenAIFrontend(make_context("fe", "frontend", client=client, targets=["llm"], parameters={"api_key_env": "TDIST_TEST_OPENAI_KEY"}))


async def test_kserve_answers_429_past_max_concurrent_requests() -> None:
    Gate.entered, Gate.release = asyncio.Event(), asyncio.Event()
    client = InProcessClient()
    client.add("gate.0", Gate(make_context("gate")))
    oc = OperatorConfig(name="kserve", kind="frontend", targets=["gate"],
                        parameters={"protocol": "kserve", "http_port": 0, "grpc_port": 0, "max_concurrent_requests": 1})
    wc = WorkerConfig(name="fe.0", component="fe", deployment="t", operators=[oc])
    fe = KServeFrontend(OperatorContext(config=oc, worker=wc, logger=logging.getLogger("test.kserve"), client=client))
    await fe.start()
    url = f"http://127.0.0.1:{fe.stats()['http_port']}/v2/models/gate/infer"
    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [3]}]})
    try:
        async with aiohttp.ClientSession() as s:
            async def call() -> tuple[int, dict]:
                async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    return r.status, await r.json()

            first = asyncio.create_task(call())
            await asyncio.wait_for(Gate.entered.wait(), 10)
            async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "1" and "max_concurrent_requests" in (await r.json())["error"]
            import tritonclient.grpc.aio as grpcaio
            from tritonclient.utils import InferenceServerException

            g = grpcaio.InferenceServerClient(f"127.0.0.1:{fe.stats()['grpc_port']}")
            inp = grpcaio.InferInput("x", [1], "INT32")
            inp.set_data_from_numpy(np.array([3], dtype=np.int32))
            with pytest.raises(InferenceServerException) as e:
                await g.infer("gate", [inp])
            assert "RESOURCE_EXHAUSTED" in str(e.value.status())
            await g.close()
            Gate.release.set()
            status, answer = await first
            assert status == 200 and answer["outputs"][0]["data"] == [3]
            status, _ = await call()
            assert status == 200
        assert fe.core.admission.inflight == 0
    finally:
        await fe.stop()


async def test_a_cancellation_swallowed_during_publish_still_cancels_the_request() -> None:
    """A caller cancelled while the transport waits for its publish acknowledgement (JetStream's
    PubAck through asyncio.wait_for) must not go on waiting for responses: on Python 3.11,
    wait_for returns a result that arrives together with the cancellation and drops the latter
    (how a KServe client's disconnect was lost under load). The request ends cancelled and its
    cancellation reaches the workers."""
    from tdist.runtime.planes.request_memory import MemoryRequestPlane

    client = InProcessClient()
    client.add("gate.0", Gate(make_context("gate")))
    Gate.entered, Gate.release = asyncio.Event(), asyncio.Event()
    acked: asyncio.Future = asyncio.get_running_loop().create_future()
    sent = asyncio.Event()
    plane = client.plane
    assert isinstance(plane, MemoryRequestPlane)
    submit = plane.submit

    async def acked_submit(msg, payload) -> None:  # the transport's publish, then a PubAck wait
        await submit(msg, payload)
        sent.set()
        await asyncio.wait_for(asyncio.shield(acked), 5)

    plane.submit = acked_submit  # type: ignore[method-assign]
    cancels: list[str] = []
    await plane.on_cancel(cancels.append)

    async def call() -> None:
        await anext(client.infer("gate", inputs={"x": np.array([1])}, timeout_s=30))

    task = asyncio.create_task(call())
    await asyncio.wait_for(sent.wait(), 5)
    acked.set_result(None)  # the acknowledgement and the cancellation land in the same loop turn
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert len(cancels) == 1
    Gate.release.set()
    await client.close()
