"""The local supervisor: one process per WorkerConfig on this machine, kept alive until stopped.

Starts the embedded nats-server when the plan asks for it, starts every worker as
`python -m tdist.runtime.worker --plan <run>/plan.json --rank N` (exactly what `tdist plan`
prints) in its own process group with its log file, waits until each one is `ready` in
discovery (under a timeout, failing fast with the log tail of a worker that died), restarts a
crashed worker with exponential backoff until it has crashed `restart_max_crashes` times within
`restart_window_s` (or at once under --no-restart): then it stays `failed`, with why in the run
record, and the deployment is `degraded` — a broken worker is not restarted forever behind a
deployment that says `ready`. Tears everything down in order: workers in reverse start order
(callers before callees), then NATS and etcd. Everything it starts is recorded with its identity
(pid + start time) in the run record (launch/rundir.py).
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
from typing import Any

from tdist.errors import LaunchError
from tdist.launch.children import exited as _exited
from tdist.launch.children import kill_group as _kill_group
from tdist.launch.children import reap as _reap
from tdist.launch.logs import tail_file
from tdist.launch.nats import NatsPortTaken, NatsServer, start_nats
from tdist.launch.readiness import ProgressFn, wait_ready_in_discovery
from tdist.launch.rundir import LaunchOptions, ProcessRecord, RunRecord, WorkerRecord, components_of
from tdist.plan.emit import worker_command
from tdist.runtime.config import WorkerConfig
from tdist.runtime.process_identity import owner_preexec

log = logging.getLogger("tdist.launch")


@dataclass
class _Proc:
    config: WorkerConfig
    record: WorkerRecord
    process: subprocess.Popen[bytes] | None = None
    started_mono: float = 0.0
    crashes: list[float] = field(default_factory=list)  # monotonic times of its recent crashes
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
    #: Crashes within restart_window_s after which a worker is `failed` (graph: launch.local).
    restart_max_crashes: int = 5
    restart_window_s: float = 300.0
    graph: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    #: The plan file every worker reads its config from (`--plan PATH --rank N`, the one command
    #: form `tdist plan` prints). None: the workers were given without a plan (tests); their
    #: configs are written to `<run dir>/workers.json` and started the same way.
    plan_path: str | None = None
    #: argv[0] of a worker, as the plan says it (`python`: this interpreter's bin dir is put first on PATH).
    python: str = "python"
    #: The run record to keep up to date (a launcher passes the one it wrote); None: a fresh one.
    record: RunRecord | None = None
    nats: NatsServer | None = field(init=False, default=None)
    etcd: Any = field(init=False, default=None)  # embedded etcd (discovery: etcd, endpoints: embedded)
    #: Set by a second Ctrl-C (`hurry`): stop kills at once instead of waiting for drains.
    hurried: bool = field(init=False, default=False)
    _procs: list[_Proc] = field(init=False, default_factory=list)
    _ranks: dict[str, int] = field(init=False, default_factory=dict)
    #: restarts of the embedded nats-server: next try (monotonic), backoff, why it cannot come back
    _nats_restart_at: float | None = field(init=False, default=None)
    _nats_backoff_s: float = field(init=False, default=0.2)
    _nats_up_since: float = field(init=False, default=0.0)
    nats_failure: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        if self.plan_path is None:
            path = self.run_dir / "workers.json"
            path.write_text(json.dumps({"workers": [json.loads(w.to_json()) for w in self.workers]}))
            self.plan_path = str(path)
        self._ranks = {w.name: i for i, w in enumerate(self.workers)}
        if self.record is None:
            self.record = _record_of_workers(self)
        self.record.supervisor = ProcessRecord.of(os.getpid())

    @property
    def state(self) -> RunRecord:
        """The run record this supervisor writes (state.json)."""
        assert self.record is not None
        return self.record

    # ---- start ------------------------------------------------------------------------------

    async def start(self, progress: ProgressFn | None = None) -> None:
        """Start everything; return once all workers are ready. On failure: record why, tear down, raise."""
        try:
            await self._start_processes(progress)
        except asyncio.CancelledError:  # Ctrl-C / SIGTERM / SIGHUP during start-up: tear down, say so
            self.state.error = "start-up interrupted"
            await self.stop()
            raise
        except BaseException as exc:
            self.state.state = "failed"
            self.state.error = exc.render() if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
            self.state.save()
            await self.stop(final_state="failed")
            raise
        self.state.state = "ready"
        self.state.save()

    def _start_nats(self, host: str = "127.0.0.1", advertise: str | None = None) -> None:
        """The embedded nats-server, when no URL was given; recorded with its identity."""
        if self.nats_url is None:
            self.nats = start_nats(work_dir=str(self.run_dir / "nats"), host=host)
            self.nats_url = f"nats://{advertise}:{self.nats.port}" if advertise else self.nats.url
            self.state.nats.embedded = True
            self.state.nats.process = ProcessRecord.of(self.nats.pid)
            self.state.nats.state = "up"
            self._nats_up_since = time.monotonic()
            try:
                os.symlink(self.nats.log_path, self.run_dir / "logs" / "nats-server.log")
            except OSError:
                pass
        self.state.nats.url = self.nats_url

    async def _start_processes(self, progress: ProgressFn | None) -> None:
        """Start NATS (if embedded), etcd (if asked) and every worker; wait until all are ready."""
        self._start_nats()
        self._ensure_etcd()
        self.state.save()
        for cfg in self.workers:
            self._add_worker(cfg)
        self.state.save()
        await self._wait_ready(progress, set(self.state.workers))

    def _ensure_etcd(self, host: str = "127.0.0.1", advertise_host: str | None = None) -> None:
        """Endpoints for etcd discovery; starts an embedded etcd when the graph asks for one."""
        from tdist.launch.etcd import ensure_etcd_for

        self.etcd, endpoints = ensure_etcd_for(self.workers, self.run_dir, host=host, advertise_host=advertise_host)
        if not endpoints:
            return
        self.state.etcd.endpoints = list(endpoints)
        self.state.etcd.process = ProcessRecord.of(self.etcd.process.pid) if self.etcd is not None else None
        self.extra_env["ETCD_ENDPOINTS"] = ",".join(endpoints)

    def _discovery_config(self) -> Any:
        """This deployment's discovery settings with the endpoints resolved (for our own reads)."""
        if not self.workers:
            return None
        disc = self.workers[0].discovery
        if disc.kind == "etcd" and not disc.etcd_endpoints and self.state.etcd.endpoints:
            disc = disc.model_copy(update={"etcd_endpoints": list(self.state.etcd.endpoints)})
        return disc

    def _add_worker(self, cfg: WorkerConfig) -> None:
        """Record a worker in the run state and start its process."""
        rec = self.state.workers.get(cfg.name) or WorkerRecord(name=cfg.name, component=cfg.component)
        rec.rank = self._ranks[cfg.name]
        rec.log = rec.log or cfg.log_path or str(self.run_dir / "logs" / f"{cfg.name}.log")
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
            start_new_session=True,  # its own group: the engine processes it starts go with it
            preexec_fn=owner_preexec(signal.SIGTERM),  # and it dies with us (the worker ends its group then)
        )
        proc.started_mono = time.monotonic()
        proc.record.process = ProcessRecord.of(proc.process.pid)
        proc.record.state = "starting"

    def _check_workers(self) -> None:
        """Raise (with its log tail) if a worker we started has exited during start-up."""
        for p in self._procs:
            if p.process is not None and _reap(p.process) is not None:
                raise LaunchError(f"worker {p.config.name} exited with code {p.process.returncode} during start",
                                  log_tail=tail_file(p.record.log), log_path=p.record.log)

    async def _wait_ready(self, progress: ProgressFn | None, names: set[str], check: Any = None) -> dict[str, Any]:
        assert self.nats_url
        entries = await wait_ready_in_discovery(
            self.nats_url, self.deployment, self._discovery_config(), names, timeout_s=self.startup_timeout_s,
            log_of=self._log_of, check=check or self._check_workers, progress=progress)
        for name in names:
            self.state.workers[name].state = "ready"
        return entries

    def _log_of(self, name: str) -> str | None:
        rec = self.state.workers.get(name)
        return rec.log if rec else None

    # ---- supervise --------------------------------------------------------------------------

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart crashed workers (with backoff) until `stop` is set; keep the deployment state true."""
        while not stop.is_set():
            if self._supervise_round(time.monotonic()):
                self._update_deployment_state()
                self.state.save()
            if self.etcd is not None and not self.etcd.alive():
                await self._restart_etcd()
            if self.nats is not None and not await self._supervise_nats(time.monotonic()):
                stop.set()  # the request plane cannot come back: stop cleanly, state failed
                break
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    async def _restart_etcd(self) -> None:
        """The embedded etcd died: start it again on the same ports and data dir (keys and leases
        survive; workers' discovery clients reconnect to the endpoints they know). The deployment
        is `degraded` while it is down; one that does not come back is retried next round."""
        code = self.etcd.process.returncode
        self.state.etcd.last_exit = code
        self.state.state = "degraded" if self.state.state == "ready" else self.state.state
        self.state.save()
        log.warning("embedded etcd exited with %s; restarting it on the same ports", code)
        try:
            self.etcd.respawn()  # here, in the main thread: its parent-death signal is bound to it
            await asyncio.to_thread(self.etcd.wait_ready, 30.0)
        except LaunchError as exc:
            log.error("embedded etcd did not come back: %s", exc.render())
            return
        self.state.etcd.process = ProcessRecord.of(self.etcd.process.pid)
        self.state.etcd.restarts = self.etcd.restarts
        self._update_deployment_state()
        self.state.save()

    def _supervise_round(self, now: float) -> bool:
        """One look at every worker process; True when a record changed."""
        changed = False
        for p in self._procs:
            if p.stopping or p.process is None:
                continue
            code = _reap(p.process)  # what the worker started (engine processes, a Triton server) dies with it
            if code is None:
                continue
            if p.restart_at is None:
                p.record.last_exit = code
                p.crashes = [t for t in p.crashes if now - t < self.restart_window_s] + [now]
                if not self.restart or len(p.crashes) >= self.restart_max_crashes:
                    p.record.state = "failed"
                    p.record.error = (f"exited with code {code}; not restarted (--no-restart)" if not self.restart else
                                      f"crashed {len(p.crashes)} times within {self.restart_window_s:g} s "
                                      f"(restart_max_crashes {self.restart_max_crashes}); last exit code {code}")
                    log.error("worker %s %s", p.config.name, p.record.error)
                    p.stopping = True
                    changed = True
                    continue
                backoff = min(self.max_backoff_s, 2.0 ** (len(p.crashes) - 1))
                p.restart_at = now + backoff
                p.record.state = "restarting"
                log.warning("worker %s exited with %s (crash %d of %d within %g s); restarting in %.1f s", p.config.name,
                            code, len(p.crashes), self.restart_max_crashes, self.restart_window_s, backoff)
                changed = True
            elif now >= p.restart_at:
                p.restart_at = None
                p.record.restarts += 1
                self._spawn(p)
                changed = True
        return changed

    def _update_deployment_state(self) -> None:
        if self.state.state not in ("ready", "degraded"):
            return
        broken = any(w.state in ("failed", "restarting") for w in self.state.workers.values())
        broken = broken or self.state.nats.state not in (None, "up")
        broken = broken or (self.etcd is not None and not self.etcd.alive())
        self.state.state = "degraded" if broken else "ready"

    async def _supervise_nats(self, now: float) -> bool:
        """Restart a dead embedded nats-server with backoff, on its port and store directory
        (NatsServer.restart), so every client reconnects to the URL it knows and JetStream recovers
        what it stored. The deployment is degraded meanwhile. False: it cannot come back (its port
        was taken), recorded as the deployment's error."""
        srv = self.nats
        assert srv is not None
        if srv.alive():
            if now - self._nats_up_since > 60:
                self._nats_backoff_s = 0.2  # up for a minute: forget past deaths
            return True
        if self._nats_restart_at is None:
            self._nats_restart_at = now + self._nats_backoff_s
            self.state.nats.state = "restarting"
            self._update_deployment_state()
            self.state.save()
            log.error("embedded nats-server died (exit %s); restarting in %.1f s", srv.process.returncode,
                      self._nats_backoff_s)
            return True
        if now < self._nats_restart_at:
            return True
        self._nats_backoff_s = min(self.max_backoff_s, self._nats_backoff_s * 2)
        try:
            # here, in the main thread (not asyncio.to_thread): the parent-death signal that binds
            # the new server to this supervisor follows the thread that forks it. nats-server is
            # ready in milliseconds; a restart that fails gives up after 5 s.
            self.nats = srv.restart(timeout_s=5.0)
        except NatsPortTaken as exc:
            self.nats_failure = self.state.error = exc.render()
            self.state.nats.state = "down"
            self.state.save()
            log.error("%s", exc.render())
            return False
        except LaunchError as exc:
            self._nats_restart_at = time.monotonic() + self._nats_backoff_s
            log.error("embedded nats-server restart failed (next try in %.1f s): %s", self._nats_backoff_s, exc.render())
            return True
        self._nats_restart_at = None
        self._nats_up_since = time.monotonic()
        self.state.nats.process = ProcessRecord.of(self.nats.pid)
        self.state.nats.state = "up"
        self.state.nats.restarts += 1
        self._update_deployment_state()
        self.state.save()
        log.warning("embedded nats-server restarted on port %d (pid %d)", self.nats.port, self.nats.pid)
        return True

    # ---- stop -------------------------------------------------------------------------------

    def hurry(self) -> None:
        """Stop now (a second Ctrl-C): drains still running are cut short by SIGKILL."""
        self.hurried = True

    async def stop(self, final_state: str = "stopped") -> None:
        """Drain workers in reverse start order by component, then stop NATS. Leaves no process."""
        if self.nats_failure is not None and final_state == "stopped":
            final_state = "failed"
        if self.state.state != "failed":
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
                    _kill_group(p.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.drain_timeout_s
            while (any(p.process is not None and _exited(p.process) is None for p in group)
                   and time.monotonic() < deadline and not self.hurried):
                await asyncio.sleep(0.05)
            for p in group:
                if p.process is not None:
                    # SIGKILL the group (a worker past its drain, and stragglers of one that exited)
                    # while the leader is still unreaped: its pid, the group's id, is still ours
                    _kill_group(p.process.pid, signal.SIGKILL)
                    p.process.wait(5)
                if p.record.state != "failed":
                    p.record.state = "stopped"
                if p.log_fh is not None:
                    p.log_fh.close()
                    p.log_fh = None
        if self.nats is not None:
            self.nats.stop()
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None
        self.state.state = final_state  # type: ignore[assignment]
        self.state.save()


def _record_of_workers(sup: LocalSupervisor) -> RunRecord:
    """A run record for workers given without a plan (tests, benchmarks)."""
    components, operators = components_of(sup.workers)
    return RunRecord(
        deployment=sup.deployment, run_dir=str(sup.run_dir), plan_path=str(sup.plan_path), graph=sup.graph,
        options=LaunchOptions(nats_url=sup.nats_url, startup_timeout_s=sup.startup_timeout_s, restart=sup.restart),
        discovery=sup.workers[0].discovery.kind if sup.workers else "nats",
        components=components, operators=operators,
    )
