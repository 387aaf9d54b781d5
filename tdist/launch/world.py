"""The supervisor of a world deployment: the plan's world as ONE mpirun/srun process, beside NATS.

The counterpart of the local supervisor, run by `python -m tdist.launch.supervisor --run-dir DIR`
(or in the foreground deploy): same run directory (plan.json and the run record in; the record
and logs/ out), same life cycle. It starts the embedded nats-server (and
etcd for `discovery: etcd` with embedded endpoints), the service workers (routers, frontends) as
local processes beside them, and the world as one process whose argv is exactly
`emit_mpirun`/`emit_srun` of the plan — so `--dry-run` and `tdist plan` show what runs. Deploy
returns when every worker is ready in discovery; a world that ends on its own fails the
deployment (an MPI world does not restart single ranks).

Stop: ranks drain first (see `WorldSupervisor._drain_world`), then the world process, the service
workers, NATS and etcd. Kept apart from launch/mpirun.py (argv, environment, rank-tagged
output: pure or process-level helpers) so each stays readable on its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from tdist.errors import LaunchError
from tdist.launch.local import LocalSupervisor
from tdist.launch.logs import tail_file
from tdist.launch.mpirun import RankLogDemux, _signal, find_mpirun, stop_pid, world_env
from tdist.launch.rundir import ProcessRecord
from tdist.runtime.process_identity import owner_preexec

log = logging.getLogger("tdist.launch.world")


@dataclass
class WorldSupervisor(LocalSupervisor):
    plan: Any = None
    launcher: str = "mpirun"
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
            return emit_mpirun(self.plan, str(self.plan_path))
        return emit_srun(self.plan, str(self.plan_path))

    async def _start_processes(self, progress: Any = None) -> None:
        """NATS/etcd bound for the world's nodes, the world (one mpirun/srun), service workers beside it."""
        plan = self.plan
        host = os.environ.get("TDIST_BIND_HOST") or ("0.0.0.0" if plan.nodes > 1 else "127.0.0.1")
        advertise = os.uname().nodename if host == "0.0.0.0" else None
        self._start_nats(host=host, advertise=advertise)
        self._ensure_etcd(host=host, advertise_host=advertise or host)
        etcd_eps = list(self.state.etcd.endpoints)
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
            # bound to the supervisor: mpirun answers SIGTERM by ending the job, srun by cancelling the step
            preexec_fn=owner_preexec(signal.SIGTERM),
        )
        rank_logs = {
            i: (w.log_path or str(self.run_dir / "logs" / f"{w.name}.log"))
            for i, w in enumerate(plan.world_workers)
        }
        self.demux = RankLogDemux(self.world.stdout, self.launcher, launcher_log, rank_logs).start()
        self.state.world = ProcessRecord.of(self.world.pid)
        self.state.world_argv = argv
        if self.launcher == "srun":
            self.state.slurm.job_id = env.get("SLURM_JOB_ID")
            self.state.slurm.conf = env.get("SLURM_CONF")
        for i, w in enumerate(plan.world_workers):
            rec = self.state.workers[w.name]
            rec.rank, rec.log, rec.state = i, rank_logs[i], "starting"

        # Service workers (routers, frontends) as local processes beside NATS.
        for w in plan.service_workers:
            self._add_worker(w)
        self.state.save()
        names = set(self.state.workers)
        entries = await self._wait_ready(progress, names, check=self._check_world)
        for name in names:  # ranks: pid and host from their own discovery entry
            rec = self.state.workers[name]
            if rec.process is None and (entries.get(name) or {}).get("pid"):
                rec.process = ProcessRecord.of(int(entries[name]["pid"]), host=entries[name].get("host"))

    def _check_world(self) -> None:
        failure = self._world_failure()
        if failure is not None:
            raise failure
        self._check_workers()

    def _log_of(self, name: str) -> str | None:
        """A rank's own log, or the launcher's output while the rank has written nothing yet."""
        path = super()._log_of(name)
        return path if tail_file(path) else str(self.run_dir / "logs" / f"{self.launcher}.log")

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
            for w in self.plan.world_workers:
                rec = self.state.workers.get(w.name)
                if rec and rec.process and rec.process.alive():  # only ranks on this host, still themselves
                    _signal(rec.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout_s
        while world.poll() is None and time.monotonic() < deadline and not self.hurried:
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


def _worker_drain_signals() -> tuple[int, ...]:
    try:
        from tdist.runtime import worker

        return tuple(getattr(worker, "DRAIN_SIGNALS", (signal.SIGTERM, signal.SIGINT)))
    except Exception:  # noqa: BLE001
        return (signal.SIGTERM, signal.SIGINT)

