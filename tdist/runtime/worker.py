"""The worker process: `python -m tdist.runtime.worker --plan plan.json --rank N`.

Every launcher starts exactly that (mpirun and srun give the rank in the environment instead of
`--rank`); `--config worker.json` runs one WorkerConfig outside any plan (a test, a debug session).

Connects the planes, constructs and starts its operators, serves their requests, registers
in discovery (state starting → ready → draining) with a heartbeat, serves Prometheus metrics,
and drains on SIGTERM: takes nothing new, finishes what it took, deregisters, exits 0.
Exit codes: 0 clean stop, 2 bad config or operator load error, 3 cannot reach NATS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from tdist.errors import OperatorLoadError, TdistError
from tdist.runtime.calls import current_client
from tdist.runtime.config import WorkerConfig
from tdist.runtime.loader import load_operator_class
from tdist.runtime.metrics import WorkerMetrics
from tdist.runtime.operator import OperatorContext
from tdist.runtime.planes.codec import TensorCodec, make_codec
from tdist.runtime.planes.discovery import Discovery, make_discovery
from tdist.runtime.planes.discovery_entry import OperatorStatus, WorkerEntry
from tdist.runtime.planes.request import RequestClient, follow_reconnects
from tdist.runtime.planes.request_nats import NatsRequestPlane, resolve_nats_url
from tdist.runtime.planes.request_plane import RequestPlane
from tdist.runtime.serve import Cancellations, OperatorHost, ServingContext

log = logging.getLogger("tdist.worker")

READY_LINE = "tdist worker ready"
#: Signals that make a worker drain: SIGUSR2 too, because mpirun forwards it to every rank of a
#: world (its SIGTERM kills the job about a second later, with no time to drain).
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
RANK_ENV = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
LOCAL_RANK_ENV = ("OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID")


class Worker:
    """One worker process: its planes, its operators' hosts, its discovery entry and metrics."""

    def __init__(self, config: WorkerConfig, *, drain_timeout_s: float = 30.0) -> None:
        self.config = config
        self.deployment = config.deployment
        self.drain_timeout_s = drain_timeout_s
        self.metrics = WorkerMetrics(config.name)
        self.hosts: dict[str, OperatorHost] = {}
        self.state = "starting"
        self.error: str | None = None
        self.started_at = time.time()
        self.plane: RequestPlane | None = None
        self.codec: TensorCodec | None = None
        self.discovery: Discovery | None = None
        self.client: RequestClient | None = None
        self.cancelled = Cancellations()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._listeners: list[Any] = []

    # ---- cancellation -----------------------------------------------------------------------

    def _on_cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)
        for host in self.hosts.values():
            host.cancel(request_id)

    # ---- discovery --------------------------------------------------------------------------

    def entry(self) -> WorkerEntry:
        c = self.config
        ops = {name: OperatorStatus(**h.status(), stats=_safe_stats(h)) for name, h in self.hosts.items()}
        return WorkerEntry(
            name=c.name,
            component=c.component,
            deployment=c.deployment,
            operators=[o.name for o in c.operators],
            kinds={o.name: o.kind for o in c.operators},
            roles={o.name: o.role for o in c.operators},
            host=socket.gethostname(),
            pid=os.getpid(),
            rank=c.rank,
            state=self.state,  # type: ignore[arg-type]
            error=self.error,
            inflight=sum(o.inflight for o in ops.values()),
            served=sum(o.served for o in ops.values()),
            errors=sum(o.errors for o in ops.values()),
            per_operator=ops,
            started_at=self.started_at,
            heartbeat_at=time.time(),
            metrics_port=self.metrics.port,
            plane_reconnects=getattr(self.plane, "reconnects", 0),
            plane_last_outage_s=getattr(self.plane, "last_outage_s", None),
        )

    def _plane_down(self) -> bool:
        """Cut off from NATS right now: a discovery write would only wait for its timeout (the
        entry says so once the plane is back: _reconnected)."""
        return getattr(self.plane, "connected", True) is False and self.config.discovery.kind == "nats"

    async def publish_entry(self) -> None:
        assert self.discovery is not None
        if self._plane_down():
            return
        try:
            await self.discovery.put(self.config.name, self.entry().to_wire())
        except Exception as exc:
            log.warning("discovery update failed: %s", exc)

    async def _reconnected(self) -> None:
        await self.publish_entry()

    async def _heartbeat(self) -> None:
        interval = self.config.request_plane.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            self.cancelled.prune()
            await self.publish_entry()

    # ---- life cycle -------------------------------------------------------------------------

    async def run(self) -> int:
        """Connect the planes this config names (NATS, its discovery, the data plane), then serve."""
        c = self.config
        url = resolve_nats_url(c.request_plane)
        plane = await NatsRequestPlane.connect(url, self.deployment, config=c.request_plane, name=f"tdist-worker-{c.name}")
        await plane.ensure_stream()
        discovery = make_discovery(c.discovery, self.deployment, js=plane.js, storage=c.request_plane.storage)
        # after a reconnect: the stream and consumers first (the plane), then discovery, then our
        # entry at once, saying we were cut off, instead of at the next heartbeat
        follow_reconnects(plane, discovery)
        plane.on_reconnect(self._reconnected)
        codec = make_codec(c.data_plane, host=_host_address(url))
        await codec.start()
        return await self.serve(plane, discovery, codec)

    async def serve(self, plane: RequestPlane, discovery: Discovery, codec: TensorCodec) -> int:
        """Start the operators and serve their requests on `plane` until request_stop(); then drain.

        The planes are given (and closed at the end), so unit tests run a whole worker on the
        in-memory request plane and discovery."""
        c = self.config
        self.plane, self.discovery, self.codec = plane, discovery, codec
        self.client = RequestClient(plane, config=c.request_plane, codec=codec, discovery=discovery)
        await self.client.start()
        current_client.set(self.client)
        if c.metrics_port is not None:
            try:
                self.metrics.serve(c.metrics_port)
            except OSError as exc:
                log.error("metrics port %s unavailable: %s (continuing without metrics)", c.metrics_port, exc)
        await self.publish_entry()
        self._listeners.append(await plane.on_cancel(self._on_cancel))
        serving = ServingContext(instance=c.name, plane=plane, codec=codec, metrics=self.metrics,
                                 request_plane=c.request_plane, cancelled=self.cancelled)

        try:
            for oc in c.operators:
                cls = load_operator_class(oc)
                logger = logging.getLogger(f"tdist.op.{oc.name}")
                logger.setLevel(oc.log_level.upper())
                ctx = OperatorContext(config=oc, worker=c, logger=logger, client=self.client, metrics_registry=self.metrics.registry)
                try:
                    op = cls(ctx)
                    await op.start()
                except TdistError:
                    raise
                except Exception as exc:
                    raise OperatorLoadError(f"operator {oc.name!r} failed to start: {type(exc).__name__}: {exc}") from exc
                self.hosts[oc.name] = OperatorHost(serving, oc, op)
            for host in self.hosts.values():
                await host.start_serving()
            await plane.flush()
        except TdistError as exc:
            self.state = "failed"
            self.error = exc.render()
            log.error("worker %s failed to start: %s", c.name, self.error)
            await self.publish_entry()
            await self._close()
            return 2

        self.state = "ready"
        await self.publish_entry()
        self._tasks.append(asyncio.create_task(self._heartbeat()))
        log.info("%s: %s (operators: %s, metrics port %s)", READY_LINE, c.name, ", ".join(self.hosts), self.metrics.port)
        print(f"{READY_LINE}: {c.name}", flush=True)

        await self._stop.wait()
        log.info("worker %s draining", c.name)
        self.state = "draining"
        await self.publish_entry()
        await asyncio.gather(*(h.drain(self.drain_timeout_s) for h in self.hosts.values()))
        for name, host in self.hosts.items():
            try:
                await host.operator.stop()
            except Exception as exc:
                log.warning("operator %s stop failed: %s", name, exc)
        await self._close(deregister=True)
        log.info("worker %s stopped", c.name)
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    async def _close(self, deregister: bool = False) -> None:
        for t in self._tasks:
            t.cancel()
        for listener in self._listeners:
            await listener.close()
        if deregister and self.discovery is not None and not self._plane_down():
            try:
                await self.discovery.delete(self.config.name)
            except Exception:
                pass
        if self.client is not None:
            await self.client.close()
        if self.codec is not None:
            try:
                await self.codec.close()
            except Exception:
                pass
        if self.discovery is not None:
            await self.discovery.close()
        self.metrics.close()
        if self.plane is not None:
            try:
                await self.plane.close()
            except Exception:
                pass


def _safe_stats(host: OperatorHost) -> dict[str, Any]:
    try:
        return dict(host.operator.stats())
    except Exception as exc:
        return {"error": str(exc)}


def _host_address(nats_url: str | None = None) -> str:
    """The address peers reach this worker's data plane on.

    TDIST_HOST_ADDRESS wins. Otherwise, with a NATS server on another host, the local address of
    the route to it (a UDP socket's connect sends nothing); on one host, loopback.
    """
    explicit = os.environ.get("TDIST_HOST_ADDRESS")
    if explicit:
        return explicit
    from urllib.parse import urlparse

    host = urlparse(nats_url).hostname if nats_url else None
    if not host or host in ("localhost", "::1") or host.startswith("127."):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 4222))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def rank_from_env(env: dict[str, str] | None = None) -> int | None:
    env = dict(os.environ if env is None else env)
    for key in RANK_ENV:
        if env.get(key, "").strip().isdigit():
            return int(env[key])
    return None


def config_from_plan(plan_path: str, rank: int | None = None) -> WorkerConfig:
    """Pick this rank's WorkerConfig from a plan JSON (no import of tdist.plan: plain data)."""
    with open(plan_path) as fh:
        plan = json.load(fh)
    workers = plan["workers"]
    if rank is None:
        rank = rank_from_env()
    if rank is None:
        raise OperatorLoadError(f"--plan {plan_path}: no rank in the environment (looked at {', '.join(RANK_ENV)})")
    if not 0 <= rank < len(workers):
        raise OperatorLoadError(f"--plan {plan_path}: rank {rank} but the plan has {len(workers)} workers")
    return WorkerConfig.model_validate(workers[rank])


def _apply_placement(config: WorkerConfig) -> None:
    """Environment of the config; GPUs by local rank when the launcher did not pin them."""
    for k, v in config.env.items():
        os.environ.setdefault(k, v)
    if config.gpu_ids and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in config.gpu_ids)
    extra = os.environ.get("PYTHONPATH", "")
    for p in reversed([p for p in extra.split(os.pathsep) if p]):
        if p not in sys.path:
            sys.path.insert(0, p)


async def _amain(config: WorkerConfig) -> int:
    """Run the worker; a drain signal drains it once ready, and ends it at once while starting.

    Why: a worker still starting (an engine loading for minutes) has nothing to drain, and a stop
    during start-up must not wait for the load to finish. Its start is cancelled; the supervisor
    then ends what the operator had started (its process group).
    """
    worker = Worker(config)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_signal() -> None:
        if worker.state == "starting" and main is not None:
            log.warning("worker %s: stop signal during start-up; not waiting for it to finish", config.name)
            main.cancel()
        else:
            worker.request_stop()

    for sig in DRAIN_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        return await worker.run()
    except asyncio.CancelledError:
        return 0


def bind_to_owner(name: str) -> None:
    """Die with the launcher that started this worker (its supervisor, or mpirun / srun for a rank).

    Why: a worker whose owner is gone is unsupervised and unstoppable by `tdist stop`'s drain; it
    must not keep serving, and the engine processes or Triton server it started must not outlive
    it either. So the worker leads a process group of its own (local workers already do; a rank is
    moved into one) and, once its parent process exits, SIGKILLs that whole group. A worker run
    on its own (`--config`) is not bound: there the parent is whoever ran it.
    """
    from tdist.runtime.process_identity import end_own_group, watch_owner

    if os.getpgrp() != os.getpid():
        try:
            os.setpgid(0, 0)
        except OSError:
            pass  # a session leader, or not allowed: end_own_group then ends this process only

    def gone(owner: int) -> None:
        try:
            sys.stderr.write(f"tdist worker {name}: owner pid {owner} is gone; ending this worker and its children\n")
            sys.stderr.flush()
        finally:
            end_own_group()

    watch_owner(gone)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tdist.runtime.worker", description="Run one tdist worker.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="WorkerConfig JSON file")
    src.add_argument("--plan", help="Plan JSON; this process's config is workers[rank] (rank from MPI/Slurm env)")
    ap.add_argument("--rank", type=int, default=None, help="Override the rank taken from the environment")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("TDIST_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.config:
            with open(args.config) as fh:
                config = WorkerConfig.model_validate_json(fh.read())
        else:
            config = config_from_plan(args.plan, args.rank)
    except (OSError, ValueError, TdistError) as exc:
        print(f"tdist worker: bad config: {exc}", file=sys.stderr)
        return 2
    # The graph's python_path (config.env PYTHONPATH) comes first even when the launching
    # environment has a PYTHONPATH of its own (ranks of a world inherit mpirun's environment).
    for entry in reversed([e for e in config.env.get("PYTHONPATH", "").split(os.pathsep) if e]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    _apply_placement(config)
    if args.plan:
        bind_to_owner(config.name)
    try:
        return asyncio.run(_amain(config))
    except TdistError as exc:
        print(f"tdist worker {config.name}: {exc.render()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
