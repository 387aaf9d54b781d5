"""`python -m tdist.launch.supervisor --run-dir DIR`: the detached supervisor of `tdist deploy --detach`.

Reads DIR/plan.json (the plan as plain data) and DIR/launch.json (deployment name, NATS URL or
embedded, timeouts), runs the LocalSupervisor until SIGTERM/SIGINT, then tears everything down.
Its own log is DIR/logs/supervisor.log; its progress is state.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from tdist.errors import TdistError
from tdist.launch.local import LocalSupervisor
from tdist.runtime.config import WorkerConfig


def supervisor_from_run_dir(run_dir: Path) -> LocalSupervisor:
    plan = json.loads((run_dir / "plan.json").read_text())
    opts = json.loads((run_dir / "launch.json").read_text())
    workers = [WorkerConfig.model_validate(w) for w in plan["workers"]]
    return LocalSupervisor(
        deployment=opts["deployment"],
        workers=workers,
        run_dir=run_dir,
        nats_url=opts.get("nats_url"),
        startup_timeout_s=float(opts.get("startup_timeout_s", 120)),
        restart=bool(opts.get("restart", True)),
        graph=opts.get("graph"),
        extra_env=dict(opts.get("env", {})),
        plan_path=str(run_dir / "plan.json"),
        python=plan.get("python", "python"),
    )


async def run_supervisor(sup: LocalSupervisor) -> int:
    """Start, supervise until SIGTERM/SIGINT, tear down; the exit code of a detached supervisor."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sup.start()
    except TdistError as exc:
        logging.getLogger("tdist.launch").error("start failed: %s", exc.render())
        return exc.exit_code
    await sup.supervise(stop)
    await sup.stop()
    # a world (mpirun/srun) that ended on its own is a failure even after a clean teardown
    return 0 if getattr(sup, "world_exit", None) is None else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tdist.launch.supervisor")
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sup = supervisor_from_run_dir(Path(args.run_dir))
    return asyncio.run(run_supervisor(sup))


if __name__ == "__main__":
    sys.exit(main())
