"""OpenAI frontend over the router and fake LLM workers, driven by the real `openai` client."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

try:  # tests/unit is a rootdir-less test folder; also importable as a package
    from test_llm_harness import FakeLLM, InProcessClient, make_context
except ImportError:  # pragma: no cover
    from tests.unit.test_llm_harness import FakeLLM, InProcessClient, make_context
from tdist.errors import OperatorLoadError
from tdist.operators.frontends.openai import OpenAIFrontend
from tdist.operators.frontends.openai_wire import api_error_of
from tdist.operators.routing.router import RouterOperator
from tdist.errors import BadRequest, NoWorkerError, RequestTimeout


async def _stack(n_workers: int = 2, *, delay_s: float = 0.0, **frontend_params: object):
    client = InProcessClient()
    workers = []
    for i in range(n_workers):
        w = FakeLLM(make_context("llm", parameters={"delay_s": delay_s}))
        client.add(f"llm.{i}", w)
        workers.append(w)
    client.add("router.0", RouterOperator(make_context("router", "router", client=client, targets=["llm"])))
    fe = OpenAIFrontend(make_context("frontend", "frontend", client=client, targets=["router"],
                                     parameters={"port": 0, "served_model_name": "tiny", **frontend_params}))
    await fe.start()
    return client, workers, fe


@pytest.fixture
async def stack():
    client, workers, fe = await _stack()
    yield client, workers, fe
    await fe.stop()


def oai(fe: OpenAIFrontend) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fe.url + "/v1", api_key="none", max_retries=0, timeout=10)


async def test_bound_port_is_discoverable(stack, tmp_path) -> None:
    _, _, fe = stack
    assert fe.bound_port and fe.bound_port > 0
    assert fe.stats()["port"] == fe.bound_port and fe.stats()["url"] == fe.url
    pf = tmp_path / "port"
    fe2 = OpenAIFrontend(make_context("fe2", "frontend", client=InProcessClient(), targets=["router"],
                                      parameters={"port": 0, "port_file": str(pf)}))
    await fe2.start()
    try:
        assert int(pf.read_text()) == fe2.bound_port != fe.bound_port
    finally:
        await fe2.stop()


async def test_models(stack) -> None:
    _, _, fe = stack
    models = await oai(fe).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        await oai(fe).models.retrieve("gpt-9")


async def test_model_names_come_from_discovery() -> None:
    client, _, fe = await _stack(1, served_model_name=None)
    try:
        async def workers(*, max_age_s: float = 1.0) -> dict:
            return {"llm.0": {"kinds": {"llm": "vllm"}, "per_operator": {"llm": {"stats": {"model": "tiny-llama"}}}},
                    "router.0": {"kinds": {"router": "router"}, "per_operator": {"router": {"stats": {}}}}}

        client.workers = workers  # type: ignore[attr-defined]
        assert [m.id for m in (await oai(fe).models.list()).data] == ["tiny-llama"]
        r = await oai(fe).completions.create(model="tiny-llama", prompt="a", max_tokens=1)
        assert r.model == "tiny-llama"
        with pytest.raises(openai.NotFoundError):
            await oai(fe).completions.create(model="tiny", prompt="a", max_tokens=1)
    finally:
        await fe.stop()


async def test_planned_model_names_hold_when_discovery_says_nothing() -> None:
    """The plan gives the frontend its deployment's served names; /v1/models is right even before
    (or without) a discovery listing that carries them, and names found later are added."""
    client, _, fe = await _stack(1, served_model_name=None, served_models=["tiny-llama"])
    try:
        async def nobody(*, max_age_s: float = 1.0) -> dict:
            return {}

        client.workers = nobody  # type: ignore[attr-defined]
        assert [m.id for m in (await oai(fe).models.list()).data] == ["tiny-llama"]
        r = await oai(fe).completions.create(model="tiny-llama", prompt="a", max_tokens=1)
        assert r.model == "tiny-llama"

        async def joined(*, max_age_s: float = 1.0) -> dict:
            return {"llm.9": {"kinds": {"llm": "vllm"}, "per_operator": {"llm": {"stats": {"model": "other"}}}}}

        client.workers = joined  # type: ignore[attr-defined]
        fe._models_checked = 0.0
        assert sorted(m.id for m in (await oai(fe).models.list()).data) == ["other", "tiny-llama"]
    finally:
        await fe.stop()


async def test_completion_non_stream(stack) -> None:
    _, _, fe = stack
    r = await oai(fe).completions.create(model="tiny", prompt="one two three", max_tokens=3, temperature=0)
    assert r.choices[0].text == "one two three "
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 3, 6)


async def test_completion_stream_and_usage(stack) -> None:
    _, _, fe = stack
    stream = await oai(fe).completions.create(model="tiny", prompt="a b c d", max_tokens=4, stream=True,
                                              stream_options={"include_usage": True})
    texts, finishes, usage = [], [], None
    async for ch in stream:
        if ch.choices:
            texts.append(ch.choices[0].text)
            finishes.append(ch.choices[0].finish_reason)
        if ch.usage:
            usage = ch.usage
    assert texts == ["a ", "b ", "c ", "d "]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert usage is not None and usage.completion_tokens == 4


async def test_chat_stream_and_not(stack) -> None:
    client, workers, fe = stack
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = await oai(fe).chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.object == "chat.completion"
    assert any(seen.get("messages") == msgs for w in workers for seen in w.seen)
    stream = await oai(fe).chat.completions.create(model="tiny", messages=msgs, max_tokens=3, stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_errors_are_openai_shaped(stack) -> None:
    _, _, fe = stack
    c = oai(fe)
    with pytest.raises(openai.NotFoundError) as e404:
        await c.completions.create(model="nope", prompt="x")
    assert e404.value.status_code == 404 and e404.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e400:
        await c.completions.create(model="tiny", prompt="x", temperature=-1)
    assert e400.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        await c.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError):
        await c.completions.create(model="tiny", prompt="x", n=2)
    async with aiohttp.ClientSession() as s:
        async with s.post(fe.url + "/v1/completions", data="not json") as r:
            assert r.status == 400 and "error" in await r.json()
        async with s.get(fe.url + "/v1/nothing") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_no_worker_is_503_and_timeout_504() -> None:
    client, _, fe = await _stack(0)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            await oai(fe).completions.create(model="tiny", prompt="x")
        assert e.value.status_code == 503
    finally:
        await fe.stop()
    client, _, fe = await _stack(1, delay_s=0.5, request_timeout_s=0.2)
    try:
        with pytest.raises(openai.APIStatusError) as e:
            await oai(fe).completions.create(model="tiny", prompt="x y", max_tokens=5)
        assert e.value.status_code == 504
    finally:
        await fe.stop()


async def test_client_disconnect_cancels_the_worker() -> None:
    client, (w,), fe = await _stack(1, delay_s=0.02)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(fe.url + "/v1/completions",
                              json={"model": "tiny", "prompt": "go", "max_tokens": 1000, "stream": True}) as r:
                line = await r.content.readline()
                assert json.loads(line[len(b"data: "):])["choices"][0]["text"] == "go "
        for _ in range(100):
            if w.cancelled:
                break
            await asyncio.sleep(0.02)
        assert w.cancelled == 1
    finally:
        await fe.stop()


def test_error_mapping_and_config() -> None:
    assert api_error_of(BadRequest("x", detail={"param": "top_p"})).status == 400
    assert api_error_of(NoWorkerError("x")).status == 503
    assert api_error_of(RequestTimeout("x")).status == 504
    assert api_error_of(ValueError("x")).status == 500
    with pytest.raises(OperatorLoadError, match="targets"):
        OpenAIFrontend(make_context("fe", "frontend", client=InProcessClient()))
