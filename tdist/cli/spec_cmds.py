"""`tdist validate` and `tdist plan`: check graphs and show exactly what `deploy` would start."""

from __future__ import annotations

import json
import os
import shlex
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tdist.errors import SpecError, SpecErrors, TdistError


class LauncherChoice(str, Enum):
    local = "local"
    mpirun = "mpirun"
    srun = "srun"
    sbatch = "sbatch"


class FormatChoice(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"
    script = "script"


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def validate(
    graphs: list[Path] = typer.Argument(..., metavar="GRAPH...", help="Graph YAML files to check."),
) -> None:
    """Check graph YAMLs: schema, references, GPUs, ports. Exit 0 when all are valid, 2 otherwise.

    Every problem names the file, line, YAML path, what was found and how to fix it.
    """
    from tdist.plan import build_plan
    from tdist.spec import load_graph

    out, err = _out(), _err()
    failed: list[TdistError] = []
    for path in graphs:
        try:
            spec = load_graph(path)
            plan = build_plan(spec)
        except TdistError as exc:
            failed.append(exc)
            continue
        services = len(plan.service_workers)
        out.print(f"[green]ok[/] {escape(str(path))}: {len(spec.operators)} operators, {len(plan.workers)} processes "
                  f"(world {plan.world_size}" + (f" + {services} service" if services else "") + ")")
    if not failed:
        return
    if len(failed) == 1:
        raise failed[0]
    errors: list[SpecError] = []
    for exc in failed:
        if isinstance(exc, SpecErrors):
            errors.extend(exc.errors)
        elif isinstance(exc, SpecError):
            errors.append(exc)
        else:
            err.print("[bold red]error:[/] " + escape(exc.render()))
    if errors:
        raise SpecErrors(errors)
    raise typer.Exit(2)


def compact_cpu_list(ids: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2,5" (the form taskset and VLLM_CPU_OMP_THREADS_BIND take)."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive cores
    for c in sorted(set(ids)):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _table(plan, plan_path: str) -> None:  # noqa: ANN001
    from tdist.plan import emit_mpirun, emit_srun

    out = _out()
    rp = "embedded nats-server (started by the launcher)" if plan.nats.embedded else plan.nats.url
    disc = plan.discovery if plan.etcd is None else f"etcd {'embedded' if plan.etcd.embedded else plan.etcd.endpoints}"
    out.print(f"[bold]{escape(plan.deployment)}[/] · launcher {plan.launcher} · world {plan.world_size} rank(s) "
              f"on {plan.srun.nodes} node(s) · {len(plan.service_workers)} service worker(s)")
    out.print(f"request plane: {escape(rp)} · discovery: {escape(disc)} · data plane: {plan.data_plane.kind} "
              f"(inline ≤ {plan.data_plane.inline_threshold_bytes} B)")
    table = Table(title_justify="left", show_lines=False)
    cpus_col = any(w.cpu_ids for w in plan.workers)  # the plan binds CPU engines (cluster.cpus_per_node)
    for col in ("rank", "worker", "operators", "node", "GPUs") + (("CPUs",) if cpus_col else ()) + ("metrics", "log"):
        table.add_column(col, overflow="fold")
    for i, w in enumerate(plan.workers):
        ops = ", ".join(f"{o.name} ({o.kind}{'' if o.role == 'both' else ' ' + o.role})" for o in w.operators)
        node = w.host or (str(w.node_index) if w.node_index is not None else "-")
        gpus = ",".join(map(str, w.gpu_ids)) or "-"
        if w.gpu_fraction is not None and w.gpu_ids:
            gpus += f" @{w.gpu_fraction:g}"
        rank = str(w.rank) if w.rank is not None else f"svc {i}"
        metrics = "auto" if w.metrics_port == 0 else str(w.metrics_port)
        cpus = (compact_cpu_list(w.cpu_ids) or "-",) if cpus_col else ()
        table.add_row(rank, escape(w.name), escape(ops), escape(node), gpus, *cpus, metrics,
                      escape(os.path.relpath(w.log_path, plan.run_dir) if w.log_path else "-"))
    out.print(table)
    if plan.launcher == "mpirun":
        out.print("[bold]command:[/] " + escape(shlex.join(emit_mpirun(plan, plan_path))))
    elif plan.launcher == "srun":
        out.print("[bold]command:[/] " + escape(shlex.join(emit_srun(plan, plan_path))))
    elif plan.launcher == "sbatch":
        out.print("(sbatch script: --format script)")


def plan(
    graph: Path = typer.Argument(..., metavar="GRAPH", help="Graph YAML to plan."),
    launcher: LauncherChoice = typer.Option(LauncherChoice.local, "--launcher", "-l",
                                            help="How the graph would start: local processes, mpirun, srun, or an sbatch job."),
    fmt: FormatChoice = typer.Option(FormatChoice.table, "--format", "-f",
                                     help="table: workers at a glance · json/yaml: the full plan (what workers read) · "
                                          "script: the exact command (srun/sbatch: a complete sbatch script)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (logs, plan.json); default: where deploy puts it, $TDIST_HOME/runs/<name>."),
    plan_path: Optional[str] = typer.Option(None, "--plan-path", help="Where plan.json will be (default <run dir>/plan.json)."),
) -> None:
    """Show what `deploy` would start for GRAPH: every worker (rank, GPUs, ports, logs) and the launch command.

    Pure: starts nothing, opens no socket. Example: tdist plan graphs/llm_disagg.yaml --launcher srun --format script
    """
    from tdist.plan import build_plan, emit_sbatch
    from tdist.plan.emit import emit_script
    from tdist.spec import load_graph

    from tdist.launch.rundir import run_dir_for

    spec = load_graph(graph)
    # the same run directory `tdist deploy` uses, so the printed paths are the ones deploy runs
    p = build_plan(spec, launcher=launcher.value, run_dir=str(run_dir or run_dir_for(spec.name)))
    path = plan_path or os.path.join(p.run_dir, "plan.json")
    out = _out()
    if fmt is FormatChoice.json:
        print(p.model_dump_json(indent=2))
    elif fmt is FormatChoice.yaml:
        import yaml

        print(yaml.safe_dump(json.loads(p.model_dump_json()), sort_keys=False), end="")
    elif fmt is FormatChoice.script:
        # srun: the sbatch script that runs the same step (a batch job is how srun is kept on a cluster)
        print(emit_sbatch(p, path) if p.launcher == "srun" else emit_script(p, path), end="")
    else:
        _table(p, path)
    del out


def register(app: typer.Typer) -> None:
    """Add `validate` and `plan` to the root app."""
    app.command("validate")(validate)
    app.command("plan")(plan)
