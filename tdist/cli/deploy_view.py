"""What `deploy` shows while a deployment starts and once it is ready, for every launcher.

Shared by cli/runtime_cmds.py (local) and cli/multinode_cmds.py (mpirun, srun, sbatch), which
both import this module and not each other.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tdist.errors import LaunchError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def start_detached(run_dir: Path, plan: Any, module: str, startup_timeout_s: float, *, label: str) -> None:
    """Run `python -m MODULE --run-dir RUN_DIR` as a detached supervisor; return once it reports ready.

    Progress comes from the supervisor's state.json; a supervisor that dies or reports `failed`
    becomes a LaunchError with its log tail.
    """
    from tdist.launch.rundir import RunState

    sup_log = run_dir / "logs" / "supervisor.log"
    with open(sup_log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--run-dir", str(run_dir)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
        )
    total = len(plan.workers)
    deadline = time.monotonic() + startup_timeout_s + 30
    with err.status(f"starting {label}: 0/{total} workers ready") as status:
        while True:
            state = None
            try:
                state = RunState.load(run_dir / "state.json")
            except (OSError, ValueError, TypeError):
                pass
            if state is not None and state.state == "ready":
                break
            if state is not None and state.state == "failed":
                raise LaunchError(f"deployment {plan.deployment} failed to start: {state.error}")
            if proc.poll() is not None:
                raise LaunchError(
                    f"supervisor exited with code {proc.returncode}" + (f": {state.error}" if state and state.error else ""),
                    log_tail="\n".join(sup_log.read_text(errors="replace").splitlines()[-15:]), log_path=str(sup_log),
                )
            if time.monotonic() > deadline:
                proc.terminate()
                raise LaunchError(f"deployment {plan.deployment} not ready in time", log_path=str(run_dir / "logs"))
            if state is not None:
                running = sum(1 for w in state.workers.values() if w.state == "running")
                status.update(f"starting {label}: {running}/{total} workers started, waiting for ready")
            time.sleep(0.1)
    print_deployed(RunState.load(run_dir / "state.json"))
    out.print(f"detached (supervisor pid {proc.pid}); run dir {run_dir}\n  tdist status · tdist infer --component NAME ... · tdist stop")


def run_foreground(sup: Any, deployment: str, *, starting: str, stopping: str = "stopping: draining workers") -> None:
    """Start a supervisor (local or world) with progress, serve until Ctrl-C / SIGTERM, then tear down."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with err.status(starting) as status:
            def progress(ready: int, total: int, waiting: str) -> None:
                status.update(f"starting {deployment}: {ready}/{total} workers ready" + (f" (waiting: {waiting})" if waiting else ""))

            await sup.start(progress)
        print_deployed(sup.state)
        out.print("serving; Ctrl-C (or `tdist stop`) stops everything")
        await sup.supervise(stop)
        with err.status(stopping):
            await sup.stop()
        out.print(f"stopped {deployment}")

    asyncio.run(main())


def print_deployed(state: Any) -> None:
    """The table `deploy` prints once every worker is ready (any launcher)."""
    launcher = f" ({state.launcher})" if state.launcher != "local" else ""
    t = Table(title=f"deployment {state.deployment} ready{launcher}", title_justify="left")
    for col in ("component", "worker", "pid", "log"):
        t.add_column(col)
    for w in state.workers.values():
        t.add_row(w.component, w.name, str(w.pid), w.log or "")
    out.print(t)
    out.print(f"request plane: {state.nats_url}" + (" (embedded)" if state.nats_embedded else ""))
    if state.job_id:
        out.print(f"{'job' if state.launcher != 'mpirun' else 'mpirun pid'}: {state.job_id}")
