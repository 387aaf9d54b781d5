"""Operators end to end on the in-memory request plane: Worker + OperatorHost + RequestClient +
RemoteOperator, with streaming, deadlines, cancellation fan-out, backpressure, directed requests
and typed errors — the request path of production, minus the NATS transport."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import pytest

try:  # tests/unit is a rootdir-less test folder; also importable as a package
    from plane_harness import memory_deployment, operator
except ImportError:  # pragma: no cover
    from tests.unit.plane_harness import memory_deployment, operator
from tdist.errors import NoWorkerError, OperatorError, PayloadTooLarge, RequestTimeout, WorkerLost
from tdist.runtime import Operator, RemoteOperator, Request, RequestClient
from tdist.runtime.config import RequestPlaneConfig
from tdist.runtime.metrics import WorkerMetrics
from tdist.runtime.operator import OperatorContext
from tdist.runtime.planes.codec import InlineCodec
from tdist.runtime.planes.discovery import MemoryDiscovery
from tdist.runtime.planes.discovery_entry import WorkerEntry
from tdist.runtime.planes.request_memory import MemoryBroker
from tdist.runtime.protocol import RequestMessage, encode_request
from tdist.runtime.serve import Cancellations, OperatorHost, ServingContext

ME = __name__

#: What the operators below saw, by test: events and counters (reset per test).
SEEN: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _reset_seen() -> None:
    SEEN.clear()
    SEEN.update(running={}, peak={}, cancelled=[], started=asyncio.Event())


class Stream(Operator):
    """Streams `n` partials (x + i), then a final with the sum; `delay_s` between them."""

    async def execute(self, request: Request) -> None:
        x = np.asarray(request.inputs["x"])
        n = int(request.parameters.get("n", 3))
        delay = float(request.parameters.get("delay_s", 0.0))
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            await request.send({"y": x + i}, parameters={"i": i})
        await request.send({"y": x * n}, parameters={"done": True, "time_left_s": request.time_left_s}, final=True)


class Slow(Operator):
    """Counts concurrent executions per instance; runs `sleep_s`; records cancellation."""

    async def execute(self, request: Request) -> None:
        inst = request.worker or "?"
        running, peak = SEEN["running"], SEEN["peak"]
        running[inst] = running.get(inst, 0) + 1
        peak[inst] = max(peak.get(inst, 0), running[inst])
        SEEN["started"].set()
        try:
            await request.send(parameters={"started": inst})
            await asyncio.sleep(float(request.parameters.get("sleep_s", 0.2)))
        except asyncio.CancelledError:
            SEEN["cancelled"].append((self.name, request.id))
            raise
        finally:
            running[inst] -= 1
        await request.send(parameters={"instance": inst}, final=True)


class Chain(Operator):
    """Calls `parameters.target` through RemoteOperator and relays its responses."""

    async def execute(self, request: Request) -> None:
        remote = RemoteOperator(str(self.parameters["target"]))
        try:
            async for resp in remote.async_infer(request.inputs, request.parameters):
                await request.send(resp.outputs, parameters={**resp.parameters, "via": request.worker}, final=resp.final)
        except asyncio.CancelledError:
            SEEN["cancelled"].append((self.name, request.id))
            raise


class Boom(Operator):
    async def execute(self, request: Request) -> None:
        raise ValueError("no good")


async def collect(client: RequestClient, op: str, **kw: Any) -> list[Any]:
    return [r async for r in client.infer(op, **kw)]


async def test_stream_partials_then_final_with_tensors() -> None:
    async with memory_deployment() as dep:
        await dep.start_worker("a.0", operator("stream", f"{ME}:Stream"))
        client = await dep.client()
        out = await collect(client, "stream", inputs={"x": np.arange(4, dtype=np.int32)}, parameters={"n": 3})
        assert [r.final for r in out] == [False, False, False, True]
        assert [r.parameters.get("i") for r in out[:3]] == [0, 1, 2]
        np.testing.assert_array_equal(out[1].outputs["y"], np.arange(4) + 1)
        np.testing.assert_array_equal(out[-1].outputs["y"], np.arange(4) * 3)
        assert out[-1].outputs["y"].dtype == np.int32
        assert {r.worker for r in out} == {"a.0"}
        # the worker published its entry, typed on the way in and the same keys on the wire
        deadline = time.monotonic() + 5  # the count shows from the next heartbeat (every 50 ms)
        while (entry := (await client.worker_entries(max_age_s=0))["a.0"]).served < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert entry.state == "ready" and entry.operators == ["stream"] and entry.served == 1
        assert set((await client.workers(max_age_s=0))["a.0"]) >= {"name", "state", "heartbeat_at", "per_operator"}


async def test_remote_operator_chain_inherits_the_deadline() -> None:
    async with memory_deployment() as dep:
        await dep.start_worker("inner.0", operator("stream", f"{ME}:Stream"))
        await dep.start_worker("outer.0", operator("chain", f"{ME}:Chain", parameters={"target": "stream"}))
        client = await dep.client()
        out = await collect(client, "chain", inputs={"x": np.ones(2)}, parameters={"n": 2}, timeout_s=3.0)
        assert [r.final for r in out] == [False, False, True]
        assert out[-1].parameters["via"] == "outer.0" and out[-1].worker == "outer.0"
        # the inner request's deadline is the outer one's (3 s), not the 60 s default
        assert 0 < out[-1].parameters["time_left_s"] <= 3.0
        # RemoteOperator outside a worker, with an explicit client
        final = await RemoteOperator("chain", client=client).infer({"x": [1.0, 2.0]}, {"n": 1})
        np.testing.assert_array_equal(final.outputs["y"], [1.0, 2.0])


async def test_leaving_a_stream_cancels_the_call_chain() -> None:
    async with memory_deployment() as dep:
        await dep.start_worker("inner.0", operator("slow", f"{ME}:Slow"))
        await dep.start_worker("outer.0", operator("chain", f"{ME}:Chain", parameters={"target": "slow"}))
        client = await dep.client()
        stream = client.infer("chain", parameters={"sleep_s": 30})
        first = await stream.__anext__()
        assert first.parameters["started"] == "inner.0"
        await stream.aclose()  # the caller goes away: cancel reaches outer, and through it inner
        deadline = time.monotonic() + 5
        while len(SEEN["cancelled"]) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sorted(op for op, _ in SEEN["cancelled"]) == ["chain", "slow"]
        assert SEEN["running"] == {"inner.0": 0}
        # both workers still serve
        assert (await collect(client, "chain", parameters={"sleep_s": 0}))[-1].parameters["instance"] == "inner.0"


async def test_max_inflight_backpressure_spreads_the_queue() -> None:
    async with memory_deployment() as dep:
        for i in range(2):
            await dep.start_worker(f"s.{i}", operator("slow", f"{ME}:Slow", max_inflight_requests=2))
        client = await dep.client()
        outs = await asyncio.gather(*(collect(client, "slow", parameters={"sleep_s": 0.1}) for _ in range(10)))
        assert all(o[-1].final for o in outs)
        assert SEEN["peak"] == {"s.0": 2, "s.1": 2}  # never more than max_inflight at once, both used
        served = {i: dep.workers[i].hosts["slow"].served for i in ("s.0", "s.1")}
        assert sum(served.values()) == 10 and min(served.values()) >= 3


async def test_a_busy_worker_takes_nothing_more_so_another_replica_gets_it() -> None:
    async with memory_deployment() as dep:
        await dep.start_worker("s.0", operator("slow", f"{ME}:Slow", max_inflight_requests=1))
        client = await dep.client()
        long = asyncio.create_task(collect(client, "slow", parameters={"sleep_s": 2.0}))
        await asyncio.wait_for(SEEN["started"].wait(), 5)
        rest = [asyncio.create_task(collect(client, "slow", parameters={"sleep_s": 0})) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert dep.workers["s.0"].hosts["slow"].status()["queued"] == 0  # s.0 took nothing more...
        assert len(dep.broker.queues[("test", "slow")]) == 3  # ...the queue holds them
        await dep.start_worker("s.1", operator("slow", f"{ME}:Slow", max_inflight_requests=1))
        done = await asyncio.wait_for(asyncio.gather(*rest), 1.5)  # served while s.0 is still busy
        assert not long.done()
        assert [o[-1].parameters["instance"] for o in done] == ["s.1"] * 3
        assert (await long)[-1].parameters["instance"] == "s.0"


async def test_directed_requests_and_no_responders() -> None:
    async with memory_deployment() as dep:
        for i in range(2):
            await dep.start_worker(f"s.{i}", operator("slow", f"{ME}:Slow", max_inflight_requests=4))
        client = await dep.client()
        for _ in range(3):
            out = await collect(client, "slow", parameters={"sleep_s": 0}, instance="s.1")
            assert out[-1].parameters["instance"] == "s.1"
        with pytest.raises(NoWorkerError, match="s.7"):
            await collect(client, "slow", instance="s.7")
        with pytest.raises(NoWorkerError, match="no ready worker"):
            await collect(client, "nothing")
        # discovery still lists s.0, but it stopped listening: "no responders", not a wait
        host = dep.workers["s.0"].hosts["slow"]
        assert host._intake is not None
        await host._intake.close()
        t0 = time.monotonic()
        with pytest.raises(NoWorkerError, match="not listening"):
            await collect(client, "slow", instance="s.0", timeout_s=10)
        assert time.monotonic() - t0 < 2


async def test_typed_errors_timeout_and_payload_limit() -> None:
    async with memory_deployment() as dep:
        await dep.start_worker("b.0", operator("boom", f"{ME}:Boom"), operator("slow", f"{ME}:Slow"))
        client = await dep.client()
        with pytest.raises(OperatorError, match="ValueError: no good") as err:
            await collect(client, "boom")
        assert err.value.detail["worker"] == "b.0" and err.value.operator == "boom"
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            await collect(client, "slow", parameters={"sleep_s": 30}, timeout_s=0.3)
        assert time.monotonic() - t0 < 3
        dep.broker.max_payload = 4096
        with pytest.raises(PayloadTooLarge):
            await collect(client, "slow", inputs={"x": np.zeros(10_000)})
        await dep.stop_worker("b.0")
        assert await client.worker_entries(max_age_s=0) == {}  # deregistered on a clean stop


async def test_worker_that_leaves_discovery_mid_request_is_lost() -> None:
    """An OperatorHost on its own (no Worker): its entry vanishes while it holds a request."""
    broker, discovery = MemoryBroker(), MemoryDiscovery()
    serving = ServingContext(instance="h.0", plane=broker.plane("dep"), codec=InlineCodec(),
                             metrics=WorkerMetrics("h.0"), request_plane=RequestPlaneConfig(),
                             cancelled=Cancellations())
    cfg = operator("slow", f"{ME}:Slow")
    host = OperatorHost(serving, cfg, Slow(OperatorContext(config=cfg, worker=None, logger=logging.getLogger("t"))))  # type: ignore[arg-type]
    await host.start_serving()
    entry = WorkerEntry(name="h.0", operators=["slow"], state="ready", host="x", pid=1, started_at=1.0, heartbeat_at=time.time())
    await discovery.put("h.0", entry.to_wire())
    client = RequestClient(broker.plane("dep"), codec=InlineCodec(), discovery=discovery)
    client.liveness_check_s, client.worker_lost_after_s = 0.05, 0.1
    stream = client.infer("slow", parameters={"sleep_s": 30}, timeout_s=20)
    assert (await stream.__anext__()).parameters["started"] == "h.0"
    await discovery.delete("h.0")
    t0 = time.monotonic()
    with pytest.raises(WorkerLost, match="left discovery"):
        await stream.__anext__()
    assert time.monotonic() - t0 < 2
    await host.drain(0.1)
    await client.close()


async def test_broker_redelivers_an_unsettled_request_after_ack_wait() -> None:
    broker = MemoryBroker(ack_wait_s=0.05, max_deliver=2)
    plane = broker.plane("dep")
    got: list[Any] = []
    await plane.serve("op", "w.0", max_inflight=4, window=lambda: 4 - len(got), deliver=got.append)
    msg = RequestMessage(id="r1", operator="op", inputs={}, parameters={}, deadline=time.time() + 5, reply="inbox.r1")
    await plane.submit(msg, encode_request(msg))
    assert [d.attempt for d in got] == [1]
    await asyncio.sleep(0.15)
    assert [d.attempt for d in got] == [1, 2]  # redelivered once, then dropped (max_deliver)
    await got[1].settle.ack()
    # nak hands a request back at once; ack settles it for good
    await plane.submit(msg, encode_request(msg))
    await got[2].settle.nak()
    assert [d.attempt for d in got] == [1, 2, 1, 2]
    await got[3].settle.ack()
    await asyncio.sleep(0.1)
    assert len(got) == 4
    # a closed window takes nothing: the request waits in the queue
    full = broker.plane("dep2")
    held: list[Any] = []
    intake = await full.serve("op", "w.1", max_inflight=1, window=lambda: 0, deliver=held.append)
    await full.submit(msg, encode_request(msg))
    assert held == [] and len(broker.queues[("dep2", "op")]) == 1
    await intake.close()


async def test_the_entry_on_the_wire_keeps_the_keys_launchers_and_status_read() -> None:
    """tdist/launch and tdist/cli read the published entry as a dict: its keys must not move."""
    async with memory_deployment() as dep:
        await dep.start_worker("a.0", operator("stream", f"{ME}:Stream", max_inflight_requests=2))
        client = await dep.client()
        wire = (await client.workers(max_age_s=0))["a.0"]
        assert set(wire) == {"name", "component", "deployment", "operators", "kinds", "roles", "host", "pid", "rank",
                             "state", "error", "inflight", "served", "errors", "per_operator", "started_at",
                             "heartbeat_at", "metrics_port"}
        assert set(wire["per_operator"]["stream"]) == {"inflight", "queued", "served", "errors", "stats"}
        assert wire["state"] == "ready" and wire["kinds"] == {"stream": "python"} and wire["roles"] == {"stream": "both"}
        assert WorkerEntry.from_wire(wire).to_wire() == wire
    # a reader keeps what it does not know and reads what is not a worker entry as None
    assert WorkerEntry.from_wire({"name": "x", "state": "ready", "later": 1}).to_wire()["later"] == 1
    assert WorkerEntry.read({"state": "sleeping"}) is None
