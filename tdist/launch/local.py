"""The local supervisor: one process per WorkerConfig on this machine, kept alive until stopped.

Starts the embedded nats-server when the plan asks for it, writes each WorkerConfig to the run
directory, starts every worker in its own process group with its log file, waits until each
one is `ready` in discovery (under a timeout, failing fast with the log tail of a worker that
died), restarts a crashed worker with exponential backoff, and tears everything down in order:
workers in reverse start order (callers before callees), then NATS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tdist.errors import LaunchError
from tdist.launch.nats import NatsServer, start_nats
from tdist.launch.rundir import RunState, WorkerRecord, kill_group, pid_alive
from tdist.plan.emit import worker_command
from tdist.runtime.config import WorkerConfig

log = logging.getLogger("tdist.launch")

ProgressFn = Callable[[int, int, str], None]  # (ready, total, message)


def tail_file(path: str | None, lines: int = 15) -> str:
    if not path:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class _Proc:
    config: WorkerConfig
    record: WorkerRecord
    process: subprocess.Popen[bytes] | None = None
    started_mono: float = 0.0
    backoff_s: float = 1.0
    restart_at: float | None = None
    stopping: bool = False
    log_fh: Any = None


@dataclass
class LocalSupervisor:
    """Runs a plan's workers locally. Use: `await start()`, `await supervise(stop_event)`, `await stop()`."""

    deployment: str
    workers: list[WorkerConfig]
    run_dir: Path
    nats_url: str | None = None  # None: start an embedded nats-server
    startup_timeout_s: float = 120.0
    drain_timeout_s: float = 30.0
    restart: bool = True
    max_backoff_s: float = 30.0
    graph: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    #: The plan file every worker reads its config from (`--plan PATH --rank N`, the one command
    #: form `tdist plan` prints). None: the workers were given without a plan (tests); their
    #: configs are written to `<run dir>/workers.json` and started the same way.
    plan_path: str | None = None
    #: argv[0] of a worker, as the plan says it (`python`: this interpreter's bin dir is put first on PATH).
    python: str = "python"
    state: RunState = field(init=False)
    nats: NatsServer | None = field(init=False, default=None)
    etcd: Any = field(init=False, default=None)  # embedded etcd (discovery: etcd, endpoints: embedded)
    _procs: list[_Proc] = field(init=False, default_factory=list)
    _ranks: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        if self.plan_path is None:
            path = self.run_dir / "workers.json"
            path.write_text(json.dumps({"workers": [json.loads(w.to_json()) for w in self.workers]}))
            self.plan_path = str(path)
        self._ranks = {w.name: i for i, w in enumerate(self.workers)}
        components: list[str] = []
        operators: dict[str, list[str]] = {}
        for w in self.workers:
            if w.component not in components:
                components.append(w.component)
            operators.setdefault(w.component, [o.name for o in w.operators])
        self.state = RunState(
            deployment=self.deployment,
            run_dir=str(self.run_dir),
            graph=self.graph,
            supervisor_pid=os.getpid(),
            components=components,
            operators=operators,
            log_dir=str(self.run_dir / "logs"),
            discovery=self.workers[0].discovery.kind if self.workers else "nats",
        )

    # ---- start ------------------------------------------------------------------------------

    async def start(self, progress: ProgressFn | None = None) -> None:
        """Start everything; return once all workers are ready. On failure: record why, tear down, raise."""
        try:
            await self._start_processes(progress)
        except BaseException as exc:
            self.state.state = "failed"
            self.state.error = exc.render() if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
            self.state.save()
            await self.stop(final_state="failed")
            raise
        self.state.state = "ready"
        self.state.save()

    async def _start_processes(self, progress: ProgressFn | None) -> None:
        """Start NATS (if embedded), etcd (if asked) and every worker; wait until all are ready."""
        if self.nats_url is None:
            self.nats = start_nats(work_dir=str(self.run_dir / "nats"))
            self.nats_url = self.nats.url
            self.state.nats_pid = self.nats.pid
            self.state.nats_embedded = True
            try:
                os.symlink(self.nats.log_path, self.run_dir / "logs" / "nats-server.log")
            except OSError:
                pass
        self.state.nats_url = self.nats_url
        self._ensure_etcd()
        self.state.save()
        for cfg in self.workers:
            self._add_worker(cfg)
        self.state.save()
        await self._wait_ready(progress)

    def _ensure_etcd(self, host: str = "127.0.0.1", advertise_host: str | None = None) -> None:
        """Endpoints for etcd discovery; starts an embedded etcd when the graph asks for one."""
        from tdist.launch.etcd import ensure_etcd_for

        self.etcd, endpoints = ensure_etcd_for(self.workers, self.run_dir, host=host, advertise_host=advertise_host)
        if not endpoints:
            return
        self.state.etcd_endpoints = list(endpoints)
        self.state.etcd_pid = self.etcd.process.pid if self.etcd is not None else None
        self.extra_env["ETCD_ENDPOINTS"] = ",".join(endpoints)

    def _discovery_config(self) -> Any:
        """This deployment's discovery settings with the endpoints resolved (for our own reads)."""
        if not self.workers:
            return None
        disc = self.workers[0].discovery
        if disc.kind == "etcd" and not disc.etcd_endpoints and self.state.etcd_endpoints:
            disc = disc.model_copy(update={"etcd_endpoints": list(self.state.etcd_endpoints)})
        return disc

    def _add_worker(self, cfg: WorkerConfig) -> None:
        """Record a worker in the run state and start its process."""
        rec = WorkerRecord(name=cfg.name, component=cfg.component, log=cfg.log_path or str(self.run_dir / "logs" / f"{cfg.name}.log"))
        self.state.workers[cfg.name] = rec
        proc = _Proc(cfg, rec)
        self._procs.append(proc)
        self._spawn(proc)

    def _spawn(self, proc: _Proc) -> None:
        cfg = proc.config
        env = dict(os.environ)
        # argv[0] is the plan's `python`: this interpreter's directory first, so it is this venv's
        bindir = os.path.dirname(sys.executable)
        if env.get("PATH", "").split(os.pathsep)[0] != bindir:
            env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.update(self.extra_env)
        env.update(cfg.env)
        if "PYTHONPATH" in cfg.env and os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = cfg.env["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
        assert self.nats_url
        env["NATS_SERVER"] = self.nats_url
        env["TDIST_DEPLOYMENT"] = self.deployment
        if cfg.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in cfg.gpu_ids)
        log_path = proc.record.log
        assert log_path
        if proc.log_fh is None:
            proc.log_fh = open(log_path, "ab", buffering=0)
        proc.log_fh.write(f"==== tdist: starting {cfg.name} at {time.strftime('%H:%M:%S')} ====\n".encode())
        proc.process = subprocess.Popen(
            worker_command(self.python, str(self.plan_path), self._ranks[cfg.name]),
            stdin=subprocess.DEVNULL,
            stdout=proc.log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        proc.started_mono = time.monotonic()
        proc.record.pid = proc.process.pid
        proc.record.state = "running"

    async def _discovery_entries(self, client: Any) -> dict[str, dict[str, Any]]:
        try:
            return await client.discovery.list()
        except Exception as exc:
            log.debug("discovery read failed: %s", exc)
            return {}

    async def _wait_ready(self, progress: ProgressFn | None) -> None:
        from tdist.runtime.planes.request import RequestClient

        client = await RequestClient.connect(self.nats_url, self.deployment, discovery=self._discovery_config())
        try:
            deadline = time.monotonic() + self.startup_timeout_s
            total = len(self._procs)
            while True:
                for p in self._procs:
                    if p.process is not None and p.process.poll() is not None:
                        raise LaunchError(
                            f"worker {p.config.name} exited with code {p.process.returncode} during start",
                            log_tail=tail_file(p.record.log),
                            log_path=p.record.log,
                        )
                entries = await self._discovery_entries(client)
                failed = [n for n, e in entries.items() if e.get("state") == "failed" and n in self.state.workers]
                if failed:
                    rec = self.state.workers[failed[0]]
                    raise LaunchError(
                        f"worker {failed[0]} failed to start: {entries[failed[0]].get('error')}",
                        log_tail=tail_file(rec.log),
                        log_path=rec.log,
                    )
                ready = [n for n, e in entries.items() if e.get("state") == "ready" and n in self.state.workers]
                if progress:
                    progress(len(ready), total, ", ".join(sorted(set(self.state.workers) - set(ready))))
                if len(ready) == total:
                    return
                if time.monotonic() > deadline:
                    slow = sorted(set(self.state.workers) - set(ready))
                    rec = self.state.workers[slow[0]]
                    raise LaunchError(
                        f"not ready within {self.startup_timeout_s:g} s: {', '.join(slow)}",
                        log_tail=tail_file(rec.log),
                        log_path=rec.log,
                    )
                await asyncio.sleep(0.1)
        finally:
            await client.close()

    # ---- supervise --------------------------------------------------------------------------

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart crashed workers (with backoff) until `stop` is set."""
        while not stop.is_set():
            now = time.monotonic()
            changed = False
            for p in self._procs:
                if p.stopping or p.process is None:
                    continue
                code = p.process.poll()
                if code is None:
                    if now - p.started_mono > 60:
                        p.backoff_s = 1.0  # healthy for a minute: forget past crashes
                    continue
                if p.restart_at is None:
                    p.record.last_exit = code
                    # what the worker started (engine processes, a Triton server) dies with it
                    kill_group(p.process.pid, signal.SIGKILL)
                    if not self.restart:
                        p.record.state = "failed"
                        p.stopping = True
                        changed = True
                        continue
                    p.restart_at = now + p.backoff_s
                    p.record.state = "restarting"
                    log.warning("worker %s exited with %s; restarting in %.1f s", p.config.name, code, p.backoff_s)
                    changed = True
                elif now >= p.restart_at:
                    p.restart_at = None
                    p.backoff_s = min(self.max_backoff_s, p.backoff_s * 2)
                    p.record.restarts += 1
                    self._spawn(p)
                    changed = True
            if changed:
                self.state.save()
            if self.nats is not None and not self.nats.alive():
                self.state.error = f"embedded nats-server died (exit {self.nats.process.returncode})"
                self.state.save()
                log.error(self.state.error)
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    # ---- stop -------------------------------------------------------------------------------

    async def stop(self, final_state: str = "stopped") -> None:
        """Drain workers in reverse start order by component, then stop NATS. Leaves no process."""
        if self.state.state not in ("failed",):
            self.state.state = "stopping"
            self.state.save()
        by_component: dict[str, list[_Proc]] = {}
        for p in self._procs:
            by_component.setdefault(p.config.component, []).append(p)
        for component in reversed(list(by_component)):
            group = by_component[component]
            for p in group:
                p.stopping = True
                if p.process is not None and p.process.poll() is None:
                    kill_group(p.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.drain_timeout_s
            while any(p.process is not None and p.process.poll() is None for p in group) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for p in group:
                if p.process is not None and p.process.poll() is None:
                    kill_group(p.process.pid, signal.SIGKILL)
                    p.process.wait(5)
                if p.process is not None:
                    kill_group(p.process.pid, signal.SIGKILL)  # stragglers of its group
                p.record.state = "stopped"
                if p.log_fh is not None:
                    p.log_fh.close()
                    p.log_fh = None
        if self.nats is not None:
            self.nats.stop()
        if self.etcd is not None:
            self.etcd.stop()
        self.state.state = final_state
        self.state.save()


def stop_run(state: RunState, *, timeout_s: float = 60.0) -> list[str]:
    """Stop a deployment from another process: ask its supervisor, then make sure nothing is left.

    Returns the names of processes that had to be killed by force.
    """
    forced: list[str] = []
    if state.supervisor_alive() and state.supervisor_pid != os.getpid():
        os.kill(state.supervisor_pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + timeout_s
        while pid_alive(state.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(state.supervisor_pid):
            kill_group(state.supervisor_pid, signal.SIGKILL)
            forced.append("supervisor")
    # Whatever the supervisor could not clean up (it crashed, or was killed): kill it here.
    for name, rec in state.workers.items():
        if pid_alive(rec.pid):
            kill_group(rec.pid, signal.SIGKILL)
            forced.append(name)
    for label, pid in (("nats-server", state.nats_pid if state.nats_embedded else None), ("etcd", state.etcd_pid)):
        if pid_alive(pid):
            kill_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                kill_group(pid, signal.SIGKILL)
            forced.append(label)
    try:
        fresh = RunState.load(state.path)
    except (OSError, ValueError):
        fresh = state
    fresh.state = "stopped"
    fresh.save()
    return forced
