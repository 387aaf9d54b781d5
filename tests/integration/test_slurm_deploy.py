"""`tdist deploy --launcher sbatch|srun` end to end on the real single-node Slurm cluster that
scripts/cluster.sh brings up (and tears down) for this module: the hello world graph submitted
with sbatch answers `tdist infer`, `tdist status` lists every rank, each rank's log lands in the
run directory, `tdist stop` drains the ranks and leaves an empty squeue; the same with srun."""

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
from tdist.runtime.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "cluster.sh"
TDIST = [sys.executable, "-m", "tdist"]
GRAPH = REPO / "graphs" / "hello_world_python.yaml"

pytestmark = [
    pytest.mark.skipif(
        not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "srun")),
        reason="Slurm/munge not installed (scripts/setup.d/10-mpi-slurm.sh installs them)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd needs root"),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """A fresh cluster (4 CPUs declared, so a 3-rank world fits on a 2-core machine)."""
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, TDIST_SLURM_DIR=str(state), TDIST_SLURM_CPUS="4")
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, timeout=60)
        pytest.fail(f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    yield dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    down = subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr


@pytest.fixture
def env(slurm_env, tmp_path: Path) -> dict[str, str]:
    e = dict(slurm_env)
    e["TDIST_HOME"] = str(tmp_path / "home")
    e["COLUMNS"] = "250"
    for k in ("NATS_SERVER", "ETCD_ENDPOINTS", "SLURM_JOB_ID", "SLURM_JOBID"):
        e.pop(k, None)
    return e


def tdist(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(TDIST + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def make_graph(tmp_path: Path, name: str, discovery: str = "nats") -> Path:
    data = yaml.safe_load(GRAPH.read_text())
    data["name"] = name
    data["python_path"] = [str((GRAPH.parent / p).resolve()) for p in data.get("python_path", [])]
    # The batch script's embedded nats-server (and etcd) listen on these ports of the batch host.
    data.setdefault("launch", {})["srun"] = {"nats_port": free_port(), "etcd_port": free_port()}
    if discovery == "etcd":
        data["discovery"] = {"kind": "etcd", "etcd_endpoints": "embedded", "ttl_s": 3}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def squeue(env: dict[str, str]) -> list[str]:
    res = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def check_running_deployment(env: dict[str, str], run_dir: Path) -> list[int]:
    """infer answers, status lists ranks 0..2 ready; returns the rank pids."""
    inf = tdist(["infer", "--component", "encoder_decoder", "--input", "input=[1,2,3]"], env)
    assert inf.returncode == 0, inf.stdout + inf.stderr
    assert "output: [1, 2, 3]" in inf.stdout
    st = tdist(["status", "--json"], env)
    assert st.returncode == 0, st.stderr
    workers = [w for comp in json.loads(st.stdout)["components"].values() for w in comp["workers"]]
    assert sorted(w["rank"] for w in workers) == [0, 1, 2]
    assert all(w["state"] == "ready" for w in workers)
    table = tdist(["status"], env)
    for name in ("encoder.0", "decoder.0", "encoder_decoder.0"):
        assert name in table.stdout
    return [int(w["pid"]) for w in workers]


def wait_dead(pids: list[int], timeout_s: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(process_alive(p, None) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if process_alive(p, None)]


def test_sbatch_dry_run_prints_the_plan_script(env: dict[str, str], tmp_path: Path) -> None:
    graph = make_graph(tmp_path, "hw-sbatch-dry")
    run_dir = Path(env["TDIST_HOME"]) / "runs" / "hw-sbatch-dry"
    dry = tdist(["deploy", str(graph), "--launcher", "sbatch", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    shown = tdist(["plan", str(graph), "--launcher", "sbatch", "--format", "script", "--run-dir", str(run_dir)], env)
    assert dry.stdout == shown.stdout
    assert dry.stdout.startswith("#!/bin/bash") and "#SBATCH --ntasks=3" in dry.stdout
    assert not squeue(env)


@pytest.mark.parametrize("discovery", ["nats", "etcd"])
def test_hello_world_submitted_with_sbatch(env: dict[str, str], tmp_path: Path, discovery: str) -> None:
    if discovery == "etcd":
        pytest.importorskip("aetcd")
    graph = make_graph(tmp_path, "hw-sbatch", discovery)
    run_dir = Path(env["TDIST_HOME"]) / "runs" / "hw-sbatch"
    dep = tdist(["deploy", str(graph), "--launcher", "sbatch"], env)
    state_file = run_dir / "state.json"
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        state = RunRecord.load(state_file)
        assert state.launcher == "sbatch" and state.state == "ready" and state.slurm.job_id
        assert state.discovery == discovery
        if discovery == "etcd":  # the batch script's etcd on the batch host
            assert state.etcd.endpoints and state.etcd.endpoints[0].startswith("http://")
        assert f"submitted batch job {state.slurm.job_id}" in dep.stdout
        assert squeue(env) == [state.slurm.job_id]
        assert (run_dir / "job.sbatch").read_text().startswith("#!/bin/bash")
        rank_pids = check_running_deployment(env, run_dir)
    finally:
        stop = tdist(["stop"], env, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert squeue(env) == []
    assert RunRecord.load(state_file).state == "stopped"
    assert wait_dead(rank_pids) == []
    # Each rank's log, split from the job's labelled output, is in the run directory.
    for name in ("encoder.0", "decoder.0", "encoder_decoder.0"):
        text = (run_dir / "logs" / f"{name}.log").read_text()
        assert f"tdist worker ready: {name}" in text
        assert f"worker {name} stopped" in text  # drained, not killed
    assert (run_dir / "logs" / f"slurm-{state.slurm.job_id}.out").exists()
    after = tdist(["status"], env)
    assert after.returncode != 0


def test_hello_world_as_an_srun_step(env: dict[str, str], tmp_path: Path) -> None:
    graph = make_graph(tmp_path, "hw-srun")
    run_dir = Path(env["TDIST_HOME"]) / "runs" / "hw-srun"
    dep = tdist(["deploy", str(graph), "--launcher", "srun", "--detach"], env)
    state_file = run_dir / "state.json"
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        state = RunRecord.load(state_file)
        assert state.launcher == "srun" and state.state == "ready"
        assert len(squeue(env)) == 1  # srun outside an allocation made its own job
        rank_pids = check_running_deployment(env, run_dir)
    finally:
        stop = tdist(["stop"], env, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert squeue(env) == []
    assert wait_dead(rank_pids + [state.world.pid, state.supervisor.pid, state.nats.process.pid]) == []
    for name in ("encoder.0", "decoder.0", "encoder_decoder.0"):
        text = (run_dir / "logs" / f"{name}.log").read_text()
        assert f"worker {name} stopped" in text


def test_srun_inside_an_salloc_allocation(env: dict[str, str], tmp_path: Path) -> None:
    """The usual HPC flow: `salloc`, then `tdist deploy --launcher srun` uses that allocation."""
    graph = make_graph(tmp_path, "hw-alloc")
    script = tmp_path / "inside.sh"
    tdist_cmd = " ".join(TDIST)
    script.write_text(
        "set -e\n"
        f"{tdist_cmd} deploy {graph} --launcher srun --detach > {tmp_path}/deploy.out\n"
        "squeue -h -s -o %i > " + f"{tmp_path}/steps.out\n"
        f"{tdist_cmd} infer --component encoder_decoder --input 'input=[9,8]' > {tmp_path}/infer.out\n"
        f"{tdist_cmd} stop > {tmp_path}/stop.out\n"
        'echo "job=$SLURM_JOB_ID"\n'
    )
    res = subprocess.run(["salloc", "-n3", "bash", str(script)], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    job = res.stdout.split("job=")[1].split()[0]
    assert (tmp_path / "steps.out").read_text().split() == [f"{job}.0"]  # one step, in the allocation
    assert "output: [9, 8]" in (tmp_path / "infer.out").read_text()
    assert squeue(env) == []
    run_dir = Path(env["TDIST_HOME"]) / "runs" / "hw-alloc"
    assert RunRecord.load(run_dir / "state.json").slurm.job_id == job
    assert "worker encoder.0 stopped" in (run_dir / "logs" / "encoder.0.log").read_text()
