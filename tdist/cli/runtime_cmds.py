"""`tdist deploy | infer | status | stop`: commands that touch a running deployment."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from tdist.cli.deploy_view import status_table
from tdist.errors import BadRequest, LaunchError, TdistError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: A ready worker whose last heartbeat is older than this is shown as `stale` (default beat: 1 s).
STALE_AFTER_S = 3.5


# ---- deploy -----------------------------------------------------------------------------------


def _plan_graph(graph: Path, launcher: str, name: Optional[str]) -> Any:
    from tdist.plan import build_plan
    from tdist.spec import load_graph

    from tdist.launch.rundir import check_deployment_name, run_dir_for

    if name:
        check_deployment_name(name)  # before anything: a --name is a name, never a path
    spec = load_graph(graph)
    if name:
        spec = spec.model_copy(update={"name": name})
    return build_plan(spec, launcher=launcher, run_dir=str(run_dir_for(spec.name)))


def deploy(
    graph: Path = typer.Argument(..., exists=True, dir_okay=False, help="Graph YAML to deploy."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background; manage it with status/infer/stop."),
    launcher: str = typer.Option("local", "--launcher", help="local | mpirun | srun | sbatch"),
    name: Optional[str] = typer.Option(None, "--name", help="Deployment name (default: the graph's name)."),
    nats_url: Optional[str] = typer.Option(None, "--nats-url", envvar="NATS_SERVER", help="Use this NATS instead of the graph's request plane."),
    startup_timeout_s: Optional[float] = typer.Option(None, "--startup-timeout-s", help="Give up if workers are not ready by then (default: the graph's)."),
    no_restart: bool = typer.Option(False, "--no-restart", help="Do not restart crashed workers (any launcher)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run (exactly `tdist plan --format script`), start nothing."),
) -> None:
    """Deploy a graph: start NATS (embedded by default) and every worker, wait until all are ready."""
    from tdist.cli.deploy_view import CliEvents
    from tdist.launch.launchers import launcher_for
    from tdist.launch.rundir import LaunchOptions

    plan = _plan_graph(graph, launcher, name)
    options = LaunchOptions.for_plan(plan, detach=detach, nats_url=nats_url, startup_timeout_s=startup_timeout_s,
                                     no_restart=no_restart)
    chosen = launcher_for(plan, options)
    if dry_run:
        print(chosen.dry_run(), end="")
        return
    chosen.start(CliEvents(out, err), graph=str(graph.resolve()))


# ---- connecting to a deployment ----------------------------------------------------------------


async def _client_for(name: Optional[str], nats_url: Optional[str]) -> Any:
    from tdist.launch.rundir import check_deployment_name, find_run, load_plan
    from tdist.runtime.config import DiscoveryConfig
    from tdist.runtime.planes.request import RequestClient

    if nats_url:
        if not name:
            raise BadRequest("with --nats-url, name the deployment with --name")
        check_deployment_name(name)  # it becomes NATS subjects and stream names
        return await RequestClient.connect(nats_url, name)
    record = find_run(name)
    if not record.nats.url:
        raise LaunchError(f"deployment {record.deployment} has no NATS URL recorded yet (state: {record.state})")
    disc = DiscoveryConfig(kind=record.discovery, etcd_endpoints=record.etcd.endpoints)  # type: ignore[arg-type]
    try:  # the deployment's data-plane settings, so the CLI sends tensors as its workers expect
        data_plane = load_plan(record).data_plane
    except (OSError, ValueError):
        data_plane = None
    return await RequestClient.connect(record.nats.url, record.deployment, discovery=disc, data_plane=data_plane)


# ---- infer ------------------------------------------------------------------------------------


def parse_input(text: str) -> tuple[str, Any]:
    """`name=[1,2,3]`, `name:float32=[[1,2]]`, `name=@file.npy`, `name="text"` → (name, array)."""
    import numpy as np

    if "=" not in text:
        raise BadRequest(f"--input {text!r}: expected NAME=VALUE (VALUE: JSON list/number/string or @file.npy)")
    key, value = text.split("=", 1)
    name, _, dtype = key.partition(":")
    name = name.strip()
    if not name:
        raise BadRequest(f"--input {text!r}: empty input name")
    if value.startswith("@"):
        try:
            arr = np.load(value[1:], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BadRequest(f"--input {name}: cannot load {value[1:]}: {exc}") from None
    else:
        try:
            data = json.loads(value)
        except ValueError:
            data = value  # a bare string
        if isinstance(data, str) or (isinstance(data, list) and data and all(isinstance(x, str) for x in data)):
            arr = np.array([data] if isinstance(data, str) else data, dtype=object)
            arr = np.array([s.encode() for s in arr.reshape(-1)], dtype=object).reshape(arr.shape)
        else:
            try:
                arr = np.asarray(data)
            except ValueError as exc:
                raise BadRequest(f"--input {name}: {exc}") from None
    if dtype:
        try:
            arr = arr.astype(dtype)
        except TypeError as exc:
            raise BadRequest(f"--input {name}: bad dtype {dtype!r}: {exc}") from None
    return name, arr


def parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise BadRequest(f"--param {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _show(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value.reshape(-1).tolist()]
        return value.tolist()
    return value


def infer(
    component: str = typer.Option(..., "--component", "-c", help="Operator to call (e.g. encoder_decoder, router)."),
    inputs: list[str] = typer.Option([], "--input", "-i", help="NAME=[1,2,3] | NAME:float32=[...] | NAME=@file.npy (repeatable)."),
    params: list[str] = typer.Option([], "--param", "-p", help="KEY=VALUE request parameter (JSON values parsed; repeatable)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt (LLM operators); streams text as it arrives."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="LLM: tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="LLM: sampling temperature."),
    instance: Optional[str] = typer.Option(None, "--instance", help="Send to this worker instance only (e.g. encoder.1)."),
    timeout_s: float = typer.Option(60.0, "--timeout-s", help="Request deadline."),
    requests: int = typer.Option(1, "--requests", "-n", min=1, help="Send this many requests (a load run)."),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Requests in flight during a load run."),
    name: Optional[str] = typer.Option(None, "--name", help="Deployment (default: the only one running)."),
    nats_url: Optional[str] = typer.Option(None, "--nats-url", help="Talk to this NATS directly (with --name)."),
    as_json: bool = typer.Option(False, "--json", help="Print responses as JSON lines."),
) -> None:
    """Send a request (or a load of them) to an operator and print what comes back."""
    tensors = dict(parse_input(i) for i in inputs)
    parameters = dict(parse_param(p) for p in params)
    if prompt is not None:
        parameters["prompt"] = prompt
    if max_tokens is not None:
        parameters["max_tokens"] = max_tokens
    if temperature is not None:
        parameters["temperature"] = temperature
    if requests > 1:
        from tdist.cli.load import run_load

        result = asyncio.run(run_load(_client_for(name, nats_url), component, tensors, parameters, requests,
                                      concurrency, timeout_s, instance, out))
        if result["errors"]:
            raise typer.Exit(1)  # a load run with failed requests is a failure, whatever the throughput
        return
    asyncio.run(_infer_once(component, tensors, parameters, instance, timeout_s, name, nats_url, as_json, prompt is not None))


async def _infer_once(component: str, tensors: dict[str, Any], parameters: dict[str, Any], instance: Optional[str],
                      timeout_s: float, name: Optional[str], nats_url: Optional[str], as_json: bool, streaming_text: bool) -> None:
    client = await _client_for(name, nats_url)
    try:
        t0 = time.perf_counter()
        first: float | None = None
        chunks = 0
        async for resp in client.infer(component, inputs=tensors, parameters=parameters, timeout_s=timeout_s, instance=instance):
            chunks += 1
            first = first or time.perf_counter()
            if as_json:
                print(json.dumps({"final": resp.final, "worker": resp.worker, "parameters": resp.parameters,
                                  "outputs": {k: _show(v) for k, v in resp.outputs.items()}}), flush=True)
                continue
            text = resp.parameters.get("text")
            if streaming_text and isinstance(text, str):
                sys.stdout.write(text)
                sys.stdout.flush()
                if resp.final:
                    sys.stdout.write("\n")
                continue
            for k, v in resp.outputs.items():
                out.print(f"{k}: {_show(v)}")
            shown = {k: v for k, v in resp.parameters.items()}
            if shown:
                out.print(f"parameters: {json.dumps(shown)}")
        if streaming_text and not as_json:
            total = time.perf_counter() - t0
            err.print(f"[dim]{chunks} chunk(s); first after {(first or t0) - t0:.3f} s; total {total:.3f} s[/]")
    finally:
        await client.close()


# ---- status -----------------------------------------------------------------------------------


def status(
    name: Optional[str] = typer.Option(None, "--name", help="Deployment (default: the only one running)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Components → workers: state, host, pid, in-flight, served, errors, uptime, heartbeat age.

    Finds a deployment whose supervisor died too, and says so (exit 1): then the deployment is
    `degraded` while processes it left still run, `failed` when none does.
    """
    from tdist.launch.rundir import find_run

    state = find_run(name)
    entries: dict[str, dict[str, Any]] = {}
    problem: str | None = None
    orphaned = state.health_note()  # the supervisor died: say so, and what of it still runs
    run_state = state.state
    if orphaned:
        run_state = "degraded" if state.alive_processes() else "failed"
    nats_gone = state.nats.embedded and state.nats.process is not None and not state.nats.process.alive()
    if nats_gone and state.supervised:
        problem = f"the embedded nats-server (pid {state.nats.process.pid}) is not running"
    elif state.nats.url:
        async def fetch() -> dict[str, dict[str, Any]]:
            client = await _client_for(state.deployment, None)
            try:
                return await client.workers(max_age_s=0)
            finally:
                await client.close()

        try:
            entries = asyncio.run(fetch())
        except TdistError as exc:
            problem = exc.render()
    now = time.time()
    components: dict[str, dict[str, Any]] = {}
    for comp in state.components:
        components[comp] = {"operators": state.operators.get(comp, []), "workers": []}
    for wname, e in sorted(entries.items()):
        comp = e.get("component", "?")
        if now - float(e.get("heartbeat_at", now)) > STALE_AFTER_S and e.get("state") == "ready":
            e = {**e, "state": "stale"}  # no heartbeat lately: the worker is gone or hung
        components.setdefault(comp, {"operators": e.get("operators", []), "workers": []})
        rec = state.workers.get(wname)
        components[comp]["workers"].append({
            **{k: e.get(k) for k in ("name", "state", "host", "pid", "rank", "inflight", "served", "errors", "metrics_port")},
            "uptime_s": round(now - float(e.get("started_at", now)), 1),
            "heartbeat_age_s": round(now - float(e.get("heartbeat_at", now)), 2),
            "restarts": rec.restarts if rec else 0,
            "operators": e.get("per_operator", {}),
        })
    failed = _failed_workers(state, components, now)
    unhealthy = [c for c, v in components.items() if not any(w["state"] == "ready" for w in v["workers"])]
    if as_json:
        print(json.dumps({"deployment": state.deployment, "state": run_state, "nats_url": state.nats.url,
                          "request_plane": request_plane_status(state),
                          "components": components, "unhealthy": unhealthy, "error": problem,
                          "supervisor": None if state.supervisor is None else {
                              "pid": state.supervisor.pid, "alive": state.supervisor.alive()},
                          "orphaned": orphaned, "alive": state.alive_processes(), "failed": failed}, indent=2))
    else:
        plane = request_plane_status(state)
        url = state.nats.url
        if url and plane["state"] not in (None, "up"):
            url = f"{url} (request plane {plane['state']})"
        t = status_table(state.deployment, run_state, url, components)
        out.print(t)
        if orphaned:
            err.print(f"[red]{orphaned}[/]")
        for wname, f in failed.items():
            err.print(f"[red]worker {wname} failed:[/] {escape(f['error'] or 'exited')}; last lines of {f['log']}:")
            err.print(escape(f["log_tail"]) or "[dim](empty)[/]", markup=True)
        if problem:
            err.print(f"[red]{problem}[/]")
        if unhealthy:
            err.print(f"[red]no ready worker:[/] {', '.join(unhealthy)}")
    if unhealthy or problem or orphaned:
        raise typer.Exit(1)


def request_plane_status(state: Any) -> dict[str, Any]:
    """The request plane's own state: what its supervisor recorded for an embedded server (up,
    restarting, down), else None (an external server: tdist does not watch it)."""
    return {"url": state.nats.url, "embedded": state.nats.embedded, "state": state.nats.state,
            "restarts": state.nats.restarts}


#: Lines of a failed worker's log that `status` shows.
FAILED_LOG_LINES = 15


def _failed_workers(state: Any, components: dict[str, dict[str, Any]], now: float) -> dict[str, dict[str, Any]]:
    """Workers the supervisor gave up on (run record: `failed`), with why and their log tail.

    Their discovery entry, if one is left, says what it said last (`ready`, a stale heartbeat):
    the record wins. A failed worker with no entry gets a row of its own, so status shows it.
    """
    from tdist.launch.logs import tail_file

    failed: dict[str, dict[str, Any]] = {}
    for wname, rec in state.workers.items():
        if rec.state != "failed":
            continue
        failed[wname] = {"error": rec.error, "last_exit": rec.last_exit, "restarts": rec.restarts, "log": rec.log,
                         "log_tail": tail_file(rec.log, FAILED_LOG_LINES)}
        comp = components.setdefault(rec.component, {"operators": state.operators.get(rec.component, []), "workers": []})
        row = next((w for w in comp["workers"] if w["name"] == wname), None)
        if row is None:
            comp["workers"].append({"name": wname, "state": "failed", "host": rec.process.host if rec.process else "",
                                    "pid": rec.pid, "rank": None, "inflight": 0, "served": 0, "errors": 0,
                                    "metrics_port": None, "uptime_s": 0.0, "heartbeat_age_s": 0.0,
                                    "restarts": rec.restarts, "operators": {}})
        else:
            row["state"] = "failed"
    return failed


# ---- stop -------------------------------------------------------------------------------------


def stop(
    name: Optional[str] = typer.Option(None, "--name", help="Deployment (default: the only one running)."),
    timeout_s: float = typer.Option(60.0, "--timeout-s", help="Wait this long for a clean drain before killing."),
) -> None:
    """Stop a deployment: drain workers, stop NATS, leave no process behind."""
    from tdist.cli.deploy_view import CliEvents
    from tdist.launch.launchers import open_launcher
    from tdist.launch.rundir import find_run

    open_launcher(find_run(name)).stop(timeout_s=timeout_s, events=CliEvents(out, err))


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)
    app.command("infer")(infer)
    app.command("status")(status)
    app.command("stop")(stop)
