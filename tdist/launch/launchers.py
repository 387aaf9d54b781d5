"""The launchers: local, mpirun and srun (run by a tdist supervisor), sbatch (run by Slurm).

`launcher_for(plan, options)` picks the implementation for a new deployment; `open_launcher(record)`
rebuilds it from a run record, for `tdist status` and `tdist stop`.

Local, mpirun and srun deployments have a supervisor (launch/supervisor.py): in the foreground
it runs inside the deploying process until Ctrl-C; detached (`--detach`) it is its own process,
and `start` returns once the supervisor's run record says `ready`. Stop asks the supervisor
(SIGTERM: it drains the workers in order), then signals whatever it left behind — only processes
whose recorded identity (pid + start time) still matches, on this host.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from tdist.errors import LaunchError
from tdist.launch.base import LaunchEvents, Launcher
from tdist.launch.logs import tail_file
from tdist.launch.rundir import LaunchOptions, ProcessRecord, RunRecord, load_plan
from tdist.launch.sbatch import SbatchLauncher

if TYPE_CHECKING:
    from tdist.plan.model import Plan

SUPERVISOR_MODULE = "tdist.launch.supervisor"
#: Extra seconds a detached start waits beyond the startup timeout (the supervisor's own start-up).
DETACH_GRACE_S = 30.0


class SupervisedLauncher(Launcher):
    """Deployments a tdist supervisor runs: local workers, or a world beside NATS."""

    def _start(self, record: RunRecord, events: LaunchEvents) -> RunRecord:
        label = self.plan.deployment + ("" if self.kind == "local" else f" ({self.kind}, {self.plan.world_size} ranks)")
        events.phase(f"starting {label}")
        if self.options.detach:
            record = self._start_detached(record, events)
            events.ready(record)
            return record
        from tdist.launch.supervisor import make_supervisor, serve_foreground

        sup = make_supervisor(record)
        try:
            final = asyncio.run(serve_foreground(
                sup, progress=events.progress, ready=events.ready,
                stopping=lambda: events.phase(f"stopping {self.plan.deployment}")))
        except KeyboardInterrupt:
            events.done(f"stopped {self.plan.deployment} (interrupted during start-up)")
            raise
        events.done(f"stopped {self.plan.deployment}")
        return final

    def _start_detached(self, record: RunRecord, events: LaunchEvents) -> RunRecord:
        """Run the supervisor as its own process; return once its run record says `ready`.

        A supervisor that exits, or a record that says `failed`, is a LaunchError with its log tail.
        The supervisor is meant to outlive this CLI once ready; until then Ctrl-C, SIGTERM or SIGHUP
        of the CLI stops it (and with it everything it started), and the CLI exits 130.
        """
        sup_log = record.log_dir / "supervisor.log"
        with open(sup_log, "ab") as logf:
            # no parent-death signal: a detached supervisor outlives the CLI by design
            proc = subprocess.Popen(
                [sys.executable, "-m", SUPERVISOR_MODULE, "--run-dir", record.run_dir],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            )
        previous = ({sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
                    if threading.current_thread() is threading.main_thread() else {})
        try:
            return self._wait_detached(record, proc, sup_log, events)
        except KeyboardInterrupt:
            events.phase(f"interrupted: stopping {record.deployment}")
            _stop_supervisor(proc)
            events.done(f"stopped {record.deployment} (interrupted during start-up)")
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _wait_detached(self, record: RunRecord, proc: "subprocess.Popen[bytes]", sup_log: "os.PathLike[str]",
                       events: LaunchEvents) -> RunRecord:
        total = len(record.workers)
        deadline = time.monotonic() + self.options.startup_timeout_s + DETACH_GRACE_S
        while True:
            current = record.reload()
            if current.state in ("ready", "degraded"):
                return current
            if current.state == "failed":
                raise LaunchError(f"deployment {record.deployment} failed to start: {current.error}")
            if proc.poll() is not None:
                raise LaunchError(f"supervisor exited with code {proc.returncode}" + (f": {current.error}" if current.error else ""),
                                  log_tail=tail_file(sup_log), log_path=str(sup_log))
            if time.monotonic() > deadline:
                proc.terminate()
                raise LaunchError(f"deployment {record.deployment} not ready in time", log_tail=tail_file(sup_log),
                                  log_path=str(sup_log))
            events.progress(sum(1 for w in current.workers.values() if w.state == "ready"), total,
                            ", ".join(n for n, w in current.workers.items() if w.state != "ready"))
            time.sleep(0.1)

    def stop(self, *, timeout_s: float = 60.0, events: LaunchEvents | None = None) -> list[str]:
        """Ask the supervisor to stop (it drains in order); then end whatever it left behind."""
        assert self.record is not None
        events = events or LaunchEvents()
        events.phase(f"stopping {self.record.deployment}" + ("" if self.kind == "local" else f": ending the {self.kind} world"))
        rec = self.record
        forced: list[str] = []
        note = rec.health_note()
        if note:
            events.note(note)
        sup = rec.supervisor
        if sup is not None and sup.alive() and sup.pid != os.getpid():
            os.kill(sup.pid, signal.SIGTERM)
            if not _wait_gone(sup, timeout_s):
                sup.signal_group(signal.SIGKILL)
                forced.append("supervisor")
        rec = rec.reload()  # what the supervisor recorded last
        # Whatever the supervisor could not clean up (it crashed, or was killed): end it here, each
        # process only while its recorded identity still matches (a recycled pid is a stranger).
        left = {name: w.process for name, w in rec.workers.items() if w.process is not None and w.process.alive()}
        for proc in left.values():
            proc.signal_group(signal.SIGTERM)  # a drain, bounded below
        deadline = time.monotonic() + min(timeout_s, 10.0)
        while any(p.alive() for p in left.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name, proc in left.items():
            proc.signal_group(signal.SIGKILL)
            forced.append(name)
        for label, proc in (("nats-server", rec.nats.process if rec.nats.embedded else None),
                            ("etcd", rec.etcd.process), (self.kind, rec.world)):
            if proc is not None and proc.signal_group(signal.SIGTERM):
                if not _wait_gone(proc, 10):
                    proc.signal_group(signal.SIGKILL)
                forced.append(label)
        rec.state = "stopped"
        for w in rec.workers.values():
            if w.state != "failed":
                w.state = "stopped"
        rec.save()
        self.record = rec
        events.done(f"stopped {rec.deployment}" + (f" (killed: {', '.join(forced)})" if forced else ""))
        return forced


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_supervisor(proc: "subprocess.Popen[bytes]", timeout_s: float = 60.0) -> None:
    """SIGTERM a supervisor we started (it tears down in order); SIGKILL it after timeout_s or on
    a second Ctrl-C (what it started then dies with it: parent-death signal)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait(10)


def _wait_gone(proc: ProcessRecord, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not proc.alive()


class LocalLauncher(SupervisedLauncher):
    kind = "local"


class MpirunLauncher(SupervisedLauncher):
    kind = "mpirun"


class SrunLauncher(SupervisedLauncher):
    kind = "srun"


LAUNCHERS: dict[str, type[Launcher]] = {
    "local": LocalLauncher, "mpirun": MpirunLauncher, "srun": SrunLauncher, "sbatch": SbatchLauncher,
}


def launcher_for(plan: "Plan", options: LaunchOptions) -> Launcher:
    """The launcher the plan was made for (plan.launcher)."""
    return LAUNCHERS[plan.launcher](plan, options)


def open_launcher(record: RunRecord) -> Launcher:
    """The launcher of a recorded deployment, to ask its status, its logs, or to stop it."""
    return LAUNCHERS[record.launcher](load_plan(record), record.options, record)
