"""Slurm for `--launcher sbatch` (submit the plan's batch script) and the srun world step.

srun: one `srun --mpi=pmix ... python -m tdist.runtime.worker --plan plan.json` step whose tasks
pick `workers[SLURM_PROCID]`, run by the world supervisor (launch/world.py); outside an
allocation srun asks for one. To drain it, `scancel --signal=TERM <job>.<step>` (`find_step`,
`signal_step`): SIGTERM to srun itself would cancel the step and SIGKILL the tasks.
sbatch (the launcher is launch/sbatch.py): the script text comes from `tdist.plan.emit_sbatch`;
we write it to `<run>/job.sbatch`, submit it with `sbatch --parsable` and record the job id. `tdist stop` SIGTERMs the world step
(ranks drain, the script ends), then scancels if needed, and waits until `squeue` no longer lists
the job. Per-rank logs: the job inherits SLURM_LABELIO=1, so `slurm-<job>.out` has rank-labelled
lines that `split_rank_output` turns into `<run>/logs/<worker>.log`.

Every Slurm command gets the caller's environment (SLURM_CONF included: scripts/cluster.sh's
test cluster is found that way) and a timeout; a failure is a LaunchError with the command's
own output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tdist.errors import LaunchError
from tdist.launch.logs import tail_file

JOB_SCRIPT = "job.sbatch"
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT"}
)


def find_slurm_command(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise LaunchError(
            f"{name} not found: run on a Slurm login node (apt-get install slurm-client), or bring up the "
            "local test cluster with scripts/cluster.sh up"
        )
    return path


def _run(argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise LaunchError(f"{' '.join(argv)} did not answer within {timeout_s:.0f}s (is slurmctld up?)") from e


# ---------------------------------------------------------------- sbatch


def parse_job_id(sbatch_stdout: str) -> str:
    """`sbatch --parsable` prints `<id>` or `<id>;<cluster>`; plain sbatch `Submitted batch job <id>`."""
    text = sbatch_stdout.strip()
    if text.startswith("Submitted batch job"):
        text = text.split()[-1]
    job_id = text.splitlines()[-1].split(";")[0].strip() if text else ""
    if not job_id.isdigit():
        raise LaunchError(f"could not read a job id from sbatch's output: {sbatch_stdout!r}")
    return job_id


def submit_sbatch(
    script_text: str,
    run_dir: str | os.PathLike[str],
    *,
    env: dict[str, str] | None = None,
) -> str:
    """Write the plan's batch script to `<run>/job.sbatch`, submit it; returns the job id."""
    run = Path(run_dir)
    (run / "logs").mkdir(parents=True, exist_ok=True)
    script = run / JOB_SCRIPT
    script.write_text(script_text)
    script.chmod(0o755)
    env = dict(os.environ if env is None else env)
    res = _run([find_slurm_command("sbatch"), "--parsable", str(script)], env=env, timeout_s=60)
    if res.returncode != 0:
        raise LaunchError(
            f"sbatch rejected the job (exit {res.returncode})",
            log_tail=(res.stderr or res.stdout).strip(),
            log_path=str(script),
        )
    return parse_job_id(res.stdout)


def job_state(job_id: str, *, env: dict[str, str] | None = None) -> str | None:
    """The job's state from squeue (RUNNING, PENDING, ...), None once squeue no longer lists it."""
    res = _run([find_slurm_command("squeue"), "-h", "-j", str(job_id), "-o", "%T"], env=env)
    if res.returncode != 0:
        # squeue -j on a job that left the controller's memory: "Invalid job id specified".
        if "Invalid job id" in res.stderr:
            return None
        raise LaunchError(f"squeue failed (exit {res.returncode})", log_tail=res.stderr.strip())
    lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
    return lines[0] if lines else None


def job_steps(job_id: str, *, env: dict[str, str] | None = None) -> list[int]:
    """Numeric step ids of a running job, ascending (the batch step is left out)."""
    res = _run([find_slurm_command("squeue"), "-h", "-s", "-j", str(job_id), "-o", "%i"], env=env)
    steps = []
    for line in res.stdout.split():
        tail_ = line.rsplit(".", 1)[-1]
        if tail_.isdigit():
            steps.append(int(tail_))
    return sorted(steps)


def find_step(step_name: str, *, job_id: str | None = None, env: dict[str, str] | None = None) -> str | None:
    """`<job>.<step>` of this user's running step named `step_name` (srun --job-name), newest first."""
    argv = [find_slurm_command("squeue"), "-h", "-s", "-o", "%i|%j", "-u", str(os.getuid())]
    if job_id:
        argv += ["-j", str(job_id)]
    res = _run(argv, env=env)
    found = []
    for line in res.stdout.splitlines():
        sid, _, name = line.strip().partition("|")
        job, _, step = sid.partition(".")
        if name == step_name and job.isdigit() and step.isdigit():
            found.append((int(job), int(step)))
    if not found:
        return None
    job, step = max(found)
    return f"{job}.{step}"


def signal_step(step: str, sig: str = "TERM", *, env: dict[str, str] | None = None) -> bool:
    """Deliver a signal to every task of a job step without cancelling it."""
    res = _run([find_slurm_command("scancel"), f"--signal={sig}", step], env=env)
    return res.returncode == 0


def job_active(job_id: str | None, *, env: dict[str, str] | None = None) -> bool:
    return bool(job_id) and (job_state(str(job_id), env=env) or "") in ACTIVE_STATES


def job_nodes(job_id: str, *, env: dict[str, str] | None = None) -> list[str]:
    """Hostnames of the job's nodes (empty while pending)."""
    res = _run([find_slurm_command("squeue"), "-h", "-j", str(job_id), "-o", "%N"], env=env)
    nodelist = res.stdout.strip()
    if res.returncode != 0 or not nodelist or nodelist.startswith("("):
        return []
    exp = _run([find_slurm_command("scontrol"), "show", "hostnames", nodelist], env=env)
    return [h for h in exp.stdout.split() if h] if exp.returncode == 0 else [nodelist]


def cancel_job(
    job_id: str,
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    drain_s: float = 0.0,
) -> bool:
    """End the job and wait (bounded) until squeue no longer lists it. True when it is gone.

    With `drain_s > 0`, first only SIGTERM the job's steps (`scancel --signal=TERM`): the workers
    drain and exit 0, the world step ends, the batch script runs to its end. A plain scancel
    would end the batch shell at once and Slurm would SIGKILL the steps still draining.
    """
    scancel = find_slurm_command("scancel")

    def gone_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if job_state(job_id, env=env) is None:
                return True
            time.sleep(0.2)
        return job_state(job_id, env=env) is None

    if drain_s > 0 and job_state(job_id, env=env) is not None:
        # The world step first (the batch script starts it last): its workers drain while NATS and
        # the service workers still run; when it ends, the script ends and its trap stops the rest.
        steps = job_steps(job_id, env=env)
        target = f"{job_id}.{steps[-1]}" if steps else str(job_id)
        _run([scancel, "--signal=TERM", target], env=env)
        if gone_within(drain_s):
            return True
    res = _run([scancel, str(job_id)], env=env)
    if res.returncode != 0 and "Invalid job id" not in res.stderr and "already completing" not in res.stderr:
        raise LaunchError(f"scancel {job_id} failed (exit {res.returncode})", log_tail=res.stderr.strip())
    return gone_within(timeout_s)


def wait_job_running(job_id: str, *, env: dict[str, str] | None = None, timeout_s: float = 120.0, log_path: str | None = None) -> list[str]:
    """Wait until the job runs; returns its nodes. LaunchError if it ends or stays pending."""
    deadline = time.monotonic() + timeout_s
    state: str | None = "PENDING"
    while time.monotonic() < deadline:
        state = job_state(job_id, env=env)
        if state == "RUNNING":
            return job_nodes(job_id, env=env)
        if state is None or state not in ACTIVE_STATES:
            break
        time.sleep(0.2)
    reason = ""
    res = _run([find_slurm_command("squeue"), "-h", "-j", str(job_id), "-o", "%r"], env=env)
    if res.returncode == 0 and res.stdout.strip():
        reason = f" (reason: {res.stdout.strip()})"
    raise LaunchError(
        f"Slurm job {job_id} is {state or 'gone'} instead of RUNNING after {timeout_s:.0f}s{reason}",
        log_tail=tail_file(log_path) if log_path else None,
        log_path=log_path,
    )


def squeue_jobs(*, env: dict[str, str] | None = None) -> list[str]:
    """Ids of every job squeue lists (for `stop leaves an empty squeue`)."""
    res = _run([find_slurm_command("squeue"), "-h", "-o", "%i"], env=env)
    return [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]


# ---------------------------------------------------------------- sbatch deployments


def sbatch_env(base: dict[str, str] | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment sbatch submits with (the job inherits it, `--export=ALL`): this interpreter's
    bin dir first on PATH (the script runs `python`, `nats-server`, `etcd`), and SLURM_LABELIO=1
    so the world step tags each output line with its rank (split per worker by `split_rank_output`)."""
    import sys

    env = dict(os.environ if base is None else base)
    env.update(extra or {})
    bindirs = [os.path.dirname(sys.executable)]
    try:
        from tdist.launch.etcd import find_etcd_binary

        bindirs.append(os.path.dirname(find_etcd_binary()))
    except LaunchError:
        pass
    path = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(list(dict.fromkeys(bindirs + path)))
    env["SLURM_LABELIO"] = "1"
    return env


def split_rank_output(output_path: str | os.PathLike[str], rank_logs: dict[int, str]) -> list[str]:
    """Split a labelled (`R: text`) srun/sbatch output file into one log per rank. Idempotent
    (rewrites the rank files); returns the files written."""
    from tdist.launch.mpirun import parse_rank_line

    try:
        text = Path(output_path).read_text(errors="replace")
    except OSError:
        return []
    per_rank: dict[int, list[str]] = {}
    for line in text.splitlines():
        rank, body = parse_rank_line(line, "srun")
        if rank is not None and rank in rank_logs:
            per_rank.setdefault(rank, []).append(body)
    written = []
    for rank, lines in per_rank.items():
        path = Path(rank_logs[rank])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        written.append(str(path))
    return written


def head_node_url(nodes: list[str], scheme: str, port: int) -> str:
    """`nats://<first node>:<port>`: where the batch script starts its embedded servers."""
    if not nodes:
        raise LaunchError("the job has no nodes yet")
    return f"{scheme}://{nodes[0]}:{port}"
