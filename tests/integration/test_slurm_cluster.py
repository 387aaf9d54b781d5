"""The real single-node Slurm cluster that scripts/cluster.sh brings up: idle node, srun, sbatch,
mpi4py under `srun --mpi=pmix`, idempotent up, clean down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "cluster.sh"

needs_slurm = pytest.mark.skipif(
    not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged") and shutil.which("srun")),
    reason="Slurm/munge not installed (scripts/setup.d/10-mpi-slurm.sh installs them)",
)
pytestmark = [needs_slurm, pytest.mark.skipif(os.geteuid() != 0, reason="slurmd needs root")]

MPI_HELLO = textwrap.dedent(
    """
    from mpi4py import MPI
    c = MPI.COMM_WORLD
    print(f"hello {c.Get_rank()}/{c.Get_size()}", flush=True)
    """
)


def cluster(cmd: str, state_dir: Path, timeout_s: float = 90) -> subprocess.CompletedProcess:
    env = dict(os.environ, TDIST_SLURM_DIR=str(state_dir))
    return subprocess.run(["bash", str(CLUSTER), cmd], env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A fresh cluster in its own state dir (never one a session left running); torn down after."""
    state = tmp_path_factory.mktemp("slurm")
    up = cluster("up", state)
    if up.returncode != 0:
        cluster("down", state)
        pytest.fail(f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    yield {"dir": state, "env": env, "up": up}
    down = cluster("down", state)
    assert down.returncode == 0, down.stderr


def run(argv, env, timeout_s=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s, **kw)


def test_up_prints_env_and_node_is_idle(slurm) -> None:
    assert f"export SLURM_CONF={slurm['dir']}/slurm.conf" in slurm["up"].stdout
    out = run(["sinfo", "-h", "-N", "-o", "%N %T"], slurm["env"])
    assert out.returncode == 0, out.stderr
    node, state = out.stdout.split()
    assert node == os.uname().nodename.split(".")[0]
    assert state == "idle"


def test_up_again_reuses_the_running_cluster(slurm) -> None:
    pid_before = (slurm["dir"] / "slurmctld.pid").read_text()
    again = cluster("up", slurm["dir"])
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stderr
    assert (slurm["dir"] / "slurmctld.pid").read_text() == pid_before
    st = cluster("status", slurm["dir"])
    assert st.returncode == 0 and "idle" in st.stdout


def test_srun_two_tasks(slurm) -> None:
    out = run(["srun", "-N1", "-n2", "hostname"], slurm["env"])
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 2


def test_mpi4py_under_srun_pmix(slurm, tmp_path) -> None:
    pytest.importorskip("mpi4py")
    script = tmp_path / "hello.py"
    script.write_text(MPI_HELLO)
    out = run(["srun", "--mpi=pmix", "-n2", sys.executable, str(script)], slurm["env"], timeout_s=120)
    assert out.returncode == 0, out.stderr
    assert sorted(line for line in out.stdout.splitlines() if line) == ["hello 0/2", "hello 1/2"]


def test_sbatch_job_runs_and_leaves_queue(slurm, tmp_path) -> None:
    pytest.importorskip("mpi4py")
    script = tmp_path / "hello.py"
    script.write_text(MPI_HELLO)
    out_file = tmp_path / "job.out"
    job = tmp_path / "job.sh"
    job.write_text(
        f"#!/bin/bash\n#SBATCH -n 2\n#SBATCH -o {out_file}\n"
        f"srun --mpi=pmix {sys.executable} {script}\n"
    )
    sub = run(["sbatch", "--parsable", str(job)], slurm["env"])
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    assert job_id.isdigit()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        q = run(["squeue", "-h", "-j", job_id], slurm["env"])
        if not q.stdout.strip():
            break
        time.sleep(0.2)
    assert not run(["squeue", "-h"], slurm["env"]).stdout.strip()
    assert sorted(ln for ln in out_file.read_text().splitlines() if ln.startswith("hello")) == ["hello 0/2", "hello 1/2"]


def test_down_stops_daemons_and_status_says_not_up(tmp_path_factory) -> None:
    state = tmp_path_factory.mktemp("slurm-down")
    assert cluster("up", state).returncode == 0
    pids = [int((state / f"{d}.pid").read_text()) for d in ("munged", "slurmctld", "slurmd")]
    down = cluster("down", state)
    assert down.returncode == 0, down.stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not state.exists()
    assert cluster("status", state).returncode == 1
    assert cluster("down", state).returncode == 0  # idempotent
