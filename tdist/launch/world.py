"""The supervisor of a world deployment: the plan's world as ONE mpirun/srun process, beside NATS.

The counterpart of `tdist.launch.supervisor` for local ones, run by `python -m
tdist.launch.world --run-dir DIR`: same run directory (plan.json,
launch.json in; state.json, logs/ out), same life cycle. It starts the embedded nats-server (and
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
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdist.errors import LaunchError
from tdist.launch.local import LocalSupervisor, tail_file
from tdist.launch.mpirun import RankLogDemux, _signal, find_mpirun, stop_pid, world_env
from tdist.launch.nats import start_nats
from tdist.launch.rundir import WorkerRecord

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
        advertise = os.uname().nodename if host == "0.0.0.0" else host
        if self.nats_url is None:
            self.nats = start_nats(work_dir=str(self.run_dir / "nats"), host=host)
            self.nats_url = f"nats://{advertise}:{self.nats.port}"
            self.state.nats_pid = self.nats.pid
            self.state.nats_embedded = True
        self.state.nats_url = self.nats_url
        self._ensure_etcd(host=host, advertise_host=advertise)
        etcd_eps = list(self.state.etcd_endpoints)
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
            self._add_worker(w)
        self.state.save()
        await self._wait_world_ready(progress)

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

        client = await RequestClient.connect(self.nats_url, self.deployment, discovery=self._discovery_config())
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
        python=plan.python,
    )


def _worker_drain_signals() -> tuple[int, ...]:
    try:
        from tdist.runtime import worker

        return tuple(getattr(worker, "DRAIN_SIGNALS", (signal.SIGTERM, signal.SIGINT)))
    except Exception:  # noqa: BLE001
        return (signal.SIGTERM, signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from tdist.launch.supervisor import run_supervisor

    ap = argparse.ArgumentParser(prog="python -m tdist.launch.world",
                                 description="Supervise a world deployment (mpirun or srun) from its run directory.")
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return asyncio.run(run_supervisor(make_world_supervisor(args.run_dir)))


if __name__ == "__main__":
    raise SystemExit(main())
