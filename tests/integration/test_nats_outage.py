"""The request plane survives its nats-server (issue 15): kill -9 mid-load, an outage, a lost stream.

Real nats-server processes and real deployments of graphs/hello_world_python.yaml (`tdist deploy
--detach`: the real local supervisor). Each load is bounded and counts every request's outcome:
ok with a checked answer, a typed error (by class), hung (still open well past its deadline) or
wrong. Asserted: 0 hung, 0 wrong, and fresh requests all succeed once the plane is back. How fast
it recovers is measured by the benchmarks, not asserted here. Waits are on signals (the run
record, discovery entries), bounded; no fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from nats.js.api import StorageType

from tdist.errors import RequestError, RequestPlaneDown
from tdist.launch.nats import NatsPortTaken, start_nats
from tdist.launch.rundir import RunRecord
from tdist.runtime import protocol as P
from tdist.runtime.planes.discovery import bucket_name
from tdist.runtime.planes.request import RequestClient
from tests.integration.test_mpirun_deploy import env  # noqa: F401 - TDIST_HOME in tmp, no NATS_SERVER
from tests.integration.test_mpirun_deploy import make_graph, tdist, wait_dead

pytestmark = pytest.mark.timeout(150)

DEADLINE_S = 8.0  # each request's deadline
HUNG_AFTER_S = DEADLINE_S + 5.0  # a request still open this long after it started is hung


class Load:
    """A bounded load of `n` hello-world requests, `inflight` at a time, every outcome counted."""

    def __init__(self, client: RequestClient, n: int, inflight: int = 16) -> None:
        self.client, self.n, self.inflight = client, n, inflight
        self.outcomes: Counter[str] = Counter()
        self.started = 0
        self.ended = 0

    async def one(self, i: int) -> None:
        x = np.array([i, -i, 7, i % 5], dtype=np.int64)
        self.started += 1
        try:
            outcome = await asyncio.wait_for(self._ask(x), HUNG_AFTER_S)
        except asyncio.TimeoutError:
            outcome = "hung"
        self.outcomes[outcome] += 1
        self.ended += 1

    async def _ask(self, x: np.ndarray) -> str:
        try:
            final = None
            async for r in self.client.infer("encoder_decoder", inputs={"input": x}, timeout_s=DEADLINE_S):
                final = r
            ok = final is not None and final.final and np.array_equal(final.outputs["output"], x)
            return "ok" if ok else "wrong"
        except RequestError as exc:
            return type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - an untyped error is an outcome to count, and to fail on
            return f"untyped {type(exc).__name__}: {exc}"

    async def run(self, start: int = 0) -> Counter[str]:
        todo = iter(range(start, start + self.n))

        async def lane() -> None:
            for i in todo:
                await self.one(i)

        await asyncio.gather(*(lane() for _ in range(self.inflight)))
        return self.outcomes


def assert_answered(outcomes: Counter[str], n: int) -> None:
    """Every request ended: ok, or a typed error; none hung, none wrong, none untyped."""
    assert sum(outcomes.values()) == n, outcomes
    assert outcomes["hung"] == 0 and outcomes["wrong"] == 0, outcomes
    untyped = [k for k in outcomes if k.startswith("untyped")]
    assert not untyped, outcomes
    assert outcomes["ok"] > 0, outcomes


async def wait_for(ok: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await _call(ok):
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        await asyncio.sleep(0.02)


async def _call(fn: Callable[[], Any]) -> Any:
    got = fn()
    return await got if asyncio.iscoroutine(got) else got


async def all_reconnected(client: RequestClient, names: set[str]) -> bool:
    """Every worker is ready in discovery and its entry says it got the plane back."""
    try:
        entries = await client.worker_entries(max_age_s=0)
    except RequestError:
        return False
    return all(n in entries and entries[n].state == "ready" and entries[n].plane_reconnects >= 1 for n in names)


async def fresh_requests_succeed(client: RequestClient, n: int = 50) -> None:
    fresh = Load(client, n, inflight=8)
    outcomes = await fresh.run(start=10_000)
    assert outcomes == Counter({"ok": n}), outcomes


WORKERS = {"encoder.0", "decoder.0", "encoder_decoder.0"}


def deploy(graph: Path, env: dict[str, str]) -> Path:  # noqa: F811
    dep = tdist(["deploy", str(graph), "--detach"], env)
    assert dep.returncode == 0, dep.stdout + dep.stderr
    return Path(env["TDIST_HOME"]) / "runs" / graph.stem / "state.json"


def stop_and_check(env: dict[str, str], state_file: Path, final_state: str = "stopped") -> None:  # noqa: F811
    stop = tdist(["stop"], env, timeout=120)
    final = RunRecord.load(state_file)
    assert final.state == final_state, (stop.stdout, stop.stderr, final.model_dump_json(indent=1))
    procs = [w.process for w in final.workers.values()] + [final.nats.process, final.supervisor]
    assert wait_dead([p.pid for p in procs if p is not None]) == []


def test_kill_9_of_the_embedded_server_mid_load(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """SIGKILL the embedded nats-server once 300 of 1,200 requests have ended: the supervisor
    restarts it on its port and store, the deployment is degraded meanwhile, every request ends
    ok or typed, none hangs, and fresh requests all succeed afterwards."""
    graph = make_graph(tmp_path, "nats-kill9")
    state_file = deploy(graph, env)
    try:
        rec = RunRecord.load(state_file)
        assert rec.state == "ready" and rec.nats.state == "up" and rec.nats.process is not None
        victim, url = rec.nats.process.pid, rec.nats.url

        async def scenario() -> tuple[Counter[str], set[str], float]:
            client = await RequestClient.connect(url, "nats-kill9")
            try:
                load = Load(client, 1200)
                seen: set[str] = set()
                running = asyncio.create_task(load.run())
                await wait_for(lambda: load.ended >= 300 or running.done(), 60, "300 requests ended")
                assert load.ended < 1200, "the load ended before the kill: nothing was tested"
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()

                def restarted() -> bool:
                    r = RunRecord.load(state_file)
                    seen.add(f"{r.state}/{r.nats.state}")
                    return r.nats.restarts >= 1 and r.nats.state == "up" and r.state == "ready"

                await wait_for(restarted, 30, "the supervisor restarted nats-server")
                await wait_for(lambda: all_reconnected(client, WORKERS), 30, "workers back in discovery")
                recovered_s = time.monotonic() - killed
                outcomes = await running
                await fresh_requests_succeed(client)
                return outcomes, seen, recovered_s
            finally:
                await client.close()

        outcomes, seen, recovered_s = asyncio.run(scenario())
        print(f"kill -9 mid-load: outcomes {dict(outcomes)}; recovered in {recovered_s:.2f} s")
        assert_answered(outcomes, 1200)
        assert "degraded/restarting" in seen, seen
        rec = RunRecord.load(state_file)
        assert rec.nats.process is not None and rec.nats.process.pid != victim
        assert rec.nats.url == url  # same port: clients reconnected to the URL they knew
        st = tdist(["status", "--json"], env)
        assert st.returncode == 0, st.stdout + st.stderr
        shown = json.loads(st.stdout)
        assert shown["state"] == "ready" and shown["request_plane"]["state"] == "up", shown
        assert shown["request_plane"]["restarts"] == 1, shown
    finally:
        stop_and_check(env, state_file)


def test_an_outage_of_an_external_server(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """A nats-server the test owns (the graph names its nats:// URL) is stopped under load and
    started again on the same port and store: same outcomes as a kill -9."""
    server = start_nats(work_dir=str(tmp_path / "ext-nats"))
    try:
        graph = make_graph(tmp_path, "nats-outage", request_plane=server.url)
        state_file = deploy(graph, env)
        try:
            async def scenario() -> Counter[str]:
                nonlocal server
                client = await RequestClient.connect(server.url, "nats-outage")
                try:
                    load = Load(client, 800)
                    running = asyncio.create_task(load.run())
                    await wait_for(lambda: load.ended >= 200 or running.done(), 60, "200 requests ended")
                    assert load.ended < 800, "the load ended before the outage: nothing was tested"
                    server.stop()
                    stopped_at = load.started
                    # the outage lasts until the client knows and requests were sent into it
                    await wait_for(lambda: not client.plane.connected and load.started >= stopped_at + 8
                                   or running.done(), 30, "requests sent during the outage")
                    server = server.restart()
                    outcomes = await running
                    await wait_for(lambda: all_reconnected(client, WORKERS), 30, "workers back in discovery")
                    await fresh_requests_succeed(client)
                    return outcomes
                finally:
                    await client.close()

            outcomes = asyncio.run(scenario())
            print(f"outage: outcomes {dict(outcomes)}")
            assert_answered(outcomes, 800)
        finally:
            stop_and_check(env, state_file)
    finally:
        server.stop()


def test_a_missing_stream_is_request_plane_down_at_the_caller(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """The deployment's work-queue stream deleted under a running deployment: a request is not
    silently dropped, its caller gets RequestPlaneDown at once."""
    graph = make_graph(tmp_path, "nats-nostream")
    state_file = deploy(graph, env)
    try:
        url = RunRecord.load(state_file).nats.url

        async def scenario() -> None:
            client = await RequestClient.connect(url, "nats-nostream")
            try:
                await fresh_requests_succeed(client, 5)
                info = await client.js.stream_info(P.stream_name("nats-nostream"))
                assert info.config.storage == StorageType.FILE  # durable by default
                kv = await client.js.stream_info("KV_" + bucket_name("nats-nostream"))
                assert kv.config.storage == StorageType.FILE
                await client.js.delete_stream(P.stream_name("nats-nostream"))
                t0 = time.monotonic()
                with pytest.raises(RequestPlaneDown, match="no request stream"):
                    async for _ in client.infer("encoder_decoder", inputs={"input": np.arange(3)}, timeout_s=30):
                        pass
                assert time.monotonic() - t0 < 5  # at once, not at the deadline
            finally:
                await client.close()

        asyncio.run(scenario())
    finally:
        stop_and_check(env, state_file)


def test_restart_keeps_port_and_store_and_a_taken_port_is_an_error(tmp_path: Path) -> None:
    """NatsServer.restart: the same port, and JetStream recovers a file stream from the store;
    if another process holds the port, NatsPortTaken says so."""
    server = start_nats(work_dir=str(tmp_path / "n"))
    try:
        async def put() -> int:
            import nats
            from nats.js.api import StorageType, StreamConfig

            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                await js.add_stream(StreamConfig(name=P.stream_name("keep"), subjects=P.stream_subjects("keep"),
                                                 storage=StorageType.FILE))
                await js.publish(P.request_subject("keep", "op"), b"x")
                return (await js.stream_info(P.stream_name("keep"))).state.messages
            finally:
                await nc.close()

        assert asyncio.run(put()) == 1
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)
        port = server.port
        server = server.restart()
        assert server.port == port and server.alive()
        assert asyncio.run(put()) == 2  # the first message was kept on disk
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME-WAIT, as nats-server binds
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            with pytest.raises(NatsPortTaken, match=f"port {port}"):
                server.restart()
    finally:
        server.stop()


def test_a_taken_port_fails_the_deployment_cleanly(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """The embedded server dies and another process takes its port before the restart: the
    deployment ends `failed` with an error naming the port, and nothing of it is left running."""
    graph = make_graph(tmp_path, "nats-taken")
    state_file = deploy(graph, env)
    rec = RunRecord.load(state_file)
    assert rec.nats.process is not None and rec.nats.url
    port = int(rec.nats.url.rsplit(":", 1)[1])
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME-WAIT, as nats-server binds
    try:
        os.kill(rec.nats.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while True:  # the port frees once the process is gone: take it before the restart (≥ 0.2 s)
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed server's port never freed"
                time.sleep(0.005)
        squatter.listen()
        deadline = time.monotonic() + 60
        rec = RunRecord.load(state_file)
        while rec.state != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
            rec = RunRecord.load(state_file)
        assert rec.state == "failed" and rec.nats.state == "down", rec.model_dump_json(indent=1)
        assert rec.error and f"port {port}" in rec.error and "taken" in rec.error
        squatter.close()  # a listener that never speaks NATS would make status wait out its connect timeouts
        st = tdist(["status", "--json", "--name", "nats-taken"], env)
        shown = json.loads(st.stdout)
        assert shown["state"] == "failed" and shown["request_plane"]["state"] == "down", shown
        procs = [w.process for w in rec.workers.values()] + [rec.nats.process, rec.supervisor]
        assert wait_dead([p.pid for p in procs if p is not None], timeout_s=60) == []
    finally:
        squatter.close()
        tdist(["stop"], env, timeout=60)


def test_a_full_stream_is_overloaded_and_a_stored_request_is_acknowledged(tmp_path: Path) -> None:
    """submit() returns once JetStream stored the request (the stream counts it); a stream that
    refuses it (full, discard new) is Overloaded at the caller, not silence."""
    from nats.js.api import DiscardPolicy

    from tdist.errors import Overloaded
    from tdist.runtime.planes.request_nats import NatsRequestPlane

    server = start_nats(work_dir=str(tmp_path / "n"))

    async def scenario() -> None:
        plane = await NatsRequestPlane.connect(server.url, "full")
        try:
            await plane.ensure_stream()
            name = P.stream_name("full")
            cfg = (await plane.js.stream_info(name)).config
            cfg.max_msgs, cfg.discard = 2, DiscardPolicy.NEW
            await plane.js.update_stream(cfg)

            def msg(i: int) -> P.RequestMessage:
                return P.RequestMessage(id=f"r{i}", operator="op", inputs={}, parameters={},
                                        deadline=time.time() + 10, reply=f"_INBOX.t.r{i}")

            for i in range(2):
                await plane.submit(msg(i), P.encode_request(msg(i)))
                assert (await plane.js.stream_info(name)).state.messages == i + 1  # stored when submit returned
            with pytest.raises(Overloaded, match="maximum messages"):
                await plane.submit(msg(2), P.encode_request(msg(2)))
        finally:
            await plane.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_the_first_connect_to_an_unreachable_url_fails_fast() -> None:
    """Endless reconnects are for a connection that was up: a URL that never answers is a
    ConnectError naming it, within seconds (`tdist status` / `infer` must not hang on it)."""
    from tdist.runtime.planes.request_nats import ConnectError, connect_nats

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        t0 = time.monotonic()
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
            asyncio.run(asyncio.wait_for(connect_nats(f"nats://127.0.0.1:{port}"), 30))
        assert time.monotonic() - t0 < 10
