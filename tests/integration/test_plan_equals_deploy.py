"""`tdist plan` shows exactly what `tdist deploy` runs, for the local, mpirun and sbatch launchers.

Each test deploys hello world for real, then reads the argv of the LIVE processes from
/proc/<pid>/cmdline — every local worker; the mpirun process and each of its ranks; the world's
srun step and each rank the sbatch job started — and compares it with the text `tdist plan GRAPH
--launcher L --format script` prints for the same run directory (and `deploy --dry-run` prints the
same text). A launcher that starts anything else (another flag, `--config`, another path) fails.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from tdist.launch.rundir import RunRecord
from tests.integration.test_mpirun_deploy import env  # noqa: F401 - TDIST_HOME in tmp, no NATS_SERVER
from tests.integration.test_mpirun_deploy import make_graph, tdist
from tests.integration.test_slurm_deploy import make_graph as make_slurm_graph
from tests.integration.test_slurm_deploy import slurm_env  # noqa: F401 - the module's Slurm cluster

pytestmark = pytest.mark.timeout(300)


def cmdline(pid: int) -> list[str]:
    """The argv a live process runs, as the kernel has it."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert raw, f"pid {pid} has no cmdline (gone, or a zombie)"
    return [a.decode() for a in raw.split(b"\0")[:-1]]


def plan_script(graph: Path, launcher: str, env: dict[str, str]) -> str:
    shown = tdist(["plan", str(graph), "--launcher", launcher, "--format", "script"], env)
    assert shown.returncode == 0, shown.stderr
    dry = tdist(["deploy", str(graph), "--launcher", launcher, "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == shown.stdout  # --dry-run prints plan's text, nothing else
    return shown.stdout


def local_commands(script: str) -> dict[str, list[str]]:
    """`argv > log 2>&1 &  # worker` lines of plan's local script → {worker: argv}."""
    out = {}
    for line in script.splitlines():
        if not line or line.startswith("#"):
            continue
        body, _, name = line.rpartition("# ")
        words = shlex.split(body)
        out[name.strip()] = words[: words.index(">")]
    return out


def rank_argv(world_argv: list[str]) -> list[str]:
    """What each rank of a world runs: the program part of the mpirun/srun command."""
    return world_argv[world_argv.index("-m") - 1:]


def test_local_workers_run_what_plan_prints(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    graph = make_graph(tmp_path, "pe-local")
    expected = local_commands(plan_script(graph, "local", env))
    run_dir = Path(env["TDIST_HOME"]) / "runs" / "pe-local"
    assert set(expected) == {"encoder.0", "decoder.0", "encoder_decoder.0"}
    assert all(f"--plan {run_dir / 'plan.json'} --rank" in shlex.join(a) for a in expected.values())
    dep = tdist(["deploy", str(graph), "--detach"], env)
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        state = RunRecord.load(run_dir / "state.json")
        live = {name: cmdline(rec.pid) for name, rec in state.workers.items()}
    finally:
        stop = tdist(["stop"], env, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert live == expected


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed (scripts/setup.d/10-mpi-slurm.sh)")
def test_mpirun_and_its_ranks_run_what_plan_prints(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    graph = make_graph(tmp_path, "pe-mpi")
    script = plan_script(graph, "mpirun", env)
    expected = shlex.split(script)
    run_dir = Path(env["TDIST_HOME"]) / "runs" / "pe-mpi"
    dep = tdist(["deploy", str(graph), "--launcher", "mpirun", "--detach"], env)
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        state = RunRecord.load(run_dir / "state.json")
        world = cmdline(state.world.pid)
        ranks = {name: cmdline(rec.pid) for name, rec in state.workers.items()}
    finally:
        stop = tdist(["stop"], env, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert world == expected
    assert len(ranks) == 3
    assert all(argv == rank_argv(expected) for argv in ranks.values()), ranks


def test_sbatch_job_runs_what_plan_prints(slurm_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    e = dict(slurm_env, TDIST_HOME=str(tmp_path / "home"), COLUMNS="250")
    for k in ("NATS_SERVER", "ETCD_ENDPOINTS", "SLURM_JOB_ID", "SLURM_JOBID"):
        e.pop(k, None)
    graph = make_slurm_graph(tmp_path, "pe-sbatch")
    script = plan_script(graph, "sbatch", e)
    run_dir = Path(e["TDIST_HOME"]) / "runs" / "pe-sbatch"
    world_line = [ln for ln in script.splitlines() if ln.startswith("srun --mpi=")]
    assert len(world_line) == 1, script
    plan_path = str(run_dir / "plan.json")
    expected = [plan_path if w == "$PLAN" else w for w in shlex.split(world_line[0])]
    dep = tdist(["deploy", str(graph), "--launcher", "sbatch"], e)
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        state = RunRecord.load(run_dir / "state.json")
        assert (run_dir / "job.sbatch").read_text() == script  # the job is plan's script, byte for byte
        ranks = {name: cmdline(rec.pid) for name, rec in state.workers.items()}
        rank_paths = {name: environ(rec.pid).get("PATH", "") for name, rec in state.workers.items()}
        steps = [cmdline(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_world_step(p, "pe-sbatch")]
    finally:
        stop = tdist(["stop"], e, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    # the batch script's world step, as plan printed it (srun keeps a forked helper of itself: same argv)
    assert steps and all(argv == expected for argv in steps), steps
    assert len(ranks) == 3
    program = rank_argv(expected)
    for name, argv in ranks.items():
        # srun execs the program by its full path (it searches PATH itself): argv[0] is where the
        # job's PATH finds plan's `python`; the rest is plan's, word for word.
        assert argv[0] == shutil.which(program[0], path=rank_paths[name]), (name, argv)
        assert argv[1:] == program[1:], (name, argv)


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.decode(errors="replace").partition("=")[::2] for kv in raw.split(b"\0") if b"=" in kv)


def _is_world_step(proc: Path, job_name: str) -> bool:
    """An srun process starting the world of `job_name` (not the `srun --overlap` helper steps)."""
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"srun") and f"--job-name={job_name}".encode() in argv
