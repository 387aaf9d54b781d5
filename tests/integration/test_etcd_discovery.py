"""etcd discovery against a real embedded etcd: leases, expiry of a killed process, isolation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("aetcd")

from tdist.errors import LaunchError
from tdist.launch.etcd import EtcdServer, etcd_command, find_etcd_binary, start_etcd
from tdist.runtime.config import DiscoveryConfig
from tdist.runtime.planes.discovery import make_discovery
from tdist.runtime.planes.discovery_etcd import EtcdDiscovery, parse_endpoint

try:
    find_etcd_binary()
except LaunchError as e:  # pragma: no cover - the etcd extra is part of the test install
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def etcd() -> EtcdServer:
    server = start_etcd()
    yield server
    server.stop()


async def wait_until(pred, timeout_s: float, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


def test_embedded_etcd_is_healthy_and_cleans_up() -> None:
    server = start_etcd()
    try:
        assert server.alive()
        assert server.endpoint.startswith("http://127.0.0.1:")
        assert "ready to serve client requests" in server.log_path.read_text()
        data_dir = server.data_dir
    finally:
        server.stop()
    assert not server.alive()
    assert not data_dir.exists()


def test_etcd_command_uses_explicit_loopback_urls(tmp_path) -> None:
    argv = etcd_command("etcd", tmp_path, 1111, 2222)
    assert argv[argv.index("--listen-client-urls") + 1] == "http://127.0.0.1:1111"
    assert argv[argv.index("--initial-cluster") + 1] == "tdist=http://127.0.0.1:2222"


def test_start_failure_shows_log_tail(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'fatal: cannot start (simulated)'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TDIST_ETCD_BIN", str(fake))
    with pytest.raises(LaunchError) as ei:
        start_etcd(timeout_s=5)
    assert "exited with code 3" in str(ei.value)
    assert "simulated" in (ei.value.log_tail or "")


def test_parse_endpoint() -> None:
    assert parse_endpoint("http://127.0.0.1:2380") == ("127.0.0.1", 2380)
    assert parse_endpoint("node1:1234") == ("node1", 1234)
    assert parse_endpoint("node1") == ("node1", 2379)
    with pytest.raises(ValueError):
        parse_endpoint("https://node1:2379")


async def test_put_list_delete_and_deployment_isolation(etcd: EtcdServer) -> None:
    a = EtcdDiscovery(etcd.endpoints, "dep-a", ttl_s=5)
    b = EtcdDiscovery(etcd.endpoints, "dep-b", ttl_s=5)
    try:
        await a.put("enc.0", {"operator": "encoder", "n": 1})
        await a.put("enc.1", {"operator": "encoder", "n": 2})
        await b.put("dec.0", {"operator": "decoder"})
        assert await a.list() == {"enc.0": {"operator": "encoder", "n": 1}, "enc.1": {"operator": "encoder", "n": 2}}
        assert await b.list() == {"dec.0": {"operator": "decoder"}}
        await a.put("enc.0", {"operator": "encoder", "n": 10})  # refresh with a new entry
        assert (await a.list())["enc.0"]["n"] == 10
        await a.delete("enc.1")
        assert set(await a.list()) == {"enc.0"}
    finally:
        await a.close()
        await b.close()


async def test_close_revokes_lease_so_entries_leave_at_once(etcd: EtcdServer) -> None:
    owner = EtcdDiscovery(etcd.endpoints, "dep-close", ttl_s=30)
    watcher = EtcdDiscovery(etcd.endpoints, "dep-close", ttl_s=30)
    try:
        await owner.put("w.0", {"x": 1})
        assert set(await watcher.list()) == {"w.0"}
        await owner.close()
        assert await watcher.list() == {}
    finally:
        await watcher.close()


async def test_heartbeats_keep_entry_past_ttl(etcd: EtcdServer) -> None:
    d = EtcdDiscovery(etcd.endpoints, "dep-hb", ttl_s=2)
    try:
        start = time.monotonic()
        while time.monotonic() - start < 3.5:  # well past one TTL
            await d.put("w.0", {"alive": True})
            assert "w.0" in await d.list()
            await asyncio.sleep(0.5)
    finally:
        await d.close()


async def test_lease_lost_under_a_live_process_is_regranted(etcd: EtcdServer) -> None:
    import aetcd

    d = EtcdDiscovery(etcd.endpoints, "dep-regrant", ttl_s=5)
    try:
        await d.put("w.0", {"v": 1})
        await d.put("w.1", {"v": 2})
        old = d.lease_id
        host, port = parse_endpoint(etcd.endpoint)
        async with aetcd.Client(host=host, port=port) as other:
            await other.revoke_lease(old)  # as if the lease had expired during a long pause
        assert await d.list() == {}
        await d.put("w.0", {"v": 3})
        assert d.lease_id != old
        assert await d.list() == {"w.0": {"v": 3}, "w.1": {"v": 2}}
    finally:
        await d.close()


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from tdist.runtime.planes.discovery_etcd import EtcdDiscovery

    async def main():
        d = EtcdDiscovery([sys.argv[1]], sys.argv[2], ttl_s=float(sys.argv[3]))
        await d.put("worker.0", {"pid": __import__("os").getpid()})
        print("registered", flush=True)
        while True:
            await asyncio.sleep(0.3)
            await d.put("worker.0", {"pid": __import__("os").getpid()})

    asyncio.run(main())
    """
)


async def test_killed_process_lease_expires_and_entry_leaves(etcd: EtcdServer) -> None:
    ttl_s = 2.0
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, etcd.endpoint, "dep-kill", str(ttl_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    d = EtcdDiscovery(etcd.endpoints, "dep-kill", ttl_s=ttl_s)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.strip() == "registered", line
        entries = await d.list()
        assert entries["worker.0"]["pid"] == proc.pid
        # Still there after a full TTL: the process is heart-beating.
        await asyncio.sleep(ttl_s + 0.5)
        assert "worker.0" in await d.list()
        os.kill(proc.pid, signal.SIGKILL)  # no close(), no revoke: only the lease can clean up
        proc.wait(timeout=10)
        killed_at = time.monotonic()

        async def gone():
            return "worker.0" not in await d.list()

        await wait_until(gone, timeout_s=ttl_s + 5)
        waited = time.monotonic() - killed_at
        assert waited <= ttl_s + 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await d.close()


async def test_make_discovery_reads_etcd_endpoints_env(etcd: EtcdServer, monkeypatch) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", etcd.endpoint)
    d = make_discovery(DiscoveryConfig(kind="etcd", ttl_s=3), "dep-env")
    assert isinstance(d, EtcdDiscovery)
    try:
        await d.put("k", {"a": 1})
        assert await d.list() == {"k": {"a": 1}}
    finally:
        await d.close()


async def test_unreachable_etcd_is_a_clear_error() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    d = EtcdDiscovery([f"http://127.0.0.1:{port}"], "dep-x", ttl_s=2, timeout_s=2)
    with pytest.raises(ConnectionError) as ei:
        await d.list()
    assert f"127.0.0.1:{port}" in str(ei.value)
    assert "ETCD_ENDPOINTS" in str(ei.value)
    await d.close()


async def test_killed_real_worker_leaves_etcd_discovery(etcd: EtcdServer, nats_server, tmp_path) -> None:
    """A real `python -m tdist.runtime.worker` with `discovery: etcd`: ready in etcd, SIGKILLed,
    gone once its lease expires (nobody deregisters it)."""
    from pathlib import Path

    from tdist.runtime.config import OperatorConfig, RequestPlaneConfig, WorkerConfig

    ops_dir = Path(__file__).resolve().parents[2] / "examples" / "hello_world" / "operators"
    ttl_s = 2.0
    cfg = WorkerConfig(
        name="encoder.0",
        component="encoder",
        deployment="dep-real-worker",
        operators=[OperatorConfig(name="encoder", implementation="hello_world_ops:EncoderOperator")],
        request_plane=RequestPlaneConfig(url=nats_server.url, heartbeat_interval_s=0.5),
        discovery=DiscoveryConfig(kind="etcd", etcd_endpoints=etcd.endpoints, ttl_s=ttl_s),
        env={"PYTHONPATH": str(ops_dir)},
    )
    cfg_path = tmp_path / "worker.json"
    cfg_path.write_text(cfg.to_json())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ops_dir), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "tdist.runtime.worker", "--config", str(cfg_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = EtcdDiscovery(etcd.endpoints, "dep-real-worker", ttl_s=ttl_s)
    try:
        async def ready():
            e = (await d.list()).get("encoder.0")
            return e if e and e.get("state") == "ready" else None

        entry = await wait_until(ready, timeout_s=60)
        assert entry["pid"] == proc.pid and entry["operators"] == ["encoder"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

        async def gone():
            return "encoder.0" not in await d.list()

        start = time.monotonic()
        await wait_until(gone, timeout_s=ttl_s + 5)
        assert time.monotonic() - start <= ttl_s + 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await d.close()


def test_ensure_etcd_for_starts_one_only_when_embedded(tmp_path) -> None:
    from tdist.launch.etcd import ensure_etcd_for
    from tdist.runtime.config import OperatorConfig, WorkerConfig

    def worker(discovery: DiscoveryConfig) -> WorkerConfig:
        return WorkerConfig(name="w.0", component="w", deployment="d", discovery=discovery,
                            operators=[OperatorConfig(name="op", implementation="m:C")])

    assert ensure_etcd_for([worker(DiscoveryConfig())], tmp_path, env={}) == (None, [])
    explicit = worker(DiscoveryConfig(kind="etcd", etcd_endpoints=["http://10.0.0.1:2379"]))
    assert ensure_etcd_for([explicit], tmp_path, env={}) == (None, ["http://10.0.0.1:2379"])
    embedded = worker(DiscoveryConfig(kind="etcd"))
    assert ensure_etcd_for([embedded], tmp_path, env={"ETCD_ENDPOINTS": "http://a:1,http://b:2"}) == (
        None, ["http://a:1", "http://b:2"])
    (tmp_path / "logs").mkdir()
    server, endpoints = ensure_etcd_for([embedded], tmp_path, env={})
    try:
        assert server is not None and server.alive() and endpoints == server.endpoints
        assert (tmp_path / "logs" / "etcd.log").read_text().count("ready to serve client requests") >= 1
    finally:
        server.stop()
    assert not server.alive()
