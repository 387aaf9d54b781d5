"""The embedded nats-server is supervised (issue 15): restarted on its port and store directory;
a port taken meanwhile fails the deployment cleanly, with an error that says so.

Real nats-server processes and a real deployment of graphs/hello_world_python.yaml (`tdist deploy
--detach`: the real local supervisor). Waits are on signals (the run record), bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tdist.launch.nats import NatsPortTaken, start_nats
from tdist.launch.rundir import RunRecord
from tdist.runtime import protocol as P
from tests.integration.test_mpirun_deploy import env  # noqa: F401 - TDIST_HOME in tmp, no NATS_SERVER
from tests.integration.test_mpirun_deploy import make_graph, tdist, wait_dead

pytestmark = pytest.mark.timeout(150)


def deploy(graph: Path, env: dict[str, str]) -> Path:  # noqa: F811
    dep = tdist(["deploy", str(graph), "--detach"], env)
    assert dep.returncode == 0, dep.stdout + dep.stderr
    return Path(env["TDIST_HOME"]) / "runs" / graph.stem / "state.json"


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
        procs = [w.process for w in rec.workers.values()] + [rec.nats.process, rec.supervisor]
        assert wait_dead([p.pid for p in procs if p is not None], timeout_s=60) == []
    finally:
        squatter.close()
        tdist(["stop"], env, timeout=60)
