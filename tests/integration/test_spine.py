"""The runtime spine on a real nats-server: routing, streaming, errors, deadlines, backpressure,
crash redelivery, namespacing. Workers are real processes under the real local supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter

import numpy as np
import pytest

from tdist.errors import NoWorkerError, OperatorError, PayloadTooLarge, RequestTimeout, WorkerLost
from tdist.runtime.planes.discovery import bucket_name
from tests.conftest import print_log_tails, unique_name, worker_config
from tests.integration.events import Events


def op(name: str, cls: str, **kw: object) -> dict:
    return {"name": name, "kind": "python", "implementation": f"spine_ops:{cls}", **kw}


async def test_round_robin_over_two_replicas(deploy) -> None:
    dep = unique_name("rr")
    ws = [worker_config(dep, "echo", [op("echo", "Echo")], replica=i) for i in range(2)]
    d = await deploy(ws)
    served = Counter()
    for i in range(40):
        r = await anext(d.client.infer("echo", inputs={"x": np.array([i])}))
        assert r.final and r.outputs["x"].tolist() == [i]
        served[r.parameters["worker"]] += 1
    assert set(served) == {"echo.0", "echo.1"}
    assert min(served.values()) >= 10, served


async def test_directed_request_reaches_the_chosen_instance(deploy) -> None:
    dep = unique_name("dir")
    ws = [worker_config(dep, "echo", [op("echo", "Echo")], replica=i) for i in range(2)]
    d = await deploy(ws)
    for _ in range(10):
        r = await anext(d.client.infer("echo", parameters={}, instance="echo.1"))
        assert r.parameters["worker"] == "echo.1"
    with pytest.raises(NoWorkerError, match="echo.7"):
        await anext(d.client.infer("echo", instance="echo.7"))


async def test_streaming_partials_then_one_final(deploy) -> None:
    dep = unique_name("stream")
    d = await deploy([worker_config(dep, "stream", [op("stream", "Stream")])])
    responses = [r async for r in d.client.infer("stream", parameters={"n": 7})]
    assert [r.final for r in responses] == [False] * 7 + [True]
    assert [int(r.outputs["i"][0]) for r in responses[:-1]] == list(range(7))
    assert responses[-1].parameters == {"done": True}


async def test_operator_exception_arrives_typed(deploy) -> None:
    dep = unique_name("fail")
    d = await deploy([worker_config(dep, "fail", [op("fail", "Fail")])])
    with pytest.raises(OperatorError) as info:
        async for _ in d.client.infer("fail", parameters={"value": 42}):
            pass
    assert "ValueError" in str(info.value) and "bad value 42" in str(info.value)
    assert info.value.operator == "fail" and info.value.request_id
    # the worker survives and keeps serving
    with pytest.raises(OperatorError):
        await anext(d.client.infer("fail"))


async def test_no_worker_is_a_typed_error(deploy) -> None:
    dep = unique_name("nw")
    d = await deploy([worker_config(dep, "echo", [op("echo", "Echo")])])
    with pytest.raises(NoWorkerError, match="nosuch"):
        await anext(d.client.infer("nosuch"))


async def test_deadline_cancels_the_operator_and_the_call_it_made(deploy, nats_server) -> None:
    dep = unique_name("dl")
    subject = f"tdist-test.{dep}"
    ws = [
        worker_config(dep, "parent", [op("parent", "Parent", parameters={"events": subject, "child": "slow"})]),
        worker_config(dep, "slow", [op("slow", "Slow", parameters={"events": subject})]),
    ]
    d = await deploy(ws)
    async with Events(nats_server.url, subject) as events:
        with pytest.raises(RequestTimeout):
            async for _ in d.client.infer("parent", parameters={"sleep_s": 60}, timeout_s=1.5):
                pass
        parent_cancel = await events.wait(lambda e: e["kind"] == "cancelled" and e["worker"] == "parent.0")
        child_cancel = await events.wait(lambda e: e["kind"] == "cancelled" and e["worker"] == "slow.0")
    assert parent_cancel["id"] != child_cancel["id"]


async def test_max_inflight_one_never_runs_two_at_once(deploy) -> None:
    dep = unique_name("inflight")
    ws = [
        worker_config(dep, "one", [op("one", "Concurrency", max_inflight_requests=1)]),
        worker_config(dep, "four", [op("four", "Concurrency", max_inflight_requests=4)]),
    ]
    d = await deploy(ws)

    async def active(name: str) -> int:
        r = await anext(d.client.infer(name, parameters={"sleep_s": 0.05}))
        return int(r.parameters["active"])

    seen_one = await asyncio.gather(*(active("one") for _ in range(12)))
    assert max(seen_one) == 1
    # the same load on max_inflight 4 does overlap: the check above can fail
    seen_four = await asyncio.gather(*(active("four") for _ in range(12)))
    assert 1 < max(seen_four) <= 4


async def test_worker_killed_mid_request_is_redelivered_and_restarted(deploy, nats_server) -> None:
    dep = unique_name("kill")
    subject = f"tdist-test.{dep}"
    rp = {"ack_wait_s": 1.0}
    ws = [worker_config(dep, "slow", [op("slow", "Slow", parameters={"events": subject})], replica=i, request_plane=rp)
          for i in range(2)]
    d = await deploy(ws)
    async with Events(nats_server.url, subject) as events:
        call = asyncio.ensure_future(anext(d.client.infer("slow", parameters={"sleep_s": 1.0}, timeout_s=20)))
        try:
            started = await events.wait_while(lambda e: e["kind"] == "started", call)
        except BaseException:
            print_log_tails(d.sup.run_dir)  # the workers' side of it
            raise
        victim = started["worker"]
        old_pid = started["pid"]
        os.kill(old_pid, signal.SIGKILL)
        resp = await asyncio.wait_for(call, 25)
    assert resp.final
    assert resp.parameters["attempt"] >= 2  # it was redelivered
    # the supervisor restarts the killed worker: watch its discovery entry come back with a new pid
    kv = await d.client.js.key_value(bucket_name(dep))
    watcher = await kv.watch(victim)

    async def back() -> dict:
        async for entry in watcher:
            if entry is None or not entry.value:
                continue
            e = json.loads(entry.value)
            if e["pid"] != old_pid and e["state"] == "ready":
                return e

    entry = await asyncio.wait_for(back(), 30)
    await watcher.stop()
    assert entry["pid"] == d.pid_of(victim)
    assert d.sup.state.workers[victim].restarts >= 1


async def test_worker_killed_after_partials_gives_a_typed_error(deploy, nats_server) -> None:
    """A stream cut by a crash cannot be replayed: the caller gets WorkerLost, never a hang."""
    dep = unique_name("cut")
    subject = f"tdist-test.{dep}"
    ws = [worker_config(dep, "st", [op("st", "StreamThenSleep", parameters={"events": subject})], replica=i,
                        request_plane={"ack_wait_s": 1.0}) for i in range(2)]
    d = await deploy(ws)
    got = []
    async with Events(nats_server.url, subject) as events:
        with pytest.raises(WorkerLost):
            async for r in d.client.infer("st", parameters={"sleep_s": 2}, timeout_s=20):
                got.append(r)
                if len(got) == 2:
                    ev = await events.wait(lambda e: e["kind"] == "streamed")
                    os.kill(ev["pid"], signal.SIGKILL)
    assert len(got) == 2 and not any(r.final for r in got)


async def test_two_deployments_on_one_nats_stay_apart(deploy) -> None:
    a, b = unique_name("a"), unique_name("b")
    da = await deploy([worker_config(a, "echo", [op("echo", "Echo")])])
    db = await deploy([worker_config(b, "echo", [op("echo", "Echo")])])
    for _ in range(10):
        ra = await anext(da.client.infer("echo"))
        rb = await anext(db.client.infer("echo"))
        assert ra.parameters["deployment"] == a
        assert rb.parameters["deployment"] == b
    assert set(await da.client.workers(max_age_s=0)) == {"echo.0"}


async def test_payload_over_max_payload_is_a_typed_error(deploy) -> None:
    dep = unique_name("big")
    d = await deploy([worker_config(dep, "echo", [op("echo", "Echo")])])
    big = np.zeros(2 * d.client.nc.max_payload // 8, dtype=np.float64)
    with pytest.raises(PayloadTooLarge, match="max_payload"):
        await anext(d.client.infer("echo", inputs={"x": big}))
    # and the deployment still answers
    r = await anext(d.client.infer("echo", inputs={"x": np.arange(3)}))
    assert r.outputs["x"].tolist() == [0, 1, 2]


async def test_hello_world_pipeline(deploy) -> None:
    dep = unique_name("hw")
    hw = lambda cls: {"name": cls[0], "kind": "python", "implementation": f"hello_world_ops:{cls[1]}",  # noqa: E731
                      "parameters": {"input_copies": 3}, "max_inflight_requests": 4}
    ws = [
        worker_config(dep, "encoder", [hw(("encoder", "EncoderOperator"))]),
        worker_config(dep, "decoder", [hw(("decoder", "DecoderOperator"))]),
        worker_config(dep, "encoder_decoder", [hw(("encoder_decoder", "EncodeDecodeOperator"))]),
    ]
    d = await deploy(ws)
    for dtype in ("int64", "int8", "uint16", "float32", "bool"):
        x = (np.arange(24).reshape(4, 6) % 2).astype(dtype)
        r = await anext(d.client.infer("encoder_decoder", inputs={"input": x}))
        assert r.outputs["input" if "input" in r.outputs else "output"].dtype == x.dtype
        np.testing.assert_array_equal(r.outputs["output"], x)
    enc = await anext(d.client.infer("encoder", inputs={"input": np.array([1, 2])}))
    assert enc.outputs["output"].tolist() == np.invert(np.array([1, 2, 1, 2, 1, 2])).tolist()


async def test_worker_serves_prometheus_metrics(deploy) -> None:
    import urllib.request

    dep = unique_name("metrics")
    d = await deploy([worker_config(dep, "echo", [op("echo", "Echo"), op("fail", "Fail")])])
    for _ in range(3):
        await anext(d.client.infer("echo"))
    with pytest.raises(OperatorError):
        await anext(d.client.infer("fail"))
    # discovery entries refresh on the heartbeat: watch for the one that counts them
    kv = await d.client.js.key_value(bucket_name(dep))
    watcher = await kv.watch("echo.0")

    async def counted() -> dict:
        async for item in watcher:
            if item is not None and item.value:
                e = json.loads(item.value)
                if e["served"] == 3 and e["errors"] == 1:
                    return e

    entry = await asyncio.wait_for(counted(), 20)
    await watcher.stop()
    assert entry["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{entry['metrics_port']}/metrics", timeout=5).read().decode()
    assert 'tdist_requests_total{operator="echo",status="ok",worker="echo.0"} 3.0' in text
    assert 'tdist_requests_total{operator="fail",status="error",worker="echo.0"} 1.0' in text
    assert 'tdist_request_latency_seconds_count{operator="echo",worker="echo.0"} 3.0' in text
    assert 'tdist_inflight_requests{operator="echo",worker="echo.0"} 0.0' in text


@pytest.mark.parametrize("kind", ["auto", "ucx"])
async def test_hello_world_moves_a_64_mib_intermediate_by_reference(deploy, kind: str) -> None:
    """input_copies=8 on an 8 MiB input: the encoder's 64 MiB output travels worker → worker through
    the data plane (shared memory on one host for `auto`, UCX for `ucx`), never through NATS."""
    pytest.importorskip("ucxx") if kind == "ucx" else None
    dep = unique_name(f"hw64-{kind}")
    dp = {"kind": kind}
    hw = lambda name, cls: {"name": name, "kind": "python", "implementation": f"hello_world_ops:{cls}",  # noqa: E731
                            "parameters": {"input_copies": 8}, "max_inflight_requests": 2}
    ws = [
        worker_config(dep, "encoder", [hw("encoder", "EncoderOperator")], data_plane=dp),
        worker_config(dep, "decoder", [hw("decoder", "DecoderOperator")], data_plane=dp),
        worker_config(dep, "encoder_decoder", [hw("encoder_decoder", "EncodeDecodeOperator")], data_plane=dp),
    ]
    d = await deploy(ws)
    x = np.random.default_rng(0).integers(-(2**62), 2**62, size=(1024, 1024), dtype=np.int64)  # 8 MiB
    assert x.nbytes * 8 == 64 * 2**20 and x.nbytes * 8 > 50 * d.client.nc.max_payload
    for _ in range(2):
        r = await anext(d.client.infer("encoder_decoder", inputs={"input": x}, timeout_s=120))
        np.testing.assert_array_equal(r.outputs["output"], x)
    enc = await anext(d.client.infer("encoder", inputs={"input": x[:4]}, timeout_s=60))
    assert enc.outputs["output"].shape == (32, 1024)


async def test_cli_prompt_streams_text_as_it_arrives(deploy, nats_server) -> None:
    import subprocess
    import sys

    dep = unique_name("words")
    await deploy([worker_config(dep, "words", [op("words", "Words")])])
    args = [sys.executable, "-m", "tdist", "infer", "--nats-url", nats_server.url, "--name", dep,
            "--component", "words", "--prompt", "Describe the capital of France", "--max-tokens", "3"]
    res = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "Describe the capital"
    assert "4 chunk(s)" in res.stderr


async def test_supervisor_kills_what_a_crashed_worker_started(deploy) -> None:
    """A SIGKILLed worker's children (engine processes, servers) must not outlive it."""
    dep = unique_name("orphan")
    d = await deploy([worker_config(dep, "spawn", [op("spawn", "Spawner")])])
    entry = (await d.client.workers(max_age_s=0))["spawn.0"]
    child = entry["per_operator"]["spawn"]["stats"]["child_pid"]
    pidfd = os.pidfd_open(child)  # readable once the process has exited: a real signal, no polling
    exited = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, exited.set)
    try:
        os.kill(d.pid_of("spawn.0"), signal.SIGKILL)
        await asyncio.wait_for(exited.wait(), 20)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def test_a_fresh_client_under_concurrent_first_calls_sees_every_worker(deploy) -> None:
    """Many requests at once from a client that has not listed discovery yet: none says no_worker."""
    from tdist.runtime.planes.request import RequestClient

    dep = unique_name("burst")
    d = await deploy([worker_config(dep, "echo", [op("echo", "Echo")])])
    client = await RequestClient.connect(d.sup.nats_url, dep, data_plane=d.sup.workers[0].data_plane)
    try:
        results = await asyncio.gather(*(anext(client.infer("echo", inputs={"x": np.array([i])})) for i in range(32)))
    finally:
        await client.close()
    assert [int(r.outputs["x"][0]) for r in results] == list(range(32))


async def test_a_directed_request_whose_worker_dies_or_hangs_ends_typed_long_before_its_deadline(deploy, nats_server) -> None:
    """A directed request is not redelivered (it names its worker): when that worker is killed (and
    restarted as another process) or hangs (heartbeats stop), the caller gets WorkerLost, not a
    wait until the deadline."""
    import time

    dep = unique_name("lost")
    subject = f"tdist-test.{dep}"
    ws = [worker_config(dep, "slow", [op("slow", "Slow", parameters={"events": subject})], replica=i) for i in range(2)]
    d = await deploy(ws)
    async with Events(nats_server.url, subject) as events:
        calls = {i: asyncio.ensure_future(anext(d.client.infer("slow", parameters={"sleep_s": 120}, timeout_s=100,
                                                               instance=f"slow.{i}"))) for i in range(2)}
        started = {}
        for _ in range(2):
            ev = await events.wait(lambda e: e["kind"] == "started" and e["worker"] not in started)
            started[ev["worker"]] = ev["pid"]
    t0 = time.monotonic()
    os.kill(started["slow.0"], signal.SIGKILL)  # the supervisor restarts it: a new process, same name
    os.kill(started["slow.1"], signal.SIGSTOP)  # hung: alive, subscribed, silent
    try:
        for i in range(2):
            with pytest.raises(WorkerLost, match=f"slow.{i}"):
                await asyncio.wait_for(calls[i], 60)
        assert time.monotonic() - t0 < 60  # the deadline was 100 s away
    finally:
        os.kill(started["slow.1"], signal.SIGCONT)


async def test_a_directed_request_to_an_instance_nobody_listens_on_is_no_worker(deploy) -> None:
    """Discovery still lists an instance whose process is gone: the server says "no responders"
    and the caller gets NoWorkerError at once."""
    import time

    dep = unique_name("ghost")
    d = await deploy([worker_config(dep, "echo", [op("echo", "Echo")])])
    ghost = dict((await d.client.workers(max_age_s=0))["echo.0"], name="echo.9", pid=999999)
    await d.client.discovery.put("echo.9", {**ghost, "heartbeat_at": time.time()})

    async def listed() -> None:  # the put reaches the client's view (its KV watcher), bounded
        while "echo.9" not in await d.client.workers(max_age_s=0):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(listed(), 10)
    t0 = time.monotonic()
    with pytest.raises(NoWorkerError, match="not listening"):
        await anext(d.client.infer("echo", instance="echo.9", parameters={}, timeout_s=60))
    assert time.monotonic() - t0 < 30
