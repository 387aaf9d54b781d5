"""Discovery: who serves what. One entry per worker instance, gone when its heartbeats stop.

A small protocol with three implementations: NATS KV (a bucket per deployment whose TTL expires
entries), etcd with leases (planes/discovery_etcd.py, lazily imported), and in-memory for unit
tests of the layers above.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Protocol

from tdist.runtime.config import DiscoveryConfig
from tdist.runtime.planes.discovery_entry import WorkerEntry


class Discovery(Protocol):
    async def put(self, key: str, entry: dict[str, Any]) -> None:
        """Register or refresh `key`; the entry disappears ttl_s after its last put."""

    async def delete(self, key: str) -> None:
        """Remove `key` now (clean shutdown)."""

    async def list(self) -> dict[str, dict[str, Any]]:
        """Every live entry, key → entry."""

    async def close(self) -> None:
        """Release connections and leases (not the entries of other processes)."""


def bucket_name(deployment: str) -> str:
    """NATS KV bucket for a deployment (bucket names allow [A-Za-z0-9_-])."""
    return "tdist_" + re.sub(r"[^A-Za-z0-9_-]", "_", deployment)


class MemoryDiscovery:
    """In-process discovery for unit tests; honours ttl_s like the real ones."""

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}

    async def put(self, key: str, entry: dict[str, Any]) -> None:
        self._entries[key] = (time.monotonic() + self.ttl_s, dict(entry))

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def list(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {k: dict(v) for k, (exp, v) in self._entries.items() if exp > now}

    async def close(self) -> None:
        pass


class NatsKVDiscovery:
    """Discovery on a NATS JetStream KV bucket `tdist_<deployment>` with a TTL.

    Reads come from a local view kept current by one KV watcher (initial values, then every put
    and delete as it happens): `list()` costs no round trip and never sees a half-read listing,
    however loaded the server is. Entries that carry `heartbeat_at` and have not been refreshed
    for ttl_s are left out: the bucket's max-age expiry removes them without telling watchers.
    """

    def __init__(self, js: Any, deployment: str, ttl_s: float = 5.0, storage: str = "file") -> None:
        self._js = js
        self.deployment = deployment
        self.ttl_s = ttl_s
        self.storage = storage  # file: the bucket survives a nats-server restart
        self._kv: Any = None
        self._view: dict[str, dict[str, Any]] = {}
        self._watcher: Any = None
        self._follow_task: Any = None
        self._ready: Any = None
        self._starting: Any = None  # the task starting the view (shared by concurrent first listings)

    async def _bucket(self) -> Any:
        if self._kv is None:
            from nats.js.api import KeyValueConfig, StorageType

            name = bucket_name(self.deployment)
            try:
                self._kv = await self._js.key_value(name)
            except Exception:
                self._kv = await self._js.create_key_value(
                    KeyValueConfig(bucket=name, ttl=self.ttl_s, history=1,
                                   storage=StorageType.MEMORY if self.storage == "memory" else StorageType.FILE)
                )
        return self._kv

    async def reconnected(self) -> None:
        """After a reconnect (the server may have restarted): the bucket may be gone (memory
        storage) and the watcher's consumer with it, so both are re-created, the view at once."""
        self._kv = None
        had_view = self._follow_task is not None
        self._starting = None
        await self._stop_view()
        await self._bucket()
        if had_view:
            await self._ensure_view()

    async def put(self, key: str, entry: dict[str, Any]) -> None:
        kv = await self._bucket()
        await kv.put(key, json.dumps(entry).encode())

    async def delete(self, key: str) -> None:
        kv = await self._bucket()
        try:
            await kv.purge(key)
        except Exception:
            pass

    async def _start_view(self) -> None:
        import asyncio

        await self._stop_view()
        kv = await self._bucket()
        self._ready = asyncio.Event()
        # One ordered consumer per view (not one per listing: the stream caps consumers at 1000);
        # a view whose process died without closing it is reaped by the server after 30 s.
        self._watcher = await kv.watchall(inactive_threshold=30.0)
        self._follow_task = asyncio.create_task(self._follow(self._watcher, self._ready))
        await asyncio.wait_for(self._ready.wait(), 10.0)

    async def _follow(self, watcher: Any, ready: Any) -> None:
        async for item in watcher:
            if item is None:  # the initial values are all in
                ready.set()
                continue
            if item.operation in ("DEL", "PURGE") or not item.value:
                self._view.pop(item.key, None)
                continue
            try:
                self._view[item.key] = json.loads(item.value)
            except ValueError:
                continue

    def _view_live(self, loop: Any) -> bool:
        task = self._follow_task
        return (task is not None and not task.done() and task.get_loop() is loop
                and self._ready is not None and self._ready.is_set())

    async def _ensure_view(self) -> None:
        """Start the view once, whoever asks first; concurrent first listings all wait for the
        same start, so none of them reads a view whose initial values are not all in."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._view_live(loop):
            return
        start = self._starting
        if start is None or start.get_loop() is not loop or (start.done() and not self._view_live(loop)):
            start = self._starting = loop.create_task(self._start_view())
        await asyncio.shield(start)

    async def list(self) -> dict[str, dict[str, Any]]:
        await self._ensure_view()
        now = time.time()
        return {k: dict(v) for k, v in self._view.items() if _fresh(v, now, self.ttl_s)}

    async def _stop_view(self) -> None:
        if self._follow_task is not None:
            try:
                self._follow_task.cancel()
            except RuntimeError:  # started on an event loop that is closed now
                pass
            self._follow_task = None
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except Exception:
                pass
            self._watcher = None
        self._view = {}
        self._ready = None

    async def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            try:
                self._starting.cancel()
            except RuntimeError:
                pass
        self._starting = None
        await self._stop_view()
        self._kv = None


def _fresh(data: dict[str, Any], now: float, ttl_s: float) -> bool:
    """Refreshed within ttl_s, for entries that say when (worker entries: `heartbeat_at`)."""
    entry = WorkerEntry.read(data)
    beat = entry.heartbeat_at if entry is not None else None
    return beat is None or now - beat <= ttl_s


def make_discovery(config: DiscoveryConfig, deployment: str, *, js: Any = None, storage: str = "file") -> Discovery:
    """Build the configured discovery. NATS KV needs the JetStream context of the request plane
    (and its storage: the bucket lives where the work queue does)."""
    if config.kind == "nats":
        if js is None:
            raise ValueError("NATS KV discovery needs a JetStream context")
        return NatsKVDiscovery(js, deployment, ttl_s=config.ttl_s, storage=storage)
    if config.kind == "etcd":
        import os

        from tdist.runtime.planes.discovery_etcd import EtcdDiscovery

        endpoints = list(config.etcd_endpoints) or [
            e for e in os.environ.get("ETCD_ENDPOINTS", "").split(",") if e.strip()
        ]
        if not endpoints:
            raise ValueError("etcd discovery needs endpoints: set discovery.etcd_endpoints or ETCD_ENDPOINTS")
        return EtcdDiscovery(endpoints, deployment, ttl_s=config.ttl_s)
    raise ValueError(f"unknown discovery kind {config.kind!r}")
