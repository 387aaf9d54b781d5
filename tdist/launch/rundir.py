"""Run directories: where a deployment records what `status`, `infer` and `stop` need.

`$TDIST_HOME/runs/<deployment>/` (TDIST_HOME defaults to ~/.tdist) holds state.json (NATS URL,
pids, state, log dir), plan.json (every worker runs `--plan plan.json --rank N`) and logs/. The supervisor is its only
writer; writes are atomic (temp file + rename) so readers never see half a file.

A run directory is always a direct child of `runs/`: the deployment name passes the name rule
(`tdist.names`) before it becomes a path, so `--name ../../x` is refused, never followed. A
re-deploy never deletes: the previous run of that name (logs, recorded pids) is moved aside to
`runs/.previous/<name>/<time>/`, keeping the newest `KEEP_PREVIOUS_RUNS`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tdist.errors import DeploymentNotFound, InvalidName, LaunchError
from tdist.names import NAME_RULE, is_valid_name, suggest_name

#: How many earlier runs of one deployment name `prepare_run_dir` keeps under runs/.previous/.
KEEP_PREVIOUS_RUNS = 3


def tdist_home() -> Path:
    return Path(os.environ.get("TDIST_HOME") or Path.home() / ".tdist")


def runs_root() -> Path:
    return tdist_home() / "runs"


def check_deployment_name(name: str, where: str = "--name") -> str:
    """`name` if it passes the name rule, else InvalidName (exit 2) with a valid suggestion."""
    if not is_valid_name(name):
        raise InvalidName(where, name, NAME_RULE, f"use a plain name, e.g. {where} {suggest_name(str(name))}")
    return name


def run_dir_for(deployment: str, where: str = "--name") -> Path:
    """`$TDIST_HOME/runs/<deployment>`: a checked name, so always a direct child of runs/."""
    return runs_root() / check_deployment_name(deployment, where)


def prepare_run_dir(deployment: str) -> tuple[Path, Path | None]:
    """A fresh, empty run directory for `deployment`; returns (run_dir, where the previous run went).

    Refuses (LaunchError) when the name's run is still alive, or when `runs/<name>` is not a plain
    directory (a symlink or a file: something tdist did not make). Never deletes a run directory:
    an earlier run is renamed to `runs/.previous/<name>/<UTC time>/` and only the oldest of those
    beyond `KEEP_PREVIOUS_RUNS` are removed, all inside `runs/.previous/<name>/`.
    """
    run_dir = run_dir_for(deployment)
    if any(r.deployment == deployment for r in live_runs()):
        raise LaunchError(
            f"deployment {deployment!r} is already running; stop it first (tdist stop --name {deployment}) or pass --name"
        )
    moved: Path | None = None
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise LaunchError(f"{run_dir} is not a run directory tdist made (a symlink or a file); remove it or pass --name")
    if run_dir.exists():
        previous = runs_root() / ".previous" / deployment
        previous.mkdir(parents=True, exist_ok=True)
        now_ns = time.time_ns()  # names sort by time: pruning removes the oldest
        moved = previous / (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_ns / 1e9)) + f".{now_ns % 10**9:09d}Z")
        if moved.exists():
            raise LaunchError(f"{moved} exists already; is another tdist deploying {deployment!r} right now?")
        os.replace(run_dir, moved)
        _prune_previous(previous)
    (run_dir / "logs").mkdir(parents=True)
    return run_dir, moved


def _prune_previous(previous: Path) -> None:
    import shutil

    kept = sorted((p for p in previous.iterdir() if p.is_dir() and not p.is_symlink()), key=lambda p: p.name)
    for old in kept[:-KEEP_PREVIOUS_RUNS]:
        shutil.rmtree(old)


@dataclass
class WorkerRecord:
    name: str
    component: str
    pid: int | None = None
    log: str | None = None
    restarts: int = 0
    last_exit: int | None = None
    state: str = "starting"  # starting | running | restarting | stopped | failed


@dataclass
class RunState:
    deployment: str
    run_dir: str
    launcher: str = "local"
    graph: str | None = None
    state: str = "starting"  # starting | ready | stopping | stopped | failed
    error: str | None = None
    nats_url: str | None = None
    nats_pid: int | None = None
    nats_embedded: bool = False
    etcd_endpoints: list[str] = field(default_factory=list)
    etcd_pid: int | None = None
    discovery: str = "nats"
    supervisor_pid: int | None = None
    components: list[str] = field(default_factory=list)
    operators: dict[str, list[str]] = field(default_factory=dict)  # component -> operators
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    log_dir: str | None = None
    job_id: str | None = None  # sbatch job / mpirun pid, for other launchers
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / "state.json"

    def save(self) -> None:
        self.updated_at = time.time()
        data = asdict(self)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RunState":
        data = json.loads(Path(path).read_text())
        workers = {k: WorkerRecord(**v) for k, v in data.pop("workers", {}).items()}
        return cls(**data, workers=workers)

    def supervisor_alive(self) -> bool:
        return pid_alive(self.supervisor_pid)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); look at its state where /proc exists.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def kill_group(pid: int | None, sig: int = signal.SIGTERM) -> None:
    """Signal a process group led by pid (every launched process leads its own)."""
    if not pid:
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone; never fall back to a bare pid that may have been reused


def live_runs() -> list[RunState]:
    """Deployments whose supervisor (or recorded job) is still alive."""
    out = []
    root = runs_root()
    if not root.is_dir():
        return out
    for state_file in sorted(root.glob("*/state.json")):
        try:
            st = RunState.load(state_file)
        except (OSError, ValueError, TypeError):
            continue
        if st.state in ("stopped",):
            continue
        if st.supervisor_alive() or (st.launcher in ("sbatch",) and st.job_id and st.state != "failed"):
            out.append(st)
    return out


def find_run(name: str | None = None) -> RunState:
    """The deployment to act on: the named one, or the only one running."""
    if name:
        path = run_dir_for(name) / "state.json"  # a checked name: never a path outside runs/
        if not path.exists():
            known = [r.deployment for r in live_runs()]
            raise DeploymentNotFound(
                f"no deployment named {name!r} under {runs_root()}"
                + (f"; running: {', '.join(known)}" if known else "; start one with: tdist deploy GRAPH --detach")
            )
        return RunState.load(path)
    runs = live_runs()
    if not runs:
        raise DeploymentNotFound(f"no running deployment under {runs_root()}; start one with: tdist deploy GRAPH --detach")
    if len(runs) > 1:
        raise DeploymentNotFound(
            "several deployments are running: " + ", ".join(r.deployment for r in runs) + "; pick one with --name"
        )
    return runs[0]
