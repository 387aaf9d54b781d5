"""Hostile HTTP input against real frontends: KServe (HTTP + gRPC) and OpenAI workers on free
ports, in front of real operators, over a real nats-server, under the real local supervisor.

Covers the answers of docs/security.md ("HTTP frontends and payload limits"): 413 for bodies
over max_body_bytes (refused from Content-Length before reading; chunked ones stopped at the
limit, a gzip bomb once inflated to it) with the frontend worker's peak RSS measured from
/proc, 415/400 for Content-Types,
400 for shapes, datatypes, internal or unlisted parameters and non-finite numbers, 404 outside
the targets, deadlines capped, CORS only when configured, a client disconnect cancelling the
operator, and the NATS max_payload: a request within header bytes of it is a typed
PayloadTooLarge (413 at the frontends) and the connection carrying it serves on undisturbed.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tdist.errors import PayloadTooLarge
from tdist.runtime import protocol as P
from tdist.runtime.tensors import tensor_to_wire
from tests.conftest import unique_name, worker_config
from tests.integration.events import Events

MiB = 1 << 20
BIG = 200 * 1000 * 1000  # the 200 MB body


def op(name: str, cls: str, module: str = "spine_ops", **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "python", "implementation": f"{module}:{cls}", **kw}


def frontend(name: str, protocol: str, targets: list[str], **params: Any) -> dict[str, Any]:
    ports = {"http_port": 0, "grpc_port": 0} if protocol == "kserve" else {"port": 0}
    return {"name": name, "kind": "frontend", "targets": targets, "parameters": {"protocol": protocol, **ports, **params}}


async def start(deploy: Any, events: str | None = None, *, nats_url: str | None = None) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Models (echo, hidden, slow, words) and one worker `fe.0` with three frontends:
    kserve (defaults, targets echo + slow), strict (kserve: 64 KiB, allowed_parameters [k],
    max_deadline_s 1, CORS for https://ok.example) and openai (defaults, target words).

    With `events`, `slow` reports started / cancelled on that subject (limits_ops.Held);
    without, it is spine_ops.Slow, which reports nothing."""
    dep = unique_name("lim")
    slow = op("slow", "Held", "limits_ops", parameters={"events": events}) if events else op("slow", "Slow")
    models = worker_config(dep, "models", [op("echo", "Echo"), op("hidden", "Echo"), op("words", "Words"),
                                           {**slow, "max_inflight_requests": 8}])
    fe = worker_config(dep, "fe", [
        frontend("kserve", "kserve", ["echo", "slow"]),
        frontend("strict", "kserve", ["echo", "slow"], max_body_bytes=64 * 1024, allowed_parameters=["k", "sleep_s"],
                 max_deadline_s=1, cors_origins=["https://ok.example"]),
        frontend("openai", "openai", ["words"], served_model_name="tiny"),
    ])
    d = await deploy([models, fe], nats_url=nats_url)
    stats = (await d.client.workers(max_age_s=0))["fe.0"]["per_operator"]
    return d, {name: stats[name]["stats"] for name in ("kserve", "strict", "openai")}


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def reset_peak_rss(pid: int) -> int:
    """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5); returns it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss_kib(pid)


async def declared_body(port: int, path: str, size: int, content_type: str = "application/json") -> tuple[int, Any]:
    """Send only the head of a request declaring a `size`-byte body; the answer must come back
    without the body being sent (refused from Content-Length)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split()[1])
        length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:"))
        return status, json.loads(await reader.readexactly(length))
    finally:
        writer.close()


async def chunked_body(session: aiohttp.ClientSession, url: str, size: int) -> tuple[int, Any]:
    """Stream `size` bytes of JSON whitespace, chunked (no Content-Length)."""
    piece = b" " * MiB

    async def gen() -> Any:
        for _ in range(size // MiB):
            yield piece

    async with session.post(url, data=gen(), headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


def kserve_json(name: str, datatype: str, shape: list[int], data: Any, **params: Any) -> bytes:
    body: dict[str, Any] = {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}
    if params:
        body["parameters"] = params
    return json.dumps(body).encode()


async def post(session: aiohttp.ClientSession, url: str, body: bytes | str, **headers: str) -> tuple[int, Any, Any]:
    hdrs = {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    async with session.post(url, data=body, headers=hdrs) as r:
        return r.status, await r.json(content_type=None), r.headers


async def test_kserve_http_and_grpc_refuse_hostile_input(deploy, nats_server) -> None:
    d, fe = await start(deploy)
    base, strict = f"http://127.0.0.1:{fe['kserve']['http_port']}", f"http://127.0.0.1:{fe['strict']['http_port']}"
    url = base + "/v2/models/echo/infer"
    async with aiohttp.ClientSession() as s:
        status, body, headers = await post(s, url, kserve_json("x", "INT32", [2], [1, 2]), Origin="https://evil.example")
        assert status == 200 and body["outputs"][0]["data"] == [1, 2]
        assert "Access-Control-Allow-Origin" not in headers  # no CORS unless configured
        # shapes, datatypes, counts: 400, never 500
        cases = [
            kserve_json("x", "BYTES", [50_000_000], ["one"]),
            kserve_json("x", "BYTES", [1], [200_000_000]),
            kserve_json("x", "INT32", [-1], [1]),
            kserve_json("x", "INT32", [2**40, 2**40], [1]),
            kserve_json("x", "INT32", [3], [1, 2]),
            kserve_json("x", "INT8", [1], [300]),
            kserve_json("x", "NOPE", [1], [1]),
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [Infinity]}]}',
            kserve_json("x", "INT32", [1], [1], kv_transfer_params={"remote_host": "10.1.2.3", "remote_port": 5557}),
            kserve_json("x", "INT32", [1], [1], timeout="soon"),
            b"[" * 100_000,
        ]
        for case in cases:
            status, body, _ = await post(s, url, case)
            assert status == 400 and isinstance(body["error"], str), (case[:80], status, body)
        status, body, _ = await post(s, url, b'{"inputs": []}', Content_Type="text/plain")
        assert status == 415 and "application/json" in body["error"]
        status, body, _ = await post(s, url, b'{"inputs": []}', Content_Type="application/x-www-form-urlencoded")
        assert status == 415
        # only the targets are models
        status, body, _ = await post(s, base + "/v2/models/hidden/infer", kserve_json("x", "INT32", [1], [1]))
        assert status == 404 and "unknown model" in body["error"]
        async with s.get(base + "/v2/models/hidden") as r:
            assert r.status == 404
        async with s.post(base + "/v2/repository/index") as r:
            assert {m["name"] for m in await r.json()} == {"echo", "slow"}
        # strict: the allowlist, the deadline cap, the size limit, CORS for its one origin
        status, body, _ = await post(s, strict + "/v2/models/echo/infer", kserve_json("x", "INT32", [1], [1], k="v"))
        assert status == 200
        status, body, _ = await post(s, strict + "/v2/models/echo/infer", kserve_json("x", "INT32", [1], [1], z="v"))
        assert status == 400 and "'z' is not allowed" in body["error"]
        t0 = time.monotonic()
        status, body, _ = await post(s, strict + "/v2/models/slow/infer",
                                     kserve_json("x", "INT32", [1], [1], sleep_s=30, timeout=3600 * 10**6))
        assert status == 504 and time.monotonic() - t0 < 10  # an hour asked, max_deadline_s (1 s) given
        status, body, _ = await post(s, strict + "/v2/models/echo/infer", kserve_json("x", "BYTES", [1], ["y" * 70_000]))
        assert status == 413 and "at most 65536 bytes" in body["error"]
        status, body, headers = await post(s, strict + "/v2/models/echo/infer", kserve_json("x", "INT32", [1], [1]),
                                           Origin="https://ok.example")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://ok.example"
        _, _, headers = await post(s, strict + "/v2/models/echo/infer", kserve_json("x", "INT32", [1], [1]), Origin="https://evil.example")
        assert "Access-Control-Allow-Origin" not in headers
        async with s.options(strict + "/v2/models/echo/infer", headers={"Origin": "https://ok.example",
                                                                       "Access-Control-Request-Method": "POST"}) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "https://ok.example"

    # gRPC: the same limit as HTTP (down from 1 GiB), the same targets
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    def grpc_checks() -> None:
        x = np.zeros(100 * 1024, dtype=np.uint8)
        for port, expect in ((fe["kserve"]["grpc_port"], None), (fe["strict"]["grpc_port"], "RESOURCE_EXHAUSTED")):
            g = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            inp = grpcclient.InferInput("x", [x.size], "UINT8")
            inp.set_data_from_numpy(x)
            if expect is None:
                assert g.infer("echo", [inp]).as_numpy("x").size == x.size
                with pytest.raises(InferenceServerException) as e:
                    g.infer("hidden", [inp])
                assert "NOT_FOUND" in str(e.value.status())
            else:
                with pytest.raises(InferenceServerException) as e:
                    g.infer("echo", [inp])
                assert expect in str(e.value.status())
            g.close()

    await asyncio.to_thread(grpc_checks)


async def test_kserve_client_disconnect_cancels_the_operator(deploy, nats_server) -> None:
    subject = unique_name("ev")
    async with Events(nats_server.url, subject) as events:
        d, fe = await start(deploy, subject)
        body = kserve_json("x", "INT32", [1], [1], sleep_s=60)
        # a raw connection, closed explicitly: the client going away, with nothing left to chance
        # (an HTTP client library may keep a cancelled request's socket open until it is collected)
        reader, writer = await asyncio.open_connection("127.0.0.1", fe["kserve"]["http_port"])
        writer.write(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        started = await events.wait(lambda e: e["kind"] == "started")
        writer.close()
        await writer.wait_closed()
        cancelled = await events.wait(lambda e: e["kind"] == "cancelled", timeout_s=20)
    assert cancelled["id"] == started["id"]


async def test_openai_refuses_hostile_input(deploy, nats_server) -> None:
    d, fe = await start(deploy)
    url = f"http://127.0.0.1:{fe['openai']['port']}/v1/completions"

    def openai_error(body: Any) -> dict[str, Any]:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]

    async with aiohttp.ClientSession() as s:
        status, body, headers = await post(s, url, json.dumps({"prompt": "a b c", "max_tokens": 3}), Origin="https://x.example")
        assert status == 200 and body["choices"][0]["text"] == "a b c " and "Access-Control-Allow-Origin" not in headers
        status, body, _ = await post(s, url, json.dumps({"prompt": "a", "stream": "false"}))
        assert status == 400 and openai_error(body)["param"] == "stream"
        status, body, _ = await post(s, url, json.dumps({"prompt": "a", "kv_transfer_params": {"remote_host": "10.0.0.9"}}))
        assert status == 400 and openai_error(body)["param"] == "kv_transfer_params"
        status, body, _ = await post(s, url, '{"prompt": "a", "temperature": NaN}')
        assert status == 400 and openai_error(body)
        status, body, _ = await post(s, url, json.dumps({"prompt": "a"}), Content_Type="text/plain")
        assert status == 400 and openai_error(body)["code"] == "invalid_content_type"
        status, body, _ = await post(s, url, json.dumps({"prompt": "a", "model": "gpt-9"}))
        assert status == 404 and openai_error(body)["code"] == "model_not_found"
        # a prompt within the body limit (4 MiB) but over NATS's max_payload (1 MB): 413, not 500
        status, body, _ = await post(s, url, json.dumps({"prompt": "w " * (MiB), "max_tokens": 1}))
        assert status == 413 and openai_error(body)["code"] == "request_too_large"
        assert "max_payload" in openai_error(body)["message"]
        status, body = await chunked_body(s, url, 8 * MiB)
        assert status == 413 and openai_error(body)["code"] == "request_too_large"
        status, body = await declared_body(fe["openai"]["port"], "/v1/completions", BIG)
        assert status == 413 and "at most 4194304 bytes" in openai_error(body)["message"]


async def test_a_200_mb_body_is_refused_before_it_is_read(deploy, nats_server) -> None:
    """Peak RSS of the frontend worker, from /proc (reset before each request): a declared 200 MB
    body costs nothing, a chunked one at most the limit it was read up to (64 MiB) plus slack."""
    d, fe = await start(deploy)
    pid = d.pid_of("fe.0")
    kserve = f"http://127.0.0.1:{fe['kserve']['http_port']}/v2/models/echo/infer"
    openai = f"http://127.0.0.1:{fe['openai']['port']}/v1/completions"
    grown: dict[str, int] = {}
    async with aiohttp.ClientSession() as s:
        for name, port, path in (("kserve", fe["kserve"]["http_port"], "/v2/models/echo/infer"),
                                 ("openai", fe["openai"]["port"], "/v1/completions")):
            base = reset_peak_rss(pid)
            status, body = await declared_body(port, path, BIG)
            assert status == 413, body
            grown[f"{name} declared"] = peak_rss_kib(pid) - base
        for name, url in (("kserve", kserve), ("openai", openai)):
            base = reset_peak_rss(pid)
            status, body = await chunked_body(s, url, BIG)
            assert status == 413, body
            grown[f"{name} chunked"] = peak_rss_kib(pid) - base
        # a gzip bomb: 1 MB on the wire, 1 GiB once inflated; read (inflated) only up to the limit
        deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
        bomb = b"".join(deflate.compress(b" " * MiB) for _ in range(1024)) + deflate.flush()
        base = reset_peak_rss(pid)
        status, body, _ = await post(s, kserve, bomb, Content_Encoding="gzip")
        assert status == 413 and len(bomb) < 2 * MiB, body
        grown["kserve gzip bomb"] = peak_rss_kib(pid) - base
        status, body, _ = await post(s, kserve, kserve_json("x", "INT32", [1], [7]))
        assert status == 200  # the worker serves on
    print("peak RSS growth of the frontend worker (KiB):", grown)
    assert grown["kserve declared"] < 16 * 1024 and grown["openai declared"] < 16 * 1024, grown
    assert grown["kserve chunked"] < (64 + 48) * 1024, grown  # read up to its 64 MiB limit, never 200 MB
    assert grown["kserve gzip bomb"] < (64 + 48) * 1024, grown
    assert grown["openai chunked"] < (4 + 28) * 1024, grown


def near_limit_request(client: Any, max_payload: int) -> np.ndarray:
    """A tensor whose request payload fits max_payload by itself but not with its NATS headers:
    what nats-py lets through and nats-server answers by closing the connection."""
    rid = P.new_request_id()

    def payload(n: int) -> tuple[bytes, P.RequestMessage]:
        msg = P.RequestMessage(id=rid, operator="echo", inputs={"x": tensor_to_wire(np.zeros(n, np.uint8))}, parameters={},
                               deadline=time.time() + 60, reply=f"_INBOX.tdist.{rid}.{rid}")
        return P.encode_request(msg), msg

    n = max_payload - 200
    while len(payload(n + 1)[0]) <= max_payload - 40:
        n += 1
    data, msg = payload(n)
    assert len(data) <= max_payload < len(data) + P.headers_size(P.request_headers(msg)), (len(data), max_payload)
    return np.zeros(n, np.uint8)


async def test_payload_within_header_bytes_of_max_payload_is_typed_and_harmless(deploy, tmp_path) -> None:
    from tdist.launch.nats import start_nats

    max_payload = 64 * 1024
    server = start_nats(work_dir=str(tmp_path / "nats"), max_payload=max_payload)
    try:
        import nats

        # what the size check prevents: headers + payload over max_payload costs the whole connection
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        raw = await nats.connect(server.url, allow_reconnect=False, error_cb=on_error)
        assert raw.max_payload == max_payload
        await raw.publish("probe", b"\0" * (max_payload - 10), headers={"Tdist-Reply": "x" * 64})
        log = Path(tmp_path / "nats" / "nats-server.log")

        def dropped() -> bool:
            return bool(errors) or raw.is_closed or not raw.is_connected

        for _ in range(500):
            if dropped() and "maximum payload exceeded" in log.read_text():
                break
            await asyncio.sleep(0.02)
        assert dropped(), "the server kept a connection that sent headers + payload over max_payload"
        assert "maximum payload exceeded" in log.read_text()
        await raw.close()

        d, fe = await start(deploy, nats_url=server.url)
        assert d.client.nc.max_payload == max_payload
        x = near_limit_request(d.client, max_payload)
        busy = [asyncio.create_task(anext(d.client.infer("slow", parameters={"sleep_s": 0.5}))) for _ in range(4)]
        with pytest.raises(PayloadTooLarge, match="header") as e:
            await anext(d.client.infer("echo", inputs={"x": x}))
        assert e.value.detail["max_payload"] == max_payload
        done = await asyncio.gather(*busy)  # the requests sharing the connection are undisturbed
        assert all(r.final for r in done)
        r = await anext(d.client.infer("echo", inputs={"x": x[:1000]}))
        assert r.outputs["x"].size == 1000
        assert d.client.nc.is_connected and d.client.nc.stats["reconnects"] == 0
        # the frontends answer the same limit with 413 in their own shapes
        async with aiohttp.ClientSession() as s:
            status, body, _ = await post(s, f"http://127.0.0.1:{fe['kserve']['http_port']}/v2/models/echo/infer",
                                         kserve_json("x", "BYTES", [1], ["b" * max_payload]))
            assert status == 413 and "max_payload" in body["error"]
            status, body, _ = await post(s, f"http://127.0.0.1:{fe['openai']['port']}/v1/completions",
                                         json.dumps({"prompt": "p" * max_payload}))
            assert status == 413 and body["error"]["code"] == "request_too_large"
            status, body, _ = await post(s, f"http://127.0.0.1:{fe['kserve']['http_port']}/v2/models/echo/infer",
                                         kserve_json("x", "INT32", [1], [5]))
            assert status == 200
    finally:
        server.stop()
