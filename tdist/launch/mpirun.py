"""`--launcher mpirun` (and the srun step): the plan's world as ONE mpirun/srun process, supervised.

`python -m tdist.launch.mpirun --run-dir DIR` is the (detached) supervisor of a world deployment,
the counterpart of `tdist.launch.supervisor` for local ones: same run directory (plan.json,
launch.json in; state.json, logs/ out), same life cycle. It starts the embedded nats-server (and
etcd for `discovery: etcd` with embedded endpoints), the service workers (routers, frontends) as
local processes beside them, and the world as one process whose argv is exactly
`emit_mpirun`/`emit_srun` of the plan — so `--dry-run` and `tdist plan` show what runs. Each rank
runs `python -m tdist.runtime.worker --plan plan.json` and picks `workers[rank]` from
OMPI_COMM_WORLD_RANK / SLURM_PROCID; NATS_SERVER and ETCD_ENDPOINTS reach it through `-x` /
`--export`. Deploy returns when every worker is ready in discovery; a world that ends on its own
fails the deployment (an MPI world does not restart single ranks).

Per-rank logs without touching the argv: Open MPI tags each output line with its rank when
OMPI_MCA_orte_tag_output=1 (`[1,R]<stdout>:`), srun when SLURM_LABELIO=1 (`R: `); the supervisor
reads the world's output and writes rank R's lines to that worker's log_path
(`<run>/logs/<worker>.log`), and every line to `<run>/logs/<launcher>.log`.

Stop: ranks drain first (see `WorldSupervisor._drain_world`), then the world process, the service
workers, NATS and etcd.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdist.errors import LaunchError
from tdist.launch.local import LocalSupervisor, _Proc, tail_file
from tdist.launch.nats import start_nats
from tdist.launch.rundir import WorkerRecord

log = logging.getLogger("tdist.launch.world")

_OMPI_TAG = re.compile(r"^\[\d+,(\d+)\]<(?:stdout|stderr)>:(.*)$", re.S)
_OMPI_INNER_TAG = re.compile(r"\[\d+,\d+\]<(?:stdout|stderr)>:")
_OMPI_INNER_TAG_RANK = re.compile(r"\[\d+,(\d+)\]<(?:stdout|stderr)>:")
_SRUN_TAG = re.compile(r"^\s*(\d+): (.*)$", re.S)


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


def stop_pid(pid: int | None, *, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> bool:
    """Signal `pid`, wait, SIGKILL it (and its group) after timeout_s. True if it is gone."""
    if not pid_alive(pid):
        return True
    assert pid is not None
    _signal(pid, sig)
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


def parse_rank_line(line: str, launcher: str) -> tuple[int | None, str]:
    """`[1,2]<stdout>:text` (mpirun) or `2: text` (srun --label) → (2, "text"); untagged → (None, line)."""
    m = (_OMPI_TAG if launcher == "mpirun" else _SRUN_TAG).match(line)
    if not m:
        return None, line
    body = m.group(2)
    if launcher == "mpirun":
        # Open MPI tags chunks, not lines: a line's end can arrive as its own tagged chunk
        # ("text[1,2]<stdout>:\n"). Drop the inner tags.
        body = _OMPI_INNER_TAG.sub("", body)
    return int(m.group(1)), body



def split_rank_chunks(line: str, launcher: str) -> list[tuple[int | None, str]]:
    """One line of the world's output → (rank, text) pieces, in order.

    Open MPI tags chunks, not lines, so one physical line can carry several ranks' pieces:
    `[1,0]<stdout>:armed 0[1,1]<stdout>:armed 1[1,0]<stdout>:\n` → (0, "armed 0"), (1, "armed 1"),
    (0, "\n"). A piece without a newline continues that rank's line. srun labels whole lines.
    """
    if launcher != "mpirun":
        rank, text = parse_rank_line(line, launcher)
        return [(rank, text)]
    tags = list(_OMPI_INNER_TAG_RANK.finditer(line))
    if not tags or tags[0].start() != 0:
        return [(None, line)]
    pieces = []
    for i, m in enumerate(tags):
        end = tags[i + 1].start() if i + 1 < len(tags) else len(line)
        pieces.append((int(m.group(1)), line[m.end():end]))
    return pieces


def world_env(
    launcher: str,
    *,
    base: dict[str, str] | None = None,
    nats_url: str | None = None,
    etcd_endpoints: list[str] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment of the mpirun/srun process: what the emitted argv forwards to the ranks
    (NATS_SERVER, ETCD_ENDPOINTS via -x / --export), this interpreter's bin dir first on PATH
    (the argv says `python`), root permission for Open MPI, and rank-tagged output."""
    env = mpirun_base_env(base) if launcher == "mpirun" else dict(os.environ if base is None else base)
    env.update(extra or {})
    bindir = os.path.dirname(sys.executable)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if nats_url:
        env["NATS_SERVER"] = nats_url
    if etcd_endpoints:
        env["ETCD_ENDPOINTS"] = ",".join(etcd_endpoints)
    if launcher == "mpirun":
        env["OMPI_MCA_orte_tag_output"] = "1"
    else:
        env["SLURM_LABELIO"] = "1"
    return env


class RankLogDemux:
    """Reads the world's merged output; writes each rank's lines to its own log file."""

    def __init__(self, stream, launcher: str, launcher_log: Path, rank_logs: dict[int, str]) -> None:  # noqa: ANN001
        self.stream = stream
        self.launcher = launcher
        self.launcher_log = launcher_log
        self.rank_logs = rank_logs
        self._files: dict[int, Any] = {}
        self.thread = threading.Thread(target=self._run, name="rank-log-demux", daemon=True)

    def start(self) -> "RankLogDemux":
        self.thread.start()
        return self

    def _file(self, rank: int) -> Any:
        if rank not in self._files:
            path = self.rank_logs.get(rank) or str(self.launcher_log.parent / f"rank-{rank}.log")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._files[rank] = open(path, "a", buffering=1)
        return self._files[rank]

    def _run(self) -> None:
        pending: dict[int, str] = {}  # rank → text of a line not finished yet
        with open(self.launcher_log, "a", buffering=1) as all_out:
            for raw in iter(self.stream.readline, b""):
                line = raw.decode(errors="replace")
                all_out.write(line)
                for rank, text in split_rank_chunks(line, self.launcher):
                    if rank is None:
                        continue
                    text = pending.pop(rank, "") + text
                    head, sep, rest = text.rpartition("\n")
                    if sep:
                        self._file(rank).write(head + "\n")
                    if rest:
                        pending[rank] = rest
        for rank, rest in pending.items():
            self._file(rank).write(rest + "\n")
        for f in self._files.values():
            f.close()

    def join(self, timeout_s: float = 10.0) -> None:
        self.thread.join(timeout_s)



@dataclass
class WorldSupervisor(LocalSupervisor):
    plan: Any = None
    launcher: str = "mpirun"
    plan_path: str = ""
    world: subprocess.Popen | None = field(init=False, default=None)
    etcd: Any = field(init=False, default=None)
    demux: RankLogDemux | None = field(init=False, default=None)
    world_exit: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.state.launcher = self.launcher

    def world_argv(self) -> list[str]:
        from tdist.plan.emit import emit_mpirun, emit_srun

        if self.launcher == "mpirun":
            return emit_mpirun(self.plan, self.plan_path)
        return emit_srun(self.plan, self.plan_path)

    async def start(self, progress: Any = None) -> None:
        plan = self.plan
        try:
            host = os.environ.get("TDIST_BIND_HOST") or ("0.0.0.0" if plan.nodes > 1 else "127.0.0.1")
            advertise = os.uname().nodename if host == "0.0.0.0" else host
            if self.nats_url is None:
                self.nats = start_nats(work_dir=str(self.run_dir / "nats"), host=host)
                self.nats_url = f"nats://{advertise}:{self.nats.port}"
                self.state.nats_pid = self.nats.pid
                self.state.nats_embedded = True
            self.state.nats_url = self.nats_url
            from tdist.launch.etcd import ensure_etcd_for

            self.etcd, etcd_eps = ensure_etcd_for(self.workers, self.run_dir, host=host, advertise_host=advertise)
            if etcd_eps:
                self.state.etcd_endpoints = etcd_eps
                self.state.etcd_pid = self.etcd.process.pid if self.etcd else None
                os.environ["ETCD_ENDPOINTS"] = ",".join(etcd_eps)  # our own discovery client
                self.extra_env["ETCD_ENDPOINTS"] = ",".join(etcd_eps)  # service workers
            self.state.save()

            # The world: one mpirun/srun process, argv exactly as `tdist plan` shows it.
            argv = self.world_argv()
            if self.launcher == "mpirun":
                find_mpirun()
            else:
                from tdist.launch.slurm import find_slurm_command

                find_slurm_command("srun")
            env = world_env(self.launcher, nats_url=self.nats_url, etcd_endpoints=etcd_eps, extra=self.extra_env)
            launcher_log = self.run_dir / "logs" / f"{self.launcher}.log"
            self.world = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=env, cwd=str(self.run_dir), start_new_session=True,
            )
            rank_logs = {
                i: (w.log_path or str(self.run_dir / "logs" / f"{w.name}.log"))
                for i, w in enumerate(plan.world_workers)
            }
            self.demux = RankLogDemux(self.world.stdout, self.launcher, launcher_log, rank_logs).start()
            self.state.job_id = env.get("SLURM_JOB_ID") if self.launcher == "srun" else str(self.world.pid)
            self.state.extra.update({"world_pid": self.world.pid, "world_argv": argv, "launcher_log": str(launcher_log),
                                     "world_size": plan.world_size})
            for i, w in enumerate(plan.world_workers):
                self.state.workers[w.name] = WorkerRecord(name=w.name, component=w.component, pid=None,
                                                          log=rank_logs[i], state="running")
            if env.get("SLURM_CONF"):
                self.state.extra["slurm_conf"] = env["SLURM_CONF"]

            # Service workers (routers, frontends) as local processes beside NATS.
            for w in plan.service_workers:
                rec = WorkerRecord(name=w.name, component=w.component,
                                   log=w.log_path or str(self.run_dir / "logs" / f"{w.name}.log"))
                self.state.workers[w.name] = rec
                proc = _Proc(w, rec)
                self._procs.append(proc)
                self._spawn(proc)
            self.state.save()
            await self._wait_world_ready(progress)
        except BaseException as exc:
            self.state.state = "failed"
            self.state.error = exc.render() if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
            self.state.save()
            await self.stop(final_state="failed")
            raise
        self.state.state = "ready"
        self.state.save()

    def _world_failure(self) -> LaunchError | None:
        if self.world is None or self.world.poll() is None:
            return None
        if self.demux is not None:
            self.demux.join(2)
        launcher_log = self.run_dir / "logs" / f"{self.launcher}.log"
        return LaunchError(
            f"{self.launcher} exited with code {self.world.returncode}: the world ended",
            log_tail=tail_file(str(launcher_log), 20),
            log_path=str(launcher_log),
        )

    async def _wait_world_ready(self, progress: Any) -> None:
        from tdist.runtime.planes.request import RequestClient

        client = await RequestClient.connect(self.nats_url, self.deployment, discovery=self.workers[0].discovery)
        try:
            deadline = time.monotonic() + self.startup_timeout_s
            names = set(self.state.workers)
            while True:
                failure = self._world_failure()
                if failure is not None:
                    raise failure
                for p in self._procs:
                    if p.process is not None and p.process.poll() is not None:
                        raise LaunchError(f"worker {p.config.name} exited with code {p.process.returncode} during start",
                                          log_tail=tail_file(p.record.log), log_path=p.record.log)
                entries = await self._discovery_entries(client)
                failed = [n for n, e in entries.items() if e.get("state") == "failed" and n in names]
                if failed:
                    rec = self.state.workers[failed[0]]
                    raise LaunchError(f"worker {failed[0]} failed to start: {entries[failed[0]].get('error')}",
                                      log_tail=tail_file(rec.log), log_path=rec.log)
                ready = {n for n, e in entries.items() if e.get("state") == "ready" and n in names}
                for n in ready:
                    rec = self.state.workers[n]
                    if rec.pid is None and entries[n].get("pid"):
                        rec.pid = int(entries[n]["pid"])
                        self.state.extra.setdefault("rank_hosts", {})[n] = entries[n].get("host")
                if progress:
                    progress(len(ready), len(names), ", ".join(sorted(names - ready)))
                if ready == names:
                    return
                if time.monotonic() > deadline:
                    slow = sorted(names - ready)
                    rec = self.state.workers[slow[0]]
                    path = rec.log if tail_file(rec.log) else str(self.run_dir / "logs" / f"{self.launcher}.log")
                    raise LaunchError(f"not ready within {self.startup_timeout_s:g} s: {', '.join(slow)}",
                                      log_tail=tail_file(path), log_path=path)
                await asyncio.sleep(0.1)
        finally:
            await client.close()

    def _drain_world(self) -> None:
        """Let the ranks drain before the world is torn down.

        mpirun answers SIGTERM by killing the job (SIGTERM, then SIGKILL ~1 s later: no time
        to finish in-flight requests), so: if the worker drains on SIGUSR2 too
        (`tdist.runtime.worker.DRAIN_SIGNALS`), send SIGUSR2 to mpirun, which forwards it to
        every rank on every node; otherwise SIGTERM the ranks on this host directly. srun
        forwards SIGTERM to the step's tasks itself. Then wait (bounded) for the world to end.
        """
        world = self.world
        if world is None or world.poll() is not None:
            return
        if self.launcher != "mpirun":
            # SIGTERM to srun cancels the step (SIGKILL soon after); `scancel --signal=TERM`
            # on the step only delivers SIGTERM to its tasks, on every node.
            from tdist.launch.slurm import find_step, signal_step

            step = find_step(self.plan.srun.job_name, job_id=os.environ.get("SLURM_JOB_ID"))
            if step is None or not signal_step(step, "TERM"):
                _signal(world.pid, signal.SIGTERM)
        elif signal.SIGUSR2 in _worker_drain_signals():
            _signal(world.pid, signal.SIGUSR2)
        else:
            me = os.uname().nodename.split(".")[0]
            hosts = self.state.extra.get("rank_hosts", {})
            for w in self.plan.world_workers:
                rec = self.state.workers.get(w.name)
                if rec and rec.pid and str(hosts.get(w.name) or me).split(".")[0] == me:
                    _signal(rec.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout_s
        while world.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    async def supervise(self, stop: asyncio.Event) -> None:
        async def watch_world() -> None:
            while not stop.is_set():
                failure = self._world_failure()
                if failure is not None:
                    self.world_exit = self.world.returncode if self.world else None
                    self.state.error = failure.render()
                    self.state.save()
                    log.error("%s", self.state.error)
                    stop.set()
                    return
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch_world())
        try:
            await super().supervise(stop)
        finally:
            watcher.cancel()

    async def stop(self, final_state: str = "stopped") -> None:
        if self.state.state != "failed":
            self.state.state = "stopping"
            self.state.save()
        if self.world is not None:
            await asyncio.to_thread(self._drain_world)
            await asyncio.to_thread(stop_pid, self.world.pid, timeout_s=10)
            if self.world.poll() is None:
                self.world.wait(5)
            if self.demux is not None:
                self.demux.join(5)
        for rec in self.state.workers.values():
            if rec.name in {w.name for w in self.plan.world_workers}:
                rec.state = "stopped"
        if self.world_exit is not None and final_state == "stopped":
            final_state = "failed"
        await super().stop(final_state=final_state)
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None


def make_world_supervisor(run_dir: str | os.PathLike[str]) -> Any:
    """Build the supervisor of a world deployment from `<run>/plan.json` + `<run>/launch.json`."""
    from tdist.plan.model import Plan

    run = Path(run_dir)
    plan = Plan.model_validate_json((run / "plan.json").read_text())
    opts = json.loads((run / "launch.json").read_text())
    return WorldSupervisor(
        deployment=opts.get("deployment", plan.deployment),
        workers=list(plan.workers),
        run_dir=run,
        nats_url=opts.get("nats_url"),
        startup_timeout_s=float(opts.get("startup_timeout_s", plan.startup_timeout_s)),
        restart=bool(opts.get("restart", plan.restart_on_crash)),
        graph=opts.get("graph"),
        extra_env=dict(opts.get("env", {})),
        plan=plan,
        launcher=opts.get("launcher", plan.launcher),
        plan_path=str(run / "plan.json"),
    )


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _worker_drain_signals() -> tuple[int, ...]:
    try:
        from tdist.runtime import worker

        return tuple(getattr(worker, "DRAIN_SIGNALS", (signal.SIGTERM, signal.SIGINT)))
    except Exception:  # noqa: BLE001
        return (signal.SIGTERM, signal.SIGINT)


async def _run_world(sup: Any) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sup.start()
    except LaunchError as exc:
        log.error("start failed: %s", exc.render())
        return exc.exit_code
    await sup.supervise(stop)
    await sup.stop()
    return 0 if sup.world_exit is None else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tdist.launch.mpirun",
                                 description="Supervise a world deployment (mpirun or srun) from its run directory.")
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return asyncio.run(_run_world(make_world_supervisor(args.run_dir)))


if __name__ == "__main__":
    sys.exit(main())
