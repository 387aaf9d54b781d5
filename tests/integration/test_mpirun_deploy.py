"""`tdist deploy --launcher mpirun` end to end, through the real CLI on a real Open MPI:
hello world as a 3-rank world answers `tdist infer`, `status` lists every rank, each rank's log
is in the run directory, `stop` leaves no rank; `--dry-run` prints exactly `tdist plan`'s
command; etcd discovery (embedded etcd) works for a world too; a rank that cannot start fails
the deploy with its log lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tdist.launch.rundir import RunRecord
from tdist.runtime.process_identity import process_alive

pytestmark = [
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed (scripts/setup.d/10-mpi-slurm.sh)"),
    pytest.mark.timeout(300),
]

REPO = Path(__file__).resolve().parents[2]
TDIST = [sys.executable, "-m", "tdist"]
GRAPH = REPO / "graphs" / "hello_world_python.yaml"


def tdist(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(TDIST + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def make_graph(tmp_path: Path, name: str, **changes) -> Path:  # noqa: ANN003
    """hello_world_python.yaml with absolute python_path, a new name and `changes` merged in."""
    data = yaml.safe_load(GRAPH.read_text())
    data["name"] = name
    data["python_path"] = [str((GRAPH.parent / p).resolve()) for p in data.get("python_path", [])]
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["TDIST_HOME"] = str(tmp_path / "home")
    e["COLUMNS"] = "250"
    e.pop("NATS_SERVER", None)
    e.pop("ETCD_ENDPOINTS", None)
    return e


def wait_dead(pids: list[int], timeout_s: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if process_alive(p, None)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if process_alive(p, None)]


def test_dry_run_prints_exactly_the_plan_command(env: dict[str, str], tmp_path: Path) -> None:
    graph = make_graph(tmp_path, "hw-dry")
    run_dir = Path(env["TDIST_HOME"]) / "runs" / "hw-dry"
    dry = tdist(["deploy", str(graph), "--launcher", "mpirun", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    shown = tdist(["plan", str(graph), "--launcher", "mpirun", "--format", "script", "--run-dir", str(run_dir)], env)
    assert shown.returncode == 0, shown.stderr
    assert dry.stdout == shown.stdout
    assert dry.stdout.startswith("mpirun ") and "-np 3" in dry.stdout and "-x NATS_SERVER" in dry.stdout
    table = tdist(["plan", str(graph), "--launcher", "mpirun", "--run-dir", str(run_dir)], env)
    assert "command: " + dry.stdout.strip() in table.stdout.replace("\n", " ") or dry.stdout.strip() in table.stdout
    assert not run_dir.exists()  # dry run starts and writes nothing


def _deploy_infer_status_stop(env: dict[str, str], graph: Path, name: str, *, discovery: str) -> None:
    run_dir = Path(env["TDIST_HOME"]) / "runs" / name
    dep = tdist(["deploy", str(graph), "--launcher", "mpirun", "--detach"], env)
    state_file = run_dir / "state.json"
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        state = RunRecord.load(state_file)
        assert state.state == "ready" and state.launcher == "mpirun" and state.discovery == discovery
        world_pid = state.world.pid
        assert process_alive(world_pid, None)

        inf = tdist(["infer", "--component", "encoder_decoder", "--input", "input=[1,2,3]"], env)
        assert inf.returncode == 0, inf.stderr
        assert "output: [1, 2, 3]" in inf.stdout

        st = tdist(["status", "--json"], env)
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        workers = [w for comp in status["components"].values() for w in comp["workers"]]
        assert sorted(w["rank"] for w in workers) == [0, 1, 2]
        assert all(w["state"] == "ready" and w["host"] for w in workers)
        rank_pids = [int(w["pid"]) for w in workers]
        assert all(process_alive(p, None) for p in rank_pids)

        # Each rank's log is in the run directory, named after its worker.
        for w in workers:
            text = (run_dir / "logs" / f"{w['name']}.log").read_text()
            assert f"tdist worker ready: {w['name']}" in text
        assert (run_dir / "logs" / "mpirun.log").exists()
    finally:
        stop = tdist(["stop"], env, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    final = RunRecord.load(state_file)
    assert final.state == "stopped"
    pids = rank_pids + [world_pid] + [r.pid for r in (final.nats.process, final.supervisor, final.etcd.process) if r]
    assert wait_dead(pids) == []
    for w in workers:
        assert f"worker {w['name']} stopped" in (run_dir / "logs" / f"{w['name']}.log").read_text()
    after = tdist(["status"], env)
    assert after.returncode != 0 and "no running deployment" in after.stderr


def test_hello_world_as_three_rank_mpirun_world(env: dict[str, str], tmp_path: Path) -> None:
    graph = make_graph(tmp_path, "hw-mpi")
    _deploy_infer_status_stop(env, graph, "hw-mpi", discovery="nats")


def test_mpirun_world_with_embedded_etcd_discovery(env: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("aetcd")
    graph = make_graph(tmp_path, "hw-mpi-etcd", discovery={"kind": "etcd", "etcd_endpoints": "embedded", "ttl_s": 3})
    _deploy_infer_status_stop(env, graph, "hw-mpi-etcd", discovery="etcd")


def test_rank_that_cannot_start_fails_deploy_with_its_log(env: dict[str, str], tmp_path: Path) -> None:
    data = yaml.safe_load(GRAPH.read_text())
    ops = data["operators"]
    ops[1] = dict(ops[1], implementation="hello_world_ops:NoSuchOperator")
    graph = make_graph(tmp_path, "hw-mpi-bad", operators=ops)
    dep = tdist(["deploy", str(graph), "--launcher", "mpirun", "--detach", "--startup-timeout-s", "60"], env)
    assert dep.returncode != 0
    assert "NoSuchOperator" in dep.stderr + dep.stdout
    assert "Traceback" not in dep.stderr
    state = RunRecord.load(Path(env["TDIST_HOME"]) / "runs" / "hw-mpi-bad" / "state.json")
    assert state.state == "failed"
    pids = [p for p in (state.world, state.nats.process, state.supervisor) if p]
    assert wait_dead([p.pid for p in pids]) == []


def test_service_worker_beside_the_world_serves_kserve(env: dict[str, str], tmp_path: Path) -> None:
    """A frontend (a service worker: not a rank) runs beside NATS and reaches the world's ranks."""
    pytest.importorskip("aiohttp")
    import socket
    import urllib.request

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    data = yaml.safe_load(GRAPH.read_text())
    ops = data["operators"] + [{"name": "kserve", "kind": "frontend", "protocol": "kserve", "targets": ["encoder_decoder"],
                                "host": "127.0.0.1", "port": port, "parameters": {"grpc_port": None}}]
    workers = data["workers"] + [{"name": "kserve", "operators": ["kserve"]}]
    graph = make_graph(tmp_path, "hw-mpi-svc", operators=ops, workers=workers)
    dry = tdist(["deploy", str(graph), "--launcher", "mpirun", "--dry-run"], env)
    assert "-np 3 " in dry.stdout  # the frontend is not a rank
    dep = tdist(["deploy", str(graph), "--launcher", "mpirun", "--detach"], env)
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        body = json.dumps({"inputs": [{"name": "input", "shape": [3], "datatype": "INT64", "data": [4, 5, 6]}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/encoder_decoder/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})  # urllib's default (a form) is a 415
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
        assert answer["outputs"][0]["data"] == [4, 5, 6]
        st = json.loads(tdist(["status", "--json"], env).stdout)
        ranks = {w["name"]: w["rank"] for c in st["components"].values() for w in c["workers"]}
        assert ranks == {"encoder.0": 0, "decoder.0": 1, "encoder_decoder.0": 2, "kserve.0": None}
        svc_pid = RunRecord.load(Path(env["TDIST_HOME"]) / "runs" / "hw-mpi-svc" / "state.json").workers["kserve.0"].pid
    finally:
        stop = tdist(["stop"], env, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert wait_dead([svc_pid]) == []
