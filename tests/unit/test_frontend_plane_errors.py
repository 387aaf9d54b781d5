"""The request plane's own refusals reach HTTP clients as ARCHITECTURE's status codes: a full work
queue (`Overloaded`) is 429 with Retry-After, a request plane that stored nothing
(`RequestPlaneDown`) is 503 — in the KServe and OpenAI error shapes, never a 500."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import numpy as np
import pytest

from tdist.errors import Overloaded, RequestPlaneDown
from tdist.operators.frontends.guards import Admission
from tdist.operators.frontends.kserve import KServeFrontend
from tdist.operators.frontends.openai_wire import api_error_of
from tdist.runtime.config import OperatorConfig, WorkerConfig
from tdist.runtime.operator import Operator, OperatorContext, Request

try:
    from test_llm_harness import InProcessClient, make_context
except ImportError:  # pragma: no cover
    from tests.unit.test_llm_harness import InProcessClient, make_context

REFUSALS = {"busy": Overloaded, "down": RequestPlaneDown}


class Echo(Operator):
    async def execute(self, request: Request) -> None:
        await request.send(dict(request.inputs), final=True)


class RefusingPlane(InProcessClient):
    """The deployment's request plane, refusing requests to `busy` (queue full) and `down`
    (nothing stored) the way the NATS plane does, before any worker sees them."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("echo", *REFUSALS):
            self.add("w.0", Echo(make_context(name)))

    async def infer(self, operator: str, **kw: Any) -> Any:  # type: ignore[override]
        if operator in REFUSALS:
            raise REFUSALS[operator](f"refused by the request plane ({operator})", operator=operator)
        async for resp in super().infer(operator, **kw):
            yield resp


@pytest.fixture
async def kserve():
    oc = OperatorConfig(name="kserve", kind="frontend",
                        parameters={"protocol": "kserve", "http_port": 0, "grpc_port": 0})
    wc = WorkerConfig(name="fe.0", component="fe", deployment="t", operators=[oc])
    fe = KServeFrontend(OperatorContext(config=oc, worker=wc, logger=logging.getLogger("test.kserve"),
                                        client=RefusingPlane()))
    await fe.start()
    try:
        yield fe
    finally:
        await fe.stop()


def _body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], "data": [1, 2]}]}


async def test_kserve_http_answers_overloaded_429_and_plane_down_503(kserve) -> None:
    base = f"http://127.0.0.1:{kserve.stats()['http_port']}/v2/models"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/echo/infer", json=_body()) as r:
            assert r.status == 200
            assert np.array((await r.json())["outputs"][0]["data"]).tolist() == [1, 2]
        async with s.post(f"{base}/busy/infer", json=_body()) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == str(Admission.RETRY_AFTER_S)
            assert "refused by the request plane (busy)" in (await r.json())["error"]
        async with s.post(f"{base}/down/infer", json=_body()) as r:
            assert r.status == 503
            assert "refused by the request plane (down)" in (await r.json())["error"]


def test_openai_maps_overloaded_to_429_and_plane_down_to_503() -> None:
    busy = api_error_of(Overloaded("queue full", operator="router"))
    assert (busy.status, busy.body()["error"]["code"]) == (429, "overloaded")
    down = api_error_of(RequestPlaneDown("no stream", operator="router"))
    assert (down.status, down.body()["error"]["code"]) == (503, "request_plane_down")
