"""KServe v2 frontend against an in-process fake deployment, with the real tritonclient clients.

The deployment behind the frontend is small python operators served on the in-memory request
plane (test_llm_harness.InProcessClient: real RequestClient, OperatorHosts and discovery
entries), so these tests need no NATS; tests/integration/test_kserve_triton.py runs the same
clients against real Triton models.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest

from tdist.errors import BadRequest
from tdist.operators.frontends.kserve import (
    KServeFrontend,
    parse_http_infer,
    render_http_infer,
    InferResult,
    serialize_bytes,
    tensor_from_raw,
)
from tdist.runtime.config import OperatorConfig, WorkerConfig
from tdist.runtime.operator import Operator, OperatorContext, Request

try:  # tests/unit is a rootdir-less test folder; also importable as a package
    from test_llm_harness import InProcessClient, make_context
except ImportError:  # pragma: no cover
    from tests.unit.test_llm_harness import InProcessClient, make_context

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ENCODER_MD = {
    "name": "encoder",
    "versions": ["1"],
    "platform": "python",
    "inputs": [{"name": "input", "datatype": "INT64", "shape": [-1]}],
    "outputs": [{"name": "output", "datatype": "INT64", "shape": [-1]}],
}
ENCODER_CONFIG = {
    "name": "encoder",
    "backend": "python",
    "max_batch_size": 0,
    "input": [{"name": "input", "data_type": "TYPE_INT64", "dims": ["-1"]}],
    "output": [{"name": "output", "data_type": "TYPE_INT64", "dims": ["-1"]}],
    "instance_group": [{"name": "encoder_0", "kind": "KIND_CPU", "count": 2}],
    "parameters": {"input_copies": {"string_value": "2"}},
}


class Echo(Operator):
    async def execute(self, request: Request) -> None:
        await request.send(dict(request.inputs), parameters={"echoed": len(request.inputs)}, final=True)


class Encoder(Operator):
    async def execute(self, request: Request) -> None:
        x = request.inputs["input"]
        await request.send({"output": np.invert(np.tile(x, 2))}, final=True)

    def stats(self) -> dict[str, Any]:
        return {"model_metadata": ENCODER_MD, "model_config": ENCODER_CONFIG}


class Streamer(Operator):
    async def execute(self, request: Request) -> None:
        for i in range(3):
            await request.send({"out": np.array([i], dtype=np.int32)}, final=i == 2)


class Fails(Operator):
    async def execute(self, request: Request) -> None:
        raise BadRequest("input 'x' must be FP32", operator=self.name)


class Idle(Operator):
    """Stands for the frontend's own entry in discovery (kind frontend: not a model)."""

    async def execute(self, request: Request) -> None:
        raise AssertionError("a frontend is not called as a model")


class FakeClient(InProcessClient):
    """The deployment: echo, streamer, fails on echo.0, a Triton-like encoder on enc.0, the
    frontend on fe.0; records what the frontend asked (operator, parameters, timeout_s)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.timeouts: list[float | None] = []
        for name, cls in (("echo", Echo), ("streamer", Streamer), ("fails", Fails)):
            self.add("echo.0", cls(make_context(name)))
        self.add("enc.0", Encoder(make_context("encoder", "triton")))
        self.add("fe.0", Idle(make_context("kserve", "frontend")))

    async def infer(self, operator: str, **kw: Any) -> Any:  # type: ignore[override]
        self.calls.append((operator, dict(kw.get("parameters") or {})))
        self.timeouts.append(kw.get("timeout_s"))
        async for resp in super().infer(operator, **kw):
            yield resp


@pytest.fixture
async def frontend():
    oc = OperatorConfig(
        name="kserve", kind="frontend", parameters={"protocol": "kserve", "http_port": 0, "grpc_port": 0, "models": ["offline"]}
    )
    wc = WorkerConfig(name="fe.0", component="fe", deployment="t", operators=[oc])
    client = FakeClient()
    fe = KServeFrontend(OperatorContext(config=oc, worker=wc, logger=logging.getLogger("test.kserve"), client=client))
    await fe.start()
    try:
        yield fe
    finally:
        await fe.stop()


def http_client(fe):
    return httpclient.InferenceServerClient(f"127.0.0.1:{fe.stats()['http_port']}")


def grpc_client(fe):
    return grpcclient.InferenceServerClient(f"127.0.0.1:{fe.stats()['grpc_port']}")


DTYPE_CASES = [
    ("BOOL", np.array([[True, False], [False, True]])),
    ("INT8", np.arange(-3, 3, dtype=np.int8).reshape(2, 3)),
    ("INT16", np.arange(6, dtype=np.int16)),
    ("INT32", np.arange(24, dtype=np.int32).reshape(2, 3, 4)),
    ("INT64", np.array([1, 2, 3], dtype=np.int64)),
    ("UINT8", np.arange(8, dtype=np.uint8).reshape(2, 2, 2)),
    ("UINT16", np.array([7], dtype=np.uint16)),
    ("UINT32", np.array([[1], [2]], dtype=np.uint32)),
    ("UINT64", np.array([2**63 + 5], dtype=np.uint64)),
    ("FP16", np.array([0.5, -1.25], dtype=np.float16)),
    ("FP32", np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)),
    ("FP64", np.array([[1e300, -2.5]], dtype=np.float64)),
    ("BYTES", np.array([b"hello", "wörld".encode(), b""], dtype=object)),
    ("BYTES", np.array([[b"a", b"bc"], [b"def", b"\x00\x01"]], dtype=object)),
]


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    if a.dtype == object:
        as_bytes = lambda x: x.encode() if isinstance(x, str) else bytes(x)  # noqa: E731 (JSON BYTES come back as str)
        assert [as_bytes(x) for x in a.reshape(-1)] == [as_bytes(x) for x in b.reshape(-1)]
    else:
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


async def test_server_endpoints_http_and_grpc(frontend):
    def check():
        h, g = http_client(frontend), grpc_client(frontend)
        assert h.is_server_live() and h.is_server_ready()
        assert g.is_server_live() and g.is_server_ready()
        assert h.get_server_metadata()["name"] == "tdist"
        assert g.get_server_metadata().name == "tdist"
        names = {m["name"] for m in h.get_model_repository_index()}
        assert names == {"echo", "streamer", "fails", "encoder", "offline"}  # frontends are not models
        assert {m.name for m in g.get_model_repository_index().models} == names

    await asyncio.to_thread(check)


async def test_model_metadata_ready_config(frontend):
    def check():
        h, g = http_client(frontend), grpc_client(frontend)
        md = h.get_model_metadata("encoder")
        assert md["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1]}]
        gmd = g.get_model_metadata("encoder")
        assert gmd.inputs[0].name == "input" and list(gmd.inputs[0].shape) == [-1]
        assert h.get_model_metadata("echo")["platform"] == "tdist_python"
        assert h.is_model_ready("encoder") and g.is_model_ready("encoder")
        assert not h.is_model_ready("offline") and not g.is_model_ready("offline")
        cfg = g.get_model_config("encoder").config
        assert cfg.instance_group[0].count == 2
        assert cfg.parameters["input_copies"].string_value == "2"
        assert h.get_model_config("encoder")["instance_group"][0]["count"] == 2

    await asyncio.to_thread(check)


@pytest.mark.parametrize("binary", [True, False])
async def test_http_infer_dtypes_and_shapes(frontend, binary):
    def check():
        h = http_client(frontend)
        for i, (dt, arr) in enumerate(DTYPE_CASES):
            inp = httpclient.InferInput(f"in{i}", list(arr.shape), dt)
            inp.set_data_from_numpy(arr, binary_data=binary)
            out = httpclient.InferRequestedOutput(f"in{i}", binary_data=binary)
            res = h.infer("echo", [inp], outputs=[out])
            _same(res.as_numpy(f"in{i}"), arr)
            assert res.get_response()["parameters"] == {"echoed": 1}

    await asyncio.to_thread(check)


async def test_grpc_infer_dtypes_and_shapes(frontend):
    def check():
        g = grpc_client(frontend)
        inputs = []
        for i, (dt, arr) in enumerate(DTYPE_CASES):
            inp = grpcclient.InferInput(f"in{i}", list(arr.shape), dt)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        res = g.infer("echo", inputs, parameters={"k": "v", "n": 3})
        for i, (_dt, arr) in enumerate(DTYPE_CASES):
            _same(res.as_numpy(f"in{i}"), arr)
        assert res.get_response().parameters["echoed"].int64_param == len(DTYPE_CASES)

    await asyncio.to_thread(check)
    assert frontend.core.client.calls[-1] == ("echo", {"k": "v", "n": 3})


async def test_http_compressed_requests_and_responses(frontend):
    def check():
        arr = np.arange(100, dtype=np.int32)
        for algo in ("gzip", "deflate"):
            inp = httpclient.InferInput("x", [100], "INT32")
            inp.set_data_from_numpy(arr)
            res = http_client(frontend).infer(
                "echo", [inp], request_compression_algorithm=algo, response_compression_algorithm=algo
            )
            assert res.as_numpy("x").tolist() == arr.tolist()

    await asyncio.to_thread(check)


async def test_kserve_timeout_parameter_becomes_the_deadline(frontend):
    def check():
        inp = httpclient.InferInput("x", [1], "INT32")
        inp.set_data_from_numpy(np.array([1], dtype=np.int32))
        http_client(frontend).infer("echo", [inp], timeout=2_500_000)  # microseconds, as Triton's

    await asyncio.to_thread(check)
    assert frontend.core.client.timeouts[-1] == 2.5
    assert "timeout" not in frontend.core.client.calls[-1][1]


async def test_infer_triton_described_model(frontend):
    def check():
        x = np.array([1, 2, 3], dtype=np.int64)
        for client, mod in ((http_client(frontend), httpclient), (grpc_client(frontend), grpcclient)):
            inp = mod.InferInput("input", [3], "INT64")
            inp.set_data_from_numpy(x)
            assert client.infer("encoder", [inp]).as_numpy("output").tolist() == np.invert(np.tile(x, 2)).tolist()

    await asyncio.to_thread(check)


async def test_typed_errors(frontend):
    def check():
        h, g = http_client(frontend), grpc_client(frontend)
        x = np.array([1], dtype=np.int64)
        hi, gi = httpclient.InferInput("x", [1], "INT64"), grpcclient.InferInput("x", [1], "INT64")
        hi.set_data_from_numpy(x)
        gi.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as e:
            h.infer("nope", [hi])
        assert "unknown model" in e.value.message() and e.value.status() == "404"
        with pytest.raises(InferenceServerException) as e:
            h.get_model_metadata("nope")
        assert e.value.status() == "404"
        with pytest.raises(InferenceServerException) as e:
            g.infer("nope", [gi])
        assert e.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as e:
            g.get_model_metadata("nope")
        assert e.value.status() == "StatusCode.NOT_FOUND"
        # known model, no worker → 503 / UNAVAILABLE
        with pytest.raises(InferenceServerException) as e:
            h.infer("offline", [hi])
        assert e.value.status() == "503"
        with pytest.raises(InferenceServerException) as e:
            g.infer("offline", [gi])
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        # the operator's BadRequest → 400 / INVALID_ARGUMENT, message kept
        with pytest.raises(InferenceServerException) as e:
            h.infer("fails", [hi])
        assert e.value.status() == "400" and "must be FP32" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            g.infer("fails", [gi])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        # an output the model did not return
        with pytest.raises(InferenceServerException) as e:
            h.infer("echo", [hi], outputs=[httpclient.InferRequestedOutput("zzz")])
        assert e.value.status() == "400"

    await asyncio.to_thread(check)


async def test_grpc_stream_infer_yields_partials(frontend):
    import queue

    got: "queue.Queue[Any]" = queue.Queue()

    def check():
        g = grpc_client(frontend)
        g.start_stream(callback=lambda result, error: got.put((result, error)))
        inp = grpcclient.InferInput("x", [1], "INT32")
        inp.set_data_from_numpy(np.array([0], dtype=np.int32))
        g.async_stream_infer("streamer", [inp])
        outs = []
        for _ in range(3):
            result, error = got.get(timeout=10)
            assert error is None
            outs.append(int(result.as_numpy("out")[0]))
        g.async_stream_infer("nope", [inp])
        result, error = got.get(timeout=10)
        assert result is None and "unknown model" in str(error)
        g.stop_stream()
        return outs

    assert await asyncio.to_thread(check) == [0, 1, 2]


async def test_aio_clients(frontend):
    import tritonclient.grpc.aio as grpcaio
    import tritonclient.http.aio as httpaio

    x = np.array([[1.5, 2.5]], dtype=np.float32)
    h = httpaio.InferenceServerClient(f"127.0.0.1:{frontend.stats()['http_port']}")
    g = grpcaio.InferenceServerClient(f"127.0.0.1:{frontend.stats()['grpc_port']}")
    try:
        hi = httpaio.InferInput("v", [1, 2], "FP32")
        hi.set_data_from_numpy(x)
        assert (await h.infer("echo", [hi])).as_numpy("v").tolist() == x.tolist()
        gi = grpcaio.InferInput("v", [1, 2], "FP32")
        gi.set_data_from_numpy(x)
        assert (await g.infer("echo", [gi])).as_numpy("v").tolist() == x.tolist()
    finally:
        await h.close()
        await g.close()


def test_stats_report_bound_ports_and_log_line(frontend, caplog):
    s = frontend.stats()
    assert s["protocol"] == "kserve" and s["http_port"] > 0 and s["grpc_port"] > 0


def test_http_binary_codec_round_trip():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([b"x", b"yz"], dtype=object)
    raw_a, raw_b = a.tobytes(), serialize_bytes(b)
    import json

    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": len(raw_a)}},
                {"name": "b", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw_b)}},
                {"name": "c", "datatype": "INT32", "shape": [2], "data": [5, 6]},
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    req, inputs = parse_http_infer(header + raw_a + raw_b, len(header))
    assert inputs["a"].tolist() == a.tolist() and list(inputs["b"]) == [b"x", b"yz"] and inputs["c"].dtype == np.int32
    body, hl = render_http_infer(req, InferResult("m", "1", inputs, {}), None)
    out = json.loads(body[:hl])
    assert [o["parameters"]["binary_data_size"] for o in out["outputs"]] == [24, len(raw_b), 8]
    assert tensor_from_raw("FP32", [2, 3], body[hl : hl + 24]).tolist() == a.tolist()


async def test_busy_ports_are_a_clear_load_error(frontend):
    from tdist.errors import OperatorLoadError

    for params in ({"http_port": frontend.stats()["http_port"], "grpc_port": 0}, {"http_port": 0, "grpc_port": frontend.stats()["grpc_port"]}):
        oc = OperatorConfig(name="kserve2", kind="frontend", parameters={"protocol": "kserve", **params})
        wc = WorkerConfig(name="fe.1", component="fe", deployment="t", operators=[oc])
        fe = KServeFrontend(OperatorContext(config=oc, worker=wc, logger=logging.getLogger("test.kserve"), client=FakeClient()))
        with pytest.raises(OperatorLoadError, match="cannot listen on 127.0.0.1:.*0: a free one"):
            await fe.start()
