"""Open MPI on this machine: a 3-rank mpi4py world under mpirun (as root, oversubscribed),
per-rank logs via --output-filename, and SIGTERM to mpirun ending every rank."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed (scripts/setup.d/10-mpi-slurm.sh)")

from tdist.launch.mpirun import mpirun_base_env  # noqa: E402

HELLO = textwrap.dedent(
    """
    import os, sys, time
    from mpi4py import MPI
    c = MPI.COMM_WORLD
    print(f"rank {c.Get_rank()}/{c.Get_size()} local {os.environ.get('OMPI_COMM_WORLD_LOCAL_RANK')} pid {os.getpid()}", flush=True)
    if len(sys.argv) > 1:
        time.sleep(float(sys.argv[1]))
    """
)


def test_three_rank_world_with_per_rank_logs(tmp_path) -> None:
    pytest.importorskip("mpi4py")
    script = tmp_path / "hello.py"
    script.write_text(HELLO)
    out_dir = tmp_path / "ranks"
    proc = subprocess.run(
        ["mpirun", "-np", "3", "--oversubscribe", "--output-filename", str(out_dir), sys.executable, str(script)],
        env=mpirun_base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for r in range(3):
        text = (out_dir / "1" / f"rank.{r}" / "stdout").read_text()
        assert text.startswith(f"rank {r}/3 local {r} ")


def test_sigterm_to_mpirun_ends_every_rank(tmp_path) -> None:
    pytest.importorskip("mpi4py")
    script = tmp_path / "hello.py"
    script.write_text(HELLO)
    out_dir = tmp_path / "ranks"
    proc = subprocess.Popen(
        ["mpirun", "-np", "3", "--oversubscribe", "--output-filename", str(out_dir), sys.executable, str(script), "120"],
        env=mpirun_base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        pids: dict[int, int] = {}
        deadline = time.monotonic() + 60
        while len(pids) < 3 and time.monotonic() < deadline:
            for r in range(3):
                f = out_dir / "1" / f"rank.{r}" / "stdout"
                if r not in pids and f.exists() and " pid " in f.read_text():
                    pids[r] = int(f.read_text().split(" pid ")[1].split()[0])
            time.sleep(0.1)
        assert len(pids) == 3
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids.values() if _alive(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


SIGNALLED = textwrap.dedent(
    """
    import os, signal, sys, time
    got = []
    signal.signal(signal.SIGUSR2, lambda *a: got.append(1))
    rank = os.environ["OMPI_COMM_WORLD_RANK"]
    print(f"armed {rank}", flush=True)
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    print(f"rank {rank} drained on SIGUSR2" if got else f"rank {rank} timed out", flush=True)
    """
)


def test_mpirun_forwards_sigusr2_to_every_rank(tmp_path) -> None:
    """The graceful-drain path for remote ranks: SIGUSR2 to mpirun reaches every rank (SIGTERM
    would make mpirun kill the job ~1 s later), so a worker that drains on SIGUSR2 can finish."""
    script = tmp_path / "sig.py"
    script.write_text(SIGNALLED)
    env = dict(mpirun_base_env(), OMPI_MCA_orte_tag_output="1")
    proc = subprocess.Popen(
        ["mpirun", "-np", "3", "--oversubscribe", sys.executable, str(script)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        armed = 0
        lines = []
        while armed < 3:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            armed += line.count("armed")  # Open MPI may put several ranks' chunks on one line
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        from tdist.launch.mpirun import split_rank_chunks

        bodies = [b for ln in out.splitlines() for _, b in split_rank_chunks(ln, "mpirun") if "drained" in b.strip()]
        assert sorted(b.strip() for b in bodies) == [
            f"rank {r} drained on SIGUSR2" for r in range(3)
        ]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
