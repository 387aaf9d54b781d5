"""`--launcher mpirun`: the plan's world as ONE mpirun job.

Each rank runs `python -m tdist.runtime.worker --plan plan.json` and picks `workers[rank]` from
OMPI_COMM_WORLD_RANK (GPUs by local rank); the request-plane URL and etcd endpoints reach every
rank through `-x` (the argv comes from `tdist.plan.emit_mpirun`, so `--dry-run` and
`tdist plan --launcher mpirun` print exactly what runs here).

Why one detached mpirun process: `tdist deploy` returns once every rank is ready in discovery,
while the world keeps running; `tdist stop` (another process) finds mpirun's pid in the run
directory's `world.json` and sends it SIGTERM — mpirun forwards it to every rank on every node
(each rank is in its own process group, so signalling mpirun is the one handle on all of them).
Per-rank logs: mpirun's `--output-filename <run>/logs/ranks` writes `1/rank.N/{stdout,stderr}`;
`collect_rank_logs` flattens them to `<run>/logs/rank-N.log`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tdist.errors import LaunchError

WORLD_FILE = "world.json"


def find_mpirun() -> str:
    path = os.environ.get("TDIST_MPIRUN") or shutil.which("mpirun")
    if not path:
        raise LaunchError(
            "mpirun not found: install Open MPI (apt-get install openmpi-bin libopenmpi-dev; "
            "scripts/setup.d/10-mpi-slurm.sh does it) or set TDIST_MPIRUN"
        )
    return path


def mpirun_base_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment mpirun itself needs here: as root, Open MPI refuses to start unless told."""
    out = dict(os.environ if env is None else env)
    if os.geteuid() == 0:
        out.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        out.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return out


# ---------------------------------------------------------------- the record of a running world


@dataclass
class WorldRecord:
    """What `status`/`stop` need to find a world started by mpirun, srun or sbatch.

    Stored as `<run dir>/world.json`. `pid` is the launcher process (mpirun/srun) on this host;
    `job_id` the Slurm job (sbatch, or the allocation srun ran in).
    """

    launcher: str
    argv: list[str]
    run_dir: str
    log_path: str
    pid: int | None = None
    job_id: str | None = None
    host: str = field(default_factory=lambda: os.uname().nodename)
    started_at: float = field(default_factory=time.time)
    ranks: int = 0
    slurm_conf: str | None = None

    def save(self) -> Path:
        path = Path(self.run_dir) / WORLD_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> "WorldRecord | None":
        path = Path(run_dir) / WORLD_FILE
        if not path.exists():
            return None
        data: dict[str, Any] = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def pid_alive(pid: int | None) -> bool:
    """True for a live, non-zombie process."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def tail(path: str | os.PathLike[str], lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- start / stop


def start_world_process(
    argv: list[str],
    run_dir: str | os.PathLike[str],
    *,
    launcher: str,
    env: dict[str, str],
    log_name: str | None = None,
    ranks: int = 0,
) -> tuple[subprocess.Popen, WorldRecord]:
    """Start mpirun/srun detached (own session, output to `<run>/logs/<launcher>.log`), record it.

    The process outlives `tdist deploy`; nothing is read from its pipes.
    """
    run = Path(run_dir)
    (run / "logs").mkdir(parents=True, exist_ok=True)
    log_path = run / "logs" / (log_name or f"{launcher}.log")
    with open(log_path, "ab") as logf:
        try:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(run),
                start_new_session=True,
            )
        except OSError as e:
            raise LaunchError(f"cannot start {argv[0]}: {e}", log_path=str(log_path)) from e
    record = WorldRecord(
        launcher=launcher,
        argv=list(argv),
        run_dir=str(run),
        log_path=str(log_path),
        pid=proc.pid,
        ranks=ranks,
        slurm_conf=env.get("SLURM_CONF"),
    )
    record.save()
    return proc, record


def stop_pid(pid: int | None, *, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> bool:
    """Signal `pid` (mpirun/srun forward it to every rank), wait, SIGKILL its group after timeout_s.

    Returns True if the process is gone.
    """
    if not pid_alive(pid):
        return True
    assert pid is not None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    for _ in range(100):
        _reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_rank_pids(entries: dict[str, dict[str, Any]], *, timeout_s: float = 10.0) -> list[int]:
    """Fallback after the launcher is gone: TERM then KILL ranks on THIS host still in discovery.

    Returns the pids that were still alive (and were signalled).
    """
    me = os.uname().nodename
    pids = [
        int(e["pid"]) for e in entries.values()
        if e.get("pid") and str(e.get("host", "")).split(".")[0] == me.split(".")[0] and pid_alive(int(e["pid"]))
    ]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return pids


# ---------------------------------------------------------------- logs


def collect_rank_logs(run_dir: str | os.PathLike[str], ranks_dir: str = "logs/ranks") -> list[Path]:
    """Flatten Open MPI's `--output-filename` tree (`<dir>/1/rank.N/{stdout,stderr}`) into
    `<run>/logs/rank-N.log` (stdout then stderr). Idempotent; returns the files written."""
    run = Path(run_dir)
    base = run / ranks_dir
    written: list[Path] = []
    if not base.is_dir():
        return written
    for rank_dir in sorted(base.glob("*/rank.*"), key=lambda p: (p.parent.name, _rank_of(p))):
        rank = _rank_of(rank_dir)
        if rank < 0:
            continue
        parts = []
        for stream in ("stdout", "stderr"):
            f = rank_dir / stream
            if f.exists():
                parts.append(f.read_text(errors="replace"))
        out = run / "logs" / f"rank-{rank}.log"
        out.write_text("".join(parts))
        written.append(out)
    return written


def _rank_of(path: Path) -> int:
    try:
        return int(path.name.split(".", 1)[1])
    except (IndexError, ValueError):
        return -1


def rank_log_tail(run_dir: str | os.PathLike[str], rank: int, lines: int = 20) -> str:
    """Last lines of one rank's output (mpirun tree or srun's rank-N.log)."""
    run = Path(run_dir)
    candidates = sorted(run.glob(f"logs/ranks/*/rank.{rank}/stderr")) + sorted(run.glob(f"logs/ranks/*/rank.{rank}/stdout"))
    candidates.append(run / "logs" / f"rank-{rank}.log")
    return "\n".join(t for t in (tail(c, lines) for c in candidates) if t)
