"""Plan → the exact launch commands: mpirun argv, srun argv, a complete sbatch script.

Pure text/argv builders, golden-tested. Every rank runs
`python -m tdist.runtime.worker --plan PLAN_JSON` and takes `workers[rank]` (rank from
OMPI_COMM_WORLD_RANK / PMIX_RANK / SLURM_PROCID). Service workers (routers, frontends: the
workers after the world) run with an explicit `--rank <index>` beside the request plane.
NATS_SERVER / ETCD_ENDPOINTS are set by whoever starts the embedded servers (the local launcher,
or the sbatch script itself) and forwarded to the ranks.
"""

from __future__ import annotations

import os
import shlex

from tdist.errors import PlanError
from tdist.plan.model import Plan

WORKER_MODULE = "tdist.runtime.worker"


def worker_command(python: str, plan_path: str, rank: int | None = None) -> list[str]:
    """The one command form of a worker: `python -m tdist.runtime.worker --plan PLAN [--rank N]`.

    Every launcher starts exactly this (a world's ranks without `--rank`: they take it from
    OMPI_COMM_WORLD_RANK / SLURM_PROCID), so what `tdist plan` prints is what runs.
    """
    argv = [python, "-m", WORKER_MODULE, "--plan", plan_path]
    return argv + ["--rank", str(rank)] if rank is not None else argv


def worker_argv(plan: Plan, plan_path: str, *, rank: int | None = None, python: str | None = None) -> list[str]:
    """The command one worker of `plan` runs; `rank` pins it (service workers, local launches)."""
    return worker_command(python or plan.python, plan_path, rank)


def forwarded_env_names(plan: Plan, extra: list[str]) -> list[str]:
    """Variables the ranks inherit from the launching environment."""
    names: list[str] = []
    if plan.nats.embedded:
        names.append("NATS_SERVER")
    if plan.etcd_embedded:
        names.append("ETCD_ENDPOINTS")
    return list(dict.fromkeys(names + list(extra)))


def emit_local(plan: Plan, plan_path: str, *, python: str | None = None) -> list[list[str]]:
    """One argv per worker, every worker pinned by `--rank` (what the local launcher starts)."""
    return [worker_argv(plan, plan_path, rank=i, python=python) for i in range(len(plan.workers))]


def emit_mpirun(plan: Plan, plan_path: str, *, as_root: bool | None = None, python: str | None = None) -> list[str]:
    """mpirun argv starting the world (workers[0:world_size]).

    `--allow-run-as-root` follows launch.mpirun.allow_run_as_root, else `as_root`, else whether
    this process runs as root.
    """
    mp = plan.mpirun
    root = mp.allow_run_as_root
    if root is None:
        root = as_root if as_root is not None else (hasattr(os, "geteuid") and os.geteuid() == 0)
    argv = ["mpirun"]
    if root:
        argv.append("--allow-run-as-root")
    if mp.oversubscribe:
        argv.append("--oversubscribe")
    argv += ["-np", str(plan.world_size)]
    per_node = plan.srun.ranks_per_node
    if plan.nodes > 1 and all(plan.hosts[: len(per_node)]):
        argv += ["--host", ",".join(f"{h}:{n}" for h, n in zip(plan.hosts, per_node) if n)]
    argv += ["--bind-to", "none"]
    for name in forwarded_env_names(plan, mp.env_names):
        argv += ["-x", name]
    for key, value in plan.env.items():
        argv += ["-x", f"{key}={value}"]
    return argv + list(mp.extra_args) + worker_argv(plan, plan_path, python=python)


def _container_flags(plan: Plan) -> list[str]:
    s = plan.srun
    flags = []
    if s.container_image:
        flags.append(f"--container-image={s.container_image}")
    if s.container_mounts:
        flags.append(f"--container-mounts={','.join(s.container_mounts)}")
    return flags


def _export_flag(plan: Plan) -> str:
    parts = ["ALL"] + forwarded_env_names(plan, plan.srun.env_names)
    for key, value in plan.env.items():
        if "," in value:
            raise PlanError(f"env {key}={value!r}: srun --export cannot carry a comma in a value",
                            )
        parts.append(f"{key}={value}")
    return "--export=" + ",".join(parts)


def _check_even(plan: Plan) -> None:
    s = plan.srun
    if any(n != s.ntasks_per_node for n in s.ranks_per_node[:-1]) or (s.ranks_per_node and s.ranks_per_node[-1] > s.ntasks_per_node):
        raise PlanError(
            f"the plan puts {s.ranks_per_node} ranks on its nodes, which srun's block distribution "
            f"(--ntasks-per-node={s.ntasks_per_node}) cannot reproduce; balance the layout or use --launcher mpirun"
        )


def emit_srun(plan: Plan, plan_path: str, *, python: str | None = None) -> list[str]:
    """srun argv starting the world as one Slurm step (`--mpi=pmix`, block distribution)."""
    _check_even(plan)
    s = plan.srun
    argv = ["srun", f"--mpi={s.mpi}", f"--nodes={s.nodes}", f"--ntasks={s.ntasks}",
            f"--ntasks-per-node={s.ntasks_per_node}", "--distribution=block", "--kill-on-bad-exit=1"]
    if s.nodelist:
        argv.append(f"--nodelist={','.join(s.nodelist)}")
    for flag, value in (("--partition", s.partition), ("--account", s.account), ("--time", s.time_limit)):
        if value:
            argv.append(f"{flag}={value}")
    argv.append(f"--job-name={s.job_name}")
    argv.append(_export_flag(plan))
    return argv + _container_flags(plan) + list(s.extra_args) + worker_argv(plan, plan_path, python=python)


_WAIT_PORT = """\
wait_port() {  # readiness: poll a TCP port until it accepts, bounded by $3 seconds
  local host=$1 port=$2 deadline=$((SECONDS + $3))
  until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
    if (( SECONDS >= deadline )); then echo "tdist: $host:$port not ready after $3 s" >&2; exit 1; fi
    sleep 0.2
  done
}"""


#: The embedded nats-server, kept up by the script that owns it: restarted with backoff on the same
#: port and store directory (clients reconnect to the URL they know; JetStream recovers its store).
#: If another process took the port meanwhile, the job says so and ends (its clients know no other).
_SUPERVISE_NATS = """\
supervise_nats() {  # supervise_nats PORT STORE LOG: run nats-server, restart it with backoff
  local port=$1 store=$2 log=$3 backoff=1 child=""
  trap 'kill "$child" 2>/dev/null; exit 0' TERM
  while true; do
    "${STEP[@]}" nats-server -js -a 0.0.0.0 -p "$port" -sd "$store" >> "$log" 2>&1 &
    child=$!
    wait "$child" || true
    if tail -n 20 "$log" | grep -qi "address already in use"; then
      echo "tdist: nats-server cannot restart: port $port was taken; stopping the deployment" >&2
      kill -TERM $$; exit 1
    fi
    echo "tdist: nats-server exited; restarting in $backoff s" >> "$log"
    sleep "$backoff"; backoff=$(( backoff < 30 ? backoff * 2 : 30 ))
  done
}"""


def emit_sbatch(plan: Plan, plan_path: str, *, python: str | None = None, nats_url: str | None = None,
                etcd_endpoints: str | None = None) -> str:
    """A complete sbatch script: #SBATCH lines, env, embedded servers, service workers, the world.

    An embedded request plane / etcd is started by the script on the batch host, unless
    `nats_url` / `etcd_endpoints` name servers the caller already runs.
    """
    s = plan.srun
    q = shlex.quote
    srun_line = emit_srun(plan, "$PLAN", python=python)
    lines = ["#!/bin/bash",
             f"# Generated by `tdist plan --launcher sbatch` for deployment {plan.deployment!r}"
             + (f" (graph {os.path.basename(plan.graph_file)})" if plan.graph_file else "") + ".",
             f"# World: {plan.world_size} ranks on {s.nodes} node(s); {len(plan.service_workers)} service worker(s) on the batch host.",
             f"#SBATCH --job-name={s.job_name}",
             f"#SBATCH --nodes={s.nodes}",
             f"#SBATCH --ntasks={s.ntasks}",
             f"#SBATCH --ntasks-per-node={s.ntasks_per_node}"]
    for flag, value in (("--partition", s.partition), ("--account", s.account), ("--time", s.time_limit)):
        if value:
            lines.append(f"#SBATCH {flag}={value}")
    if s.nodelist:
        lines.append(f"#SBATCH --nodelist={','.join(s.nodelist)}")
    lines += [f"#SBATCH --output={s.output}", "", "set -euo pipefail", "",
              f"PLAN={q(plan_path)}", f"mkdir -p {q(plan.log_dir)}"]
    for key, value in plan.env.items():
        lines.append(f"export {key}={q(value)}")
    step = ["srun", "--overlap", "--nodes=1", "--ntasks=1", '--nodelist="$HEAD_NODE"'] + [q(f) for f in _container_flags(plan)]
    lines += ['HEAD_NODE="${SLURMD_NODENAME:-$(hostname)}"',
              f"STEP=({' '.join(step)})  # one task on the batch host",
              "PIDS=()",
              'cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }',
              "trap cleanup EXIT", "", _WAIT_PORT]
    if plan.nats.embedded and nats_url:
        lines += ["", f"export NATS_SERVER={q(nats_url)}"]
    elif plan.nats.embedded:
        store = q(os.path.join(plan.run_dir, "nats"))
        log = q(os.path.join(plan.log_dir, "nats-server.log"))
        lines += ["", "# Request plane: an embedded nats-server (JetStream) on the batch host, restarted if it dies.",
                  _SUPERVISE_NATS,
                  f": > {log}",
                  f"supervise_nats {s.nats_port} {store} {log} &",
                  "PIDS+=($!)",
                  f'export NATS_SERVER="nats://${{HEAD_NODE}}:{s.nats_port}"',
                  f'wait_port "$HEAD_NODE" {s.nats_port} 30']
    if plan.etcd_embedded and etcd_endpoints:
        lines += ["", f"export ETCD_ENDPOINTS={q(etcd_endpoints)}"]
    elif plan.etcd_embedded:
        data = q(os.path.join(plan.run_dir, "etcd"))
        log = q(os.path.join(plan.log_dir, "etcd.log"))
        p = s.etcd_port
        lines += ["", "# Discovery: an embedded etcd on the batch host.",
                  f'"${{STEP[@]}}" etcd --name tdist --data-dir {data} --listen-client-urls http://0.0.0.0:{p} '
                  f'--advertise-client-urls "http://${{HEAD_NODE}}:{p}" --listen-peer-urls http://127.0.0.1:{p + 1} '
                  f"--initial-advertise-peer-urls http://127.0.0.1:{p + 1} --initial-cluster tdist=http://127.0.0.1:{p + 1} "
                  f"> {log} 2>&1 &",
                  "PIDS+=($!)",
                  f'export ETCD_ENDPOINTS="http://${{HEAD_NODE}}:{p}"',
                  f'wait_port "$HEAD_NODE" {p} 30']
    if plan.service_workers:
        lines += ["", "# Service workers (routers, frontends), pinned by --rank, beside the request plane."]
        for i, w in enumerate(plan.service_workers, start=plan.world_size):
            cmd = " ".join(q(a) if a != "$PLAN" else '"$PLAN"' for a in worker_argv(plan, "$PLAN", rank=i, python=python))
            log = q(w.log_path or os.path.join(plan.log_dir, f"{w.name}.log"))
            lines += [f'"${{STEP[@]}}" {cmd} > {log} 2>&1 &  # {w.name}', "PIDS+=($!)"]
    lines += ["", f"# The world: {plan.world_size} ranks; each takes workers[SLURM_PROCID] from the plan.",
              " ".join('"$PLAN"' if a == "$PLAN" else q(a) for a in srun_line), ""]
    return "\n".join(lines)


def emit_script(plan: Plan, plan_path: str, *, nats_url: str | None = None) -> str:
    """The text `tdist plan --format script` prints and `tdist deploy --dry-run` prints: what deploy runs.

    local: one line per worker, exactly the argv the local launcher starts (with its log);
    mpirun / srun: the one world command; sbatch: the complete batch script. One function, so
    the two commands cannot drift apart.
    """
    if plan.launcher == "local":
        lines = ["#!/bin/bash", "# What `tdist deploy` starts (it also supervises, restarts and tears down)."]
        for w, argv in zip(plan.workers, emit_local(plan, plan_path)):
            log = w.log_path or os.devnull
            lines.append(f"{shlex.join(argv)} > {shlex.quote(log)} 2>&1 &  # {w.name}")
        return "\n".join(lines) + "\n"
    if plan.launcher == "mpirun":
        return shlex.join(emit_mpirun(plan, plan_path)) + "\n"
    if plan.launcher == "srun":
        return shlex.join(emit_srun(plan, plan_path)) + "\n"
    return emit_sbatch(plan, plan_path, nats_url=nats_url)
