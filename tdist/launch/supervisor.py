"""`python -m tdist.launch.supervisor --run-dir DIR`: the supervisor of a deployment, detached or not.

Reads the run record (DIR/state.json: launcher, launch options) and the plan (DIR/plan.json),
builds the local supervisor (`--launcher local`) or the world supervisor (mpirun, srun), starts
everything, supervises until SIGTERM/SIGINT/SIGHUP (at any time, start-up included; a second one
kills at once), then tears everything down. Everything it starts dies with it (a parent-death
signal; workers also watch their parent): a detached supervisor is the one process meant to outlive
the CLI that started it. Its own log is
DIR/logs/supervisor.log; its progress is the run record. The foreground `tdist deploy` runs the
same supervisor in its own process (`serve_foreground`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from tdist.errors import TdistError
from tdist.launch.local import LocalSupervisor
from tdist.launch.rundir import RunRecord, load_plan
from tdist.launch.world import WorldSupervisor


def make_supervisor(record: RunRecord) -> LocalSupervisor:
    """The supervisor of the deployment `record` describes (its plan from record.plan_path)."""
    plan = load_plan(record)
    opts = record.options
    kw: dict[str, Any] = dict(
        deployment=record.deployment, workers=list(plan.workers), run_dir=Path(record.run_dir),
        nats_url=opts.nats_url or plan.nats.url, startup_timeout_s=opts.startup_timeout_s, restart=opts.restart,
        graph=record.graph, plan_path=record.plan_path, python=plan.python, record=record,
        restart_max_crashes=plan.restart_max_crashes, restart_window_s=plan.restart_window_s,
    )
    if record.launcher == "local":
        return LocalSupervisor(**kw)
    return WorldSupervisor(**kw, plan=plan, launcher=record.launcher)


#: Signals that stop a deployment, at any time, start-up included. SIGHUP: the terminal closed.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_on_signals(stop: asyncio.Event, sup: LocalSupervisor) -> None:
    """The first stop signal asks for an orderly stop (drain, in order); a second one (Ctrl-C
    twice) cuts the drains short: everything still running is killed at once."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            sup.hurry()
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)


async def _start_unless_stopped(sup: LocalSupervisor, stop: asyncio.Event,
                                progress: Callable[[int, int, str], None] | None = None) -> bool:
    """Start; a stop signal during start-up cancels it (the supervisor tears down what it started).

    Why: start-up can take minutes (an engine loading) and the stop signal must not wait for it.
    True when started, False when stopped first.
    """
    starting = asyncio.ensure_future(sup.start(progress))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if starting.done():
        starting.result()  # a failed start raises here
        return True
    starting.cancel()
    try:
        await starting
    except asyncio.CancelledError:
        pass
    return False


async def run_supervisor(sup: LocalSupervisor) -> int:
    """Start, supervise until SIGTERM/SIGINT/SIGHUP, tear down; the exit code of a detached supervisor."""
    stop = asyncio.Event()
    _stop_on_signals(stop, sup)
    try:
        if not await _start_unless_stopped(sup, stop):
            logging.getLogger("tdist.launch").warning("stopped during start-up")
            return 130
    except TdistError as exc:
        logging.getLogger("tdist.launch").error("start failed: %s", exc.render())
        return exc.exit_code
    await sup.supervise(stop)
    await sup.stop()
    # a world (mpirun/srun) that ended on its own is a failure even after a clean teardown
    return 0 if getattr(sup, "world_exit", None) is None else 1


async def serve_foreground(sup: LocalSupervisor, *, progress: Callable[[int, int, str], None] | None = None,
                           ready: Callable[[RunRecord], None] | None = None,
                           stopping: Callable[[], None] | None = None) -> RunRecord:
    """The foreground deploy: start (reporting progress), serve until Ctrl-C / SIGTERM / SIGHUP, tear down.

    A stop signal during start-up tears down what was started and raises KeyboardInterrupt (the
    CLI exits 130).
    """
    stop = asyncio.Event()
    _stop_on_signals(stop, sup)
    if not await _start_unless_stopped(sup, stop, progress):
        raise KeyboardInterrupt
    if ready is not None:
        ready(sup.state)
    await sup.supervise(stop)
    if stopping is not None:
        stopping()
    await sup.stop()
    return sup.state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tdist.launch.supervisor",
                                 description="Supervise a deployment (local, mpirun or srun) from its run directory.")
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sup = make_supervisor(RunRecord.load(Path(args.run_dir) / "state.json"))
    return asyncio.run(run_supervisor(sup))


if __name__ == "__main__":
    sys.exit(main())
