"""`tdist deploy --detach` → `infer` → `status` → `stop` through the real CLI, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdist.launch.rundir import RunRecord
from tdist.runtime.process_identity import process_alive
from tests.conftest import REPO

TDIST = [sys.executable, "-m", "tdist"]


def run(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(TDIST + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tdist_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TDIST_HOME"] = str(tdist_home)
    env["COLUMNS"] = "200"
    env.pop("NATS_SERVER", None)
    return env


def test_deploy_infer_status_stop_hello_world(cli_env: dict[str, str], tdist_home: Path) -> None:
    graph = REPO / "graphs" / "hello_world_python.yaml"
    if not graph.exists():
        graph = REPO / "graphs" / "hello_world.yaml"
    dep = run(["deploy", str(graph), "--detach", "--name", "hw-cli"], cli_env)
    state_file = tdist_home / "runs" / "hw-cli" / "state.json"
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        state = RunRecord.load(state_file)
        assert state.state == "ready" and state.nats.embedded

        inf = run(["infer", "--component", "encoder_decoder", "--input", "input=[1,2,3]"], cli_env)
        assert inf.returncode == 0, inf.stderr
        assert "output: [1, 2, 3]" in inf.stdout

        st = run(["status", "--json"], cli_env)
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        assert set(status["components"]) >= {"encoder", "decoder", "encoder_decoder"}
        for comp in status["components"].values():
            assert any(w["state"] == "ready" for w in comp["workers"])

        load = run(["infer", "-c", "encoder_decoder", "-i", "input=[4,5]", "--requests", "50", "--concurrency", "8"], cli_env)
        assert load.returncode == 0, load.stderr
        assert "Throughput:" in load.stdout and "Total Time:" in load.stdout

        bad = run(["infer", "-c", "nosuch", "-i", "input=[1]"], cli_env)
        assert bad.returncode != 0 and "no_worker" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        stop = run(["stop"], cli_env)
    assert stop.returncode == 0, stop.stderr
    state = RunRecord.load(state_file)
    assert state.state == "stopped"
    pids = [w.pid for w in state.workers.values()] + [state.nats.process.pid, state.supervisor.pid]
    assert not [p for p in pids if process_alive(p, None)], "processes left behind"
    # with nothing running, status says so and exits non-zero
    none = run(["status"], cli_env)
    assert none.returncode != 0 and "no running deployment" in none.stderr


def test_failed_start_shows_the_log_tail(cli_env: dict[str, str], tmp_path: Path) -> None:
    graph = tmp_path / "broken.yaml"
    graph.write_text(
        "name: broken\n"
        "operators:\n"
        "  - name: boom\n"
        "    kind: python\n"
        "    implementation: \"no_such_module_xyz:Op\"\n"
        "workers:\n"
        "  - name: boom\n"
        "    operators: [boom]\n"
    )
    res = run(["deploy", str(graph), "--detach", "--startup-timeout-s", "60"], cli_env)
    assert res.returncode != 0
    assert "no_such_module_xyz" in res.stderr
    assert "Traceback" not in res.stderr


def test_foreground_deploy_stops_everything_on_ctrl_c(cli_env: dict[str, str], tdist_home: Path) -> None:
    import signal

    graph = REPO / "graphs" / "hello_world_python.yaml"
    proc = subprocess.Popen(TDIST + ["deploy", str(graph), "--name", "hw-fg"], env=cli_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the supervisor says when it serves (bounded by the startup timeout)
            if line.startswith("serving"):
                break
        else:
            raise AssertionError("deploy ended before serving: " + (proc.stderr.read() if proc.stderr else ""))
        inf = run(["infer", "-c", "encoder_decoder", "-i", "input=[7,8]"], cli_env)
        assert "output: [7, 8]" in inf.stdout, inf.stderr
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "stopped hw-fg" in rest
    state = RunRecord.load(tdist_home / "runs" / "hw-fg" / "state.json")
    assert state.state == "stopped"
    assert not [p for p in [w.pid for w in state.workers.values()] + [state.nats.process.pid] if process_alive(p, None)]


def test_status_fails_when_a_component_has_no_ready_worker(cli_env: dict[str, str], tdist_home: Path) -> None:
    import signal

    graph = REPO / "graphs" / "hello_world_python.yaml"
    dep = run(["deploy", str(graph), "--detach", "--name", "hw-dead", "--no-restart"], cli_env)
    try:
        assert dep.returncode == 0, dep.stderr
        state = RunRecord.load(tdist_home / "runs" / "hw-dead" / "state.json")
        os.kill(state.workers["decoder.0"].pid, signal.SIGKILL)
        # each status call reads discovery afresh; the dead worker turns stale within a few heartbeats
        for _ in range(60):
            st = run(["status", "--json"], cli_env)
            report = json.loads(st.stdout)
            if "decoder" in report["unhealthy"]:
                break
        assert st.returncode == 1 and report["unhealthy"] == ["decoder"]
        assert "encoder" not in report["unhealthy"]
        table = run(["status"], cli_env)
        assert table.returncode == 1 and "no ready worker: decoder" in table.stderr
    finally:
        run(["stop"], cli_env)


def test_local_deploy_with_embedded_etcd_discovery(cli_env: dict[str, str], tdist_home: Path, tmp_path: Path) -> None:
    text = (REPO / "graphs" / "hello_world_python.yaml").read_text()
    text = text.replace("discovery: nats", "discovery: {kind: etcd, etcd_endpoints: embedded}")
    assert "kind: etcd" in text
    text = text.replace('python_path: ["../examples', f'python_path: ["{REPO}/examples')
    graph = tmp_path / "hello_etcd.yaml"
    graph.write_text(text)
    dep = run(["deploy", str(graph), "--detach", "--name", "hw-etcd"], cli_env)
    try:
        assert dep.returncode == 0, dep.stderr
        state = RunRecord.load(tdist_home / "runs" / "hw-etcd" / "state.json")
        assert state.discovery == "etcd" and state.etcd.endpoints and process_alive(state.etcd.process.pid, None)
        inf = run(["infer", "-c", "encoder_decoder", "-i", "input=[5,6]"], cli_env)
        assert "output: [5, 6]" in inf.stdout, inf.stderr
        st = run(["status", "--json"], cli_env)
        assert st.returncode == 0 and not json.loads(st.stdout)["unhealthy"], st.stdout + st.stderr
    finally:
        stop = run(["stop"], cli_env)
    assert stop.returncode == 0, stop.stderr
    assert not process_alive(state.etcd.process.pid, None)
