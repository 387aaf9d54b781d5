"""`tdist deploy --launcher mpirun|srun|sbatch` and `tdist stop` of such a deployment.

Called by tdist/cli/runtime_cmds.py (`deploy_world`, `stop_world`), never calling back into it
(what both show is in cli/deploy_view.py); the work is in
tdist/launch/world.py (world supervisor; `python -m tdist.launch.world` runs it) and tdist/launch/slurm.py (sbatch, squeue, scancel).
`--dry-run` prints exactly what `tdist plan GRAPH --launcher L --format script` prints for the
same run directory: the mpirun/srun argv, or the complete sbatch script.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from tdist.errors import LaunchError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def plan_path_of(plan: Any) -> str:
    return os.path.join(plan.run_dir, "plan.json")


def render_command(plan: Any, *, nats_url: Optional[str] = None) -> str:
    """The exact launch command (text) for the plan's launcher — what --dry-run prints."""
    from tdist.plan import emit_script

    return emit_script(plan, plan_path_of(plan), nats_url=nats_url)


def _prepare_run_dir(plan: Any, *, launch: dict[str, Any]) -> Path:
    from tdist.launch.rundir import prepare_run_dir

    run_dir, previous = prepare_run_dir(plan.deployment)
    if Path(plan.run_dir) != run_dir:
        raise LaunchError(f"plan's run directory {plan.run_dir} is not the deployment's {run_dir}")
    if previous is not None:
        err.print(f"[dim]previous run of {plan.deployment} kept in {previous}[/]")
    (run_dir / "plan.json").write_text(plan.model_dump_json(indent=2))
    (run_dir / "launch.json").write_text(json.dumps(launch))
    return run_dir


def deploy_world(
    plan: Any,
    *,
    graph: Path,
    detach: bool,
    dry_run: bool,
    nats_url: Optional[str],
    startup_timeout_s: float,
) -> None:
    """Deploy the plan as an mpirun/srun world (supervised) or an sbatch job."""
    url = nats_url or (None if plan.request_plane == "embedded" else plan.request_plane)
    if dry_run:
        print(render_command(plan, nats_url=url), end="")
        return
    launch = {
        "deployment": plan.deployment,
        "launcher": plan.launcher,
        "nats_url": url,
        "startup_timeout_s": startup_timeout_s,
        "restart": plan.restart_on_crash,
        "graph": str(Path(graph).resolve()),
    }
    run_dir = _prepare_run_dir(plan, launch=launch)
    if plan.launcher == "sbatch":
        _deploy_sbatch(plan, run_dir, nats_url=url, startup_timeout_s=startup_timeout_s)
    elif detach:
        _deploy_world_detached(plan, run_dir, startup_timeout_s)
    else:
        _deploy_world_foreground(plan, run_dir)


# ---- mpirun / srun ----------------------------------------------------------------------------


def _deploy_world_detached(plan: Any, run_dir: Path, startup_timeout_s: float) -> None:
    from tdist.cli.deploy_view import start_detached

    start_detached(run_dir, plan, "tdist.launch.world", startup_timeout_s,
                   label=f"{plan.deployment} ({plan.launcher}, {plan.world_size} ranks)")


def _deploy_world_foreground(plan: Any, run_dir: Path) -> None:
    from tdist.cli.deploy_view import run_foreground
    from tdist.launch.world import make_world_supervisor

    sup = make_world_supervisor(run_dir)
    sup.state.supervisor_pid = os.getpid()
    run_foreground(sup, plan.deployment, starting=f"starting {plan.deployment} ({plan.launcher})",
                   stopping="stopping: ending the world")


def _print_world(state: Any) -> None:
    from tdist.cli.deploy_view import print_deployed

    print_deployed(state)


# ---- sbatch -----------------------------------------------------------------------------------


def _deploy_sbatch(plan: Any, run_dir: Path, *, nats_url: Optional[str], startup_timeout_s: float) -> None:
    from tdist.launch import slurm
    from tdist.launch.rundir import RunState, WorkerRecord
    from tdist.plan import emit_sbatch
    from tdist.runtime.config import DiscoveryConfig

    path = plan_path_of(plan)
    script = emit_sbatch(plan, path, nats_url=nats_url)
    env = slurm.sbatch_env()
    components: list[str] = []
    operators: dict[str, list[str]] = {}
    for w in plan.workers:
        if w.component not in components:
            components.append(w.component)
        operators.setdefault(w.component, [o.name for o in w.operators])
    state = RunState(
        deployment=plan.deployment, run_dir=str(run_dir), launcher="sbatch", graph=None,
        components=components, operators=operators, log_dir=str(run_dir / "logs"), discovery=plan.discovery,
        workers={w.name: WorkerRecord(name=w.name, component=w.component, log=w.log_path) for w in plan.workers},
    )
    job_id = slurm.submit_sbatch(script, run_dir, env=env)
    state.job_id = job_id
    state.extra.update({"slurm_output": plan.srun.output.replace("%j", job_id),
                        "slurm_conf": env.get("SLURM_CONF"), "world_size": plan.world_size})
    state.save()
    out.print(f"submitted batch job {job_id}")
    try:
        with err.status(f"job {job_id}: waiting to run"):
            nodes = slurm.wait_job_running(job_id, env=env, timeout_s=startup_timeout_s,
                                           log_path=state.extra["slurm_output"])
        state.nats_url = nats_url or slurm.head_node_url(nodes, "nats", plan.srun.nats_port)
        if plan.discovery == "etcd":
            if plan.etcd_endpoints == "embedded":
                state.etcd_endpoints = [slurm.head_node_url(nodes, "http", plan.srun.etcd_port)]
            else:
                state.etcd_endpoints = list(plan.etcd_endpoints or []) or [
                    e for e in os.environ.get("ETCD_ENDPOINTS", "").split(",") if e]
        state.extra["nodes"] = nodes
        state.save()

        def check() -> None:
            if not slurm.job_active(job_id, env=env):
                raise LaunchError(f"Slurm job {job_id} ended during start",
                                  log_tail=_tail(state.extra["slurm_output"]), log_path=state.extra["slurm_output"])

        disc = DiscoveryConfig(kind=plan.discovery, etcd_endpoints=state.etcd_endpoints)  # type: ignore[arg-type]
        with err.status(f"job {job_id} on {', '.join(nodes)}: waiting for {len(plan.workers)} workers") as status:
            def progress(ready: int, total: int, waiting: str) -> None:
                status.update(f"job {job_id}: {ready}/{total} workers ready" + (f" (waiting: {waiting})" if waiting else ""))

            entries = asyncio.run(slurm.wait_ready_in_discovery(
                state.nats_url, plan.deployment, disc, set(state.workers), timeout_s=startup_timeout_s,
                check=check, progress=progress))
    except BaseException as exc:
        state.state = "failed"
        state.error = exc.render() if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
        state.save()
        try:
            slurm.cancel_job(job_id, env=env, timeout_s=30)
        except LaunchError:
            pass
        raise
    for name, e in entries.items():
        if name in state.workers and e.get("pid"):
            state.workers[name].pid = int(e["pid"])
            state.workers[name].state = "running"
    state.state = "ready"
    state.save()
    _print_world(state)
    out.print(f"run dir {run_dir}\n  tdist status · tdist infer --component NAME ... · tdist stop (scancel {job_id})")


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- stop -------------------------------------------------------------------------------------


def stop_world(state: Any, *, timeout_s: float = 60.0) -> list[str]:
    """End the world: TERM the world supervisor (it drains the ranks through mpirun/srun), or
    scancel the job and wait until squeue no longer lists it. Returns what had to be forced."""
    from tdist.launch.local import stop_run
    from tdist.launch.mpirun import stop_pid

    forced: list[str] = []
    if state.launcher == "sbatch":
        from tdist.launch import slurm
        from tdist.launch.rundir import RunState

        env = dict(os.environ)
        if state.extra.get("slurm_conf") and not env.get("SLURM_CONF"):
            env["SLURM_CONF"] = state.extra["slurm_conf"]
        with err.status(f"stopping {state.deployment}: scancel {state.job_id}"):
            if state.job_id and not slurm.cancel_job(str(state.job_id), env=env, timeout_s=timeout_s,
                                                     drain_s=min(30.0, timeout_s)):
                forced.append(f"job {state.job_id} still listed by squeue")
        output = state.extra.get("slurm_output")
        if output:
            from tdist.plan.model import Plan

            try:
                plan = Plan.model_validate_json((Path(state.run_dir) / "plan.json").read_text())
                slurm.split_rank_output(output, {i: w.log_path or str(Path(state.log_dir or ".") / f"{w.name}.log")
                                                 for i, w in enumerate(plan.world_workers)})
            except (OSError, ValueError):
                pass
        try:
            fresh = RunState.load(state.path)
        except (OSError, ValueError):
            fresh = state
        fresh.state = "stopped"
        fresh.save()
    else:
        with err.status(f"stopping {state.deployment}: ending the {state.launcher} world"):
            forced = stop_run(state, timeout_s=timeout_s)
            world_pid = state.extra.get("world_pid")
            if world_pid and not stop_pid(int(world_pid), timeout_s=10):
                forced.append(f"{state.launcher} pid {world_pid}")
    if forced:
        err.print(f"forced: {', '.join(forced)}")
    return forced
