"""Run directories, and the one record of a deployment: what `status`, `infer` and `stop` need.

`$TDIST_HOME/runs/<deployment>/` (TDIST_HOME defaults to ~/.tdist) holds plan.json (every worker
runs `--plan plan.json --rank N`), state.json (a `RunRecord`: the launch options, the deployment's
state, every process with its identity) and logs/. Both files are read and written only through
this module (`write_plan`, `load_plan`, `RunRecord.load` / `save`); writes are atomic (temp file +
rename) so readers never see half a file. Processes are recorded as pid + start time
(`tdist.runtime.process_identity`), so nothing signals a recycled pid.

A run directory is always a direct child of `runs/`: the deployment name passes the name rule
(`tdist.names`) before it becomes a path, so `--name ../../x` is refused, never followed. A
re-deploy never deletes: the previous run of that name (logs, recorded pids) is moved aside to
`runs/.previous/<name>/<time>/`, keeping the newest `KEEP_PREVIOUS_RUNS`.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from tdist.errors import DeploymentNotFound, InvalidName, LaunchError
from tdist.names import NAME_RULE, is_valid_name, suggest_name
from tdist.runtime.process_identity import process_alive, process_start

if TYPE_CHECKING:
    from tdist.plan.model import Plan
    from tdist.runtime.config import WorkerConfig

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


def alive_in_run(run_dir: Path) -> list[str]:
    """`name (pid N)` for every process the run in `run_dir` recorded that is still alive, judged by
    identity (pid + start time). Why: a crashed run's processes may still be serving (or holding
    ports, GPUs) after its directory was moved aside; a new deploy of the name says so."""
    try:
        rec = RunRecord.load(run_dir / "state.json")
    except (OSError, ValueError):
        return []
    procs = rec.processes()
    if rec.supervisor is not None:
        procs["supervisor"] = rec.supervisor
    return [f"{label} (pid {procs[label].pid})" for label in procs if procs[label].alive()]


def _prune_previous(previous: Path) -> None:
    import shutil

    kept = sorted((p for p in previous.iterdir() if p.is_dir() and not p.is_symlink()), key=lambda p: p.name)
    for old in kept[:-KEEP_PREVIOUS_RUNS]:
        shutil.rmtree(old)


#: The ARCHITECTURE's words; `status`, the web page and the metrics use them too.
DeploymentState = Literal["starting", "ready", "degraded", "failed", "stopping", "stopped"]
#: A worker's state as its launcher sees it (`stopped`: ended by a stop of the deployment).
WorkerState = Literal["starting", "ready", "draining", "restarting", "failed", "stale", "lost", "stopped"]
LauncherKind = Literal["local", "mpirun", "srun", "sbatch"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LaunchOptions(BaseModel):
    """How to launch a plan: what `tdist deploy` was told beyond the graph. Same for every launcher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detach: bool = Field(False, description="Return once ready; a detached supervisor (or the Slurm job) keeps it running")
    nats_url: str | None = Field(None, description="Use this NATS instead of the plan's request plane")
    startup_timeout_s: float = Field(120.0, gt=0, description="Seconds to wait until every worker is ready")
    restart: bool = Field(True, description="Restart a worker that dies (False: it stays failed, the deployment degraded)")

    @classmethod
    def for_plan(cls, plan: "Plan", *, detach: bool = False, nats_url: str | None = None,
                 startup_timeout_s: float | None = None, no_restart: bool = False) -> "LaunchOptions":
        """Options with the plan's defaults filled in (its startup timeout, its restart policy)."""
        return cls(detach=detach, nats_url=nats_url,
                   startup_timeout_s=plan.startup_timeout_s if startup_timeout_s is None else startup_timeout_s,
                   restart=plan.restart_on_crash and not no_restart)


class ProcessRecord(_Model):
    """One process, for good: pid + start time (a recycled pid has another), and its host."""

    pid: int
    start: int | None = Field(None, description="Clock ticks since boot (/proc/<pid>/stat field 22)")
    host: str = Field(default_factory=socket.gethostname, description="Where it runs; only local ones are signalled")

    @classmethod
    def of(cls, pid: int, host: str | None = None) -> "ProcessRecord":
        """The record of a process running now on this host (or of a rank on `host`)."""
        local = host is None or _same_host(host)
        return cls(pid=pid, start=process_start(pid) if local else None, host=host or socket.gethostname())

    @property
    def local(self) -> bool:
        return _same_host(self.host)

    def alive(self) -> bool:
        """Still the same process, on this host. A process on another host is never judged by a local pid."""
        return self.local and process_alive(self.pid, self.start)

    def signal_group(self, sig: int = signal.SIGTERM) -> bool:
        """Signal its process group (every launched process leads its own) if it is still itself."""
        if not self.alive():
            return False
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def _same_host(host: str) -> bool:
    me = socket.gethostname()
    return host.split(".")[0] in (me.split(".")[0], "localhost", "127.0.0.1")


class WorkerRecord(_Model):
    name: str
    component: str
    rank: int | None = Field(None, description="Index in plan.workers (what `--rank` names)")
    log: str | None = None
    process: ProcessRecord | None = None
    restarts: int = 0
    last_exit: int | None = None
    state: WorkerState = "starting"
    error: str | None = Field(None, description="Why the supervisor gave up on it (state `failed`)")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


class NatsRecord(_Model):
    url: str | None = None
    embedded: bool = False
    process: ProcessRecord | None = None
    #: the request plane's own state, as its supervisor sees it (embedded servers): up, restarting, down
    state: Literal["up", "restarting", "down"] | None = None
    restarts: int = 0


class EtcdRecord(_Model):
    endpoints: list[str] = Field(default_factory=list)
    process: ProcessRecord | None = None
    restarts: int = Field(0, description="Times the supervisor restarted the embedded etcd")
    last_exit: int | None = Field(None, description="Exit code of the embedded etcd when it last died")


class SlurmRecord(_Model):
    job_id: str | None = None
    output: str | None = Field(None, description="The job's labelled output file (sbatch --output)")
    conf: str | None = Field(None, description="SLURM_CONF the job was submitted with")
    nodes: list[str] = Field(default_factory=list)


def components_of(workers: list[WorkerConfig]) -> tuple[list[str], dict[str, list[str]]]:
    """Components in start order, and each component's operator names, as the run record keeps them."""
    components: list[str] = []
    operators: dict[str, list[str]] = {}
    for w in workers:
        if w.component not in components:
            components.append(w.component)
        operators.setdefault(w.component, [o.name for o in w.operators])
    return components, operators


class RunRecord(_Model):
    """Everything about one deployment that outlives the command that started it (state.json)."""

    deployment: str
    run_dir: str
    launcher: LauncherKind = "local"
    plan_path: str
    graph: str | None = None
    options: LaunchOptions = Field(default_factory=LaunchOptions)
    state: DeploymentState = "starting"
    error: str | None = None
    supervisor: ProcessRecord | None = None
    nats: NatsRecord = Field(default_factory=NatsRecord)
    etcd: EtcdRecord = Field(default_factory=EtcdRecord)
    discovery: Literal["nats", "etcd"] = "nats"
    components: list[str] = Field(default_factory=list)
    operators: dict[str, list[str]] = Field(default_factory=dict, description="component -> its operators")
    workers: dict[str, WorkerRecord] = Field(default_factory=dict)
    world: ProcessRecord | None = Field(None, description="The mpirun/srun process of a world")
    world_argv: list[str] = Field(default_factory=list)
    slurm: SlurmRecord = Field(default_factory=SlurmRecord)
    started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    @classmethod
    def for_plan(cls, plan: "Plan", options: LaunchOptions, *, graph: str | None = None) -> "RunRecord":
        """A fresh record of `plan`: components, operators and workers known, nothing started."""
        components, operators = components_of(plan.workers)
        return cls(
            deployment=plan.deployment, run_dir=plan.run_dir, launcher=plan.launcher,
            plan_path=str(Path(plan.run_dir) / "plan.json"), graph=graph, options=options,
            discovery=plan.discovery, components=components, operators=operators,
            workers={w.name: WorkerRecord(name=w.name, component=w.component, rank=i,
                                          log=w.log_path or str(Path(plan.log_dir) / f"{w.name}.log"))
                     for i, w in enumerate(plan.workers)},
        )

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / "state.json"

    @property
    def log_dir(self) -> Path:
        return Path(self.run_dir) / "logs"

    def save(self) -> None:
        self.updated_at = time.time()
        _write_atomic(self.path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RunRecord":
        return cls.model_validate_json(Path(path).read_text())

    def reload(self) -> "RunRecord":
        """The record as its writer last saved it (this one if it cannot be read)."""
        try:
            return RunRecord.load(self.path)
        except (OSError, ValueError):
            return self

    def supervisor_alive(self) -> bool:
        return self.supervisor is not None and self.supervisor.alive()

    def processes(self) -> dict[str, ProcessRecord]:
        """label → every process this record names (workers, embedded servers, the world), not the supervisor."""
        out = {name: w.process for name, w in self.workers.items() if w.process is not None}
        if self.nats.embedded and self.nats.process is not None:
            out["nats-server"] = self.nats.process
        if self.etcd.process is not None:
            out["etcd"] = self.etcd.process
        if self.world is not None:
            out[self.launcher] = self.world
        return out

    def alive_processes(self) -> list[str]:
        """Labels of the recorded processes still alive on this host, judged by identity (pid + start)."""
        return [label for label, proc in self.processes().items() if proc.alive()]

    @property
    def supervised(self) -> bool:
        """A tdist supervisor runs it (local, mpirun, srun); Slurm runs an sbatch deployment."""
        return self.launcher != "sbatch"

    def supervisor_died(self) -> bool:
        """The supervisor is gone but the record never reached an end (`stopped`, `failed`): it was
        killed, or crashed. Its processes may still be alive (see `alive_processes`)."""
        return (self.supervised and self.state not in ("stopped", "failed") and self.supervisor is not None
                and self.supervisor.local and not self.supervisor.alive())

    def health_note(self) -> str | None:
        """What `status` and `stop` say about a deployment whose supervisor died; None otherwise."""
        if not self.supervisor_died():
            return None
        assert self.supervisor is not None
        alive = self.alive_processes()
        if alive:
            return (f"supervisor pid {self.supervisor.pid} died; {len(alive)} of its processes still run unsupervised "
                    f"({', '.join(alive)}); `tdist stop --name {self.deployment}` ends them")
        return (f"supervisor pid {self.supervisor.pid} died and none of its processes is alive; "
                f"`tdist stop --name {self.deployment}` records it as stopped")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_plan(plan: "Plan") -> Path:
    """`<run dir>/plan.json`: what every worker reads its config from."""
    path = Path(plan.run_dir) / "plan.json"
    _write_atomic(path, plan.model_dump_json(indent=2))
    return path


def load_plan(record: RunRecord) -> "Plan":
    from tdist.plan.model import Plan

    return Plan.model_validate_json(Path(record.plan_path).read_text())


def live_runs() -> list[RunRecord]:
    """Deployments whose supervisor (or Slurm job) is still alive."""
    out: list[RunRecord] = []
    root = runs_root()
    if not root.is_dir():
        return out
    for state_file in sorted(root.glob("*/state.json")):
        try:
            rec = RunRecord.load(state_file)
        except (OSError, ValueError):
            continue
        if rec.state == "stopped":
            continue
        if rec.supervisor_alive() or (rec.launcher == "sbatch" and rec.slurm.job_id and rec.state != "failed"):
            out.append(rec)
    return out


def found_runs() -> list[RunRecord]:
    """Deployments `status` and `stop` find without --name: the running ones (`live_runs`), and
    those whose supervisor died without recording an end, whether or not its processes still run
    (by identity), and ended runs with recorded processes still alive. A deployment is never lost
    because its supervisor was killed."""
    out: list[RunRecord] = []
    root = runs_root()
    if not root.is_dir():
        return out
    live = {r.deployment for r in live_runs()}
    for state_file in sorted(root.glob("*/state.json")):
        try:
            rec = RunRecord.load(state_file)
        except (OSError, ValueError):
            continue
        if rec.deployment in live or rec.supervisor_died() or (rec.state != "stopped" and rec.alive_processes()):
            out.append(rec)
    return out


def find_run(name: str | None = None) -> RunRecord:
    """The deployment to act on: the named one, or the only one found (`found_runs`).

    Without a name, a deployment with something alive (its supervisor, or processes it left) wins
    over one whose processes are all gone; several of a kind need --name.
    """
    if name:
        path = run_dir_for(name) / "state.json"  # a checked name: never a path outside runs/
        if not path.exists():
            known = [r.deployment for r in live_runs()]
            raise DeploymentNotFound(
                f"no deployment named {name!r} under {runs_root()}"
                + (f"; running: {', '.join(known)}" if known else "; start one with: tdist deploy GRAPH --detach")
            )
        return RunRecord.load(path)
    found = found_runs()
    running = [r for r in found if r.supervisor_alive() or not r.supervised or r.alive_processes()]
    runs = running or found
    if not runs:
        raise DeploymentNotFound(f"no running deployment under {runs_root()}; start one with: tdist deploy GRAPH --detach")
    if len(runs) > 1:
        raise DeploymentNotFound(
            "several deployments are running: " + ", ".join(r.deployment for r in runs) + "; pick one with --name"
        )
    return runs[0]
