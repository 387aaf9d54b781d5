"""Property-based fuzzing of what the HTTP frontends decode: client garbage gets a 4xx, never a
500 or an exception.

Targets (about 1,000 examples each, in process, deadline=None):
- KServe JSON decoding: parse_http_infer on random request objects and raw bytes (700), then the
  real KServe HTTP app on 127.0.0.1 port 0 in front of an echo operator on the in-memory request
  plane (300);
- KServe binary-extension decoding: random JSON headers + binary tails + header lengths (700),
  then through the real app (300);
- OpenAI request bodies: completions and chat, through the real app in front of the real router
  and an engine-free LLM operator (500 each).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdist.operators.frontends.kserve import KSERVE_TO_NUMPY, HEADER_LEN, KServeError, KServeFrontend, parse_http_infer
from tdist.operators.frontends.openai import OpenAIFrontend
from tdist.operators.routing.router import RouterOperator
from tdist.runtime.config import OperatorConfig, WorkerConfig
from tdist.runtime.operator import Operator, OperatorContext, Request

try:  # tests/unit is a rootdir-less test folder; also importable as a package
    from test_llm_harness import FakeLLM, InProcessClient, make_context
except ImportError:  # pragma: no cover
    from tests.unit.test_llm_harness import FakeLLM, InProcessClient, make_context

FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------- strategies

leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
                 st.text(max_size=6))
json_value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=12)
small_ints = st.integers(-3, 6)
shapes = st.one_of(st.lists(small_ints, max_size=3), st.lists(st.sampled_from([0, 1, 2, 2**31 - 1, 2**31, 50_000_000]), max_size=3),
                   json_value)
datatypes = st.one_of(st.sampled_from([*KSERVE_TO_NUMPY, "FOO", "fp32"]), json_value)
elements = st.one_of(st.integers(-300, 300), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.text(max_size=4),
                     st.integers(-(2**70), 2**70))
data = st.one_of(st.lists(elements, max_size=8), st.lists(st.lists(elements, max_size=3), max_size=3), json_value)
input_params = st.one_of(st.none(), json_value, st.fixed_dictionaries({"binary_data_size": st.one_of(st.integers(-4, 40), json_value)}))
input_spec = st.one_of(json_value, st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(["a", "b", "x"]), json_value), "datatype": datatypes, "shape": shapes, "data": data,
    "parameters": input_params}))
client_params = st.one_of(
    json_value,
    st.dictionaries(st.sampled_from(["k", "timeout", "timeout_s", "binary_data_output", "kv_transfer_params", "tdist_x", "_y"]),
                    st.one_of(json_value, st.integers(-10, 10**9), st.integers(-(10**400), 10**400), st.floats()), max_size=3),
)
outputs = st.one_of(json_value, st.lists(st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "x"])},
                                                            optional={"parameters": st.one_of(json_value, st.fixed_dictionaries(
                                                                {"binary_data": json_value}))}), max_size=2))
kserve_request = st.one_of(json_value, st.fixed_dictionaries({}, optional={
    "inputs": st.one_of(st.lists(input_spec, max_size=3), json_value), "outputs": outputs, "parameters": client_params,
    "id": st.one_of(st.text(max_size=4), json_value)}))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


json_body = st.one_of(kserve_request.map(_dumps), st.binary(max_size=64),
                      kserve_request.map(_dumps).map(lambda b: b.replace(b"0", b"Infinity", 1)))


@st.composite
def binary_body(draw: Any) -> tuple[bytes, int | None]:
    head = draw(kserve_request.map(_dumps))
    tail = draw(st.binary(max_size=48))
    hl = draw(st.one_of(st.just(len(head)), st.none(), st.integers(-2, len(head) + len(tail) + 4)))
    return head + tail, hl


# ---------------------------------------------------------------- decoding, pure


def _decodes_or_400(body: bytes, header_length: int | None) -> None:
    try:
        parse_http_infer(body, header_length)
    except KServeError as exc:
        assert 400 <= exc.http_status < 500, exc.message


@settings(max_examples=700, **FUZZ)
@given(json_body)
def test_kserve_json_decoding(body: bytes) -> None:
    _decodes_or_400(body, None)


@settings(max_examples=700, **FUZZ)
@given(binary_body())
def test_kserve_binary_decoding(case: tuple[bytes, int | None]) -> None:
    _decodes_or_400(*case)


# ---------------------------------------------------------------- through the real apps


class Echo(Operator):
    async def execute(self, request: Request) -> None:
        await request.send(dict(request.inputs), parameters={"echoed": len(request.inputs)}, final=True)


class Served:
    """The real KServe and OpenAI frontends on free ports over the in-memory request plane, on an
    event loop of their own (hypothesis drives synchronous test functions)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        self.client = InProcessClient()
        self.client.add("echo.0", Echo(make_context("echo")))
        self.client.add("llm.0", FakeLLM(make_context("llm")))
        self.client.add("router.0", RouterOperator(make_context("router", "router", client=self.client, targets=["llm"])))
        oc = OperatorConfig(name="kserve", kind="frontend", targets=["echo"],
                            parameters={"protocol": "kserve", "http_port": 0, "grpc_port": None, "request_timeout_s": 10})
        wc = WorkerConfig(name="fe.0", component="fe", deployment="t", operators=[oc])
        self.kserve = KServeFrontend(OperatorContext(config=oc, worker=wc, logger=logging.getLogger("fuzz.kserve"),
                                                     client=self.client))
        await self.kserve.start()
        self.openai = OpenAIFrontend(make_context("openai", "frontend", client=self.client, targets=["router"],
                                                  parameters={"port": 0, "served_model_name": "tiny", "request_timeout_s": 10}))
        await self.openai.start()
        self.session = aiohttp.ClientSession()
        self.kserve_url = f"http://127.0.0.1:{self.kserve.stats()['http_port']}/v2/models/echo/infer"

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        async def go() -> tuple[int, bytes]:
            async with self.session.post(url, data=body, headers=headers) as r:
                return r.status, await r.read()

        return self.loop.run_until_complete(asyncio.wait_for(go(), 20))

    def close(self) -> None:
        async def stop() -> None:
            await self.session.close()
            await self.kserve.stop()
            await self.openai.stop()
            await self.client.close()

        self.loop.run_until_complete(stop())
        self.loop.close()


@pytest.fixture(scope="module")
def served() -> Any:
    s = Served()
    yield s
    s.close()


def _kserve_answer(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status != 200:
        assert isinstance(json.loads(body)["error"], str)


@settings(max_examples=300, **FUZZ, )
@given(body=json_body)
def test_kserve_http_json_bodies(served: Served, body: bytes) -> None:
    _kserve_answer(*served.post(served.kserve_url, body, {"Content-Type": "application/json"}))


@settings(max_examples=300, **FUZZ)
@given(case=binary_body())
def test_kserve_http_binary_bodies(served: Served, case: tuple[bytes, int | None]) -> None:
    body, hl = case
    headers = {"Content-Type": "application/octet-stream"} | ({HEADER_LEN: str(hl)} if hl is not None else {})
    _kserve_answer(*served.post(served.kserve_url, body, headers))


sampling = {
    "max_tokens": st.one_of(st.integers(-2, 8), json_value), "temperature": st.one_of(st.floats(-1, 3), json_value),
    "top_p": st.one_of(st.floats(-1, 2), json_value), "top_k": st.one_of(st.integers(-2, 50), json_value),
    "seed": st.one_of(st.integers(-1, 2**70), json_value), "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), json_value),
    "stream": st.one_of(st.booleans(), st.sampled_from(["false", "true", 0, 1]), json_value),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), json_value)}), json_value),
    "n": st.one_of(st.integers(0, 2), json_value), "logprobs": json_value, "echo": json_value, "best_of": json_value,
    "ignore_eos": json_value, "min_tokens": st.one_of(st.integers(-1, 3), json_value), "kv_transfer_params": json_value,
    "presence_penalty": st.one_of(st.floats(-3, 3), json_value), "stop_token_ids": json_value,
    "model": st.one_of(st.just("tiny"), json_value),
}
message = st.one_of(json_value, st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), json_value),
                                                                    "content": st.one_of(st.text(max_size=12), json_value)}))
completion = st.one_of(json_value, st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=2), json_value)}, optional=sampling))
chat = st.one_of(json_value, st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=3), json_value)}, optional=sampling))


def _openai_answer(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status != 200:
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)


@settings(max_examples=500, **FUZZ)
@given(body=completion)
def test_openai_completion_bodies(served: Served, body: Any) -> None:
    _openai_answer(*served.post(served.openai.url + "/v1/completions", _dumps(body), {"Content-Type": "application/json"}))


@settings(max_examples=500, **FUZZ)
@given(body=chat)
def test_openai_chat_bodies(served: Served, body: Any) -> None:
    _openai_answer(*served.post(served.openai.url + "/v1/chat/completions", _dumps(body), {"Content-Type": "application/json"}))


def test_the_fuzzed_apps_do_answer_well_formed_requests(served: Served) -> None:
    """The properties above are not vacuous: a good request through each app gets a 200."""
    arr = np.arange(3, dtype=np.int32)
    good = {"inputs": [{"name": "a", "datatype": "INT32", "shape": [3], "data": arr.tolist()}]}
    status, body = served.post(served.kserve_url, _dumps(good), {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [0, 1, 2]
    status, body = served.post(served.openai.url + "/v1/completions", _dumps({"prompt": "a b", "max_tokens": 2}),
                               {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["choices"][0]["text"] == "a b "
