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
    """Discovery on a NATS JetStream KV bucket `tdist_<deployment>` with a TTL."""

    def __init__(self, js: Any, deployment: str, ttl_s: float = 5.0) -> None:
        self._js = js
        self.deployment = deployment
        self.ttl_s = ttl_s
        self._kv: Any = None

    async def _bucket(self) -> Any:
        if self._kv is None:
            from nats.js.api import KeyValueConfig, StorageType

            name = bucket_name(self.deployment)
            try:
                self._kv = await self._js.key_value(name)
            except Exception:
                self._kv = await self._js.create_key_value(
                    KeyValueConfig(bucket=name, ttl=self.ttl_s, history=1, storage=StorageType.MEMORY)
                )
        return self._kv

    async def put(self, key: str, entry: dict[str, Any]) -> None:
        kv = await self._bucket()
        await kv.put(key, json.dumps(entry).encode())

    async def delete(self, key: str) -> None:
        kv = await self._bucket()
        try:
            await kv.purge(key)
        except Exception:
            pass

    async def list(self) -> dict[str, dict[str, Any]]:
        from nats.js.errors import NoKeysError

        kv = await self._bucket()
        try:
            keys = await self._keys()
        except NoKeysError:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for key in keys:
            try:
                ent = await kv.get(key)
            except Exception:  # expired or deleted between keys() and get()
                continue
            if ent is None or not ent.value:
                continue
            try:
                out[key] = json.loads(ent.value)
            except ValueError:
                continue
        return out

    async def _keys(self) -> list[str]:
        """Live keys from the stream's per-subject counts: no consumer per call.

        `kv.keys()` opens an ephemeral consumer every call that the server keeps ~5 min; polling
        (the supervisor's 10 Hz wait for ready, routers) hit the 1000-consumer cap of the stream
        within ~100 s of a slow start, after which every list() failed and the deployment never
        became ready. Deleted / purged keys have no message left and do not appear."""
        from nats.js.errors import NoKeysError

        name = bucket_name(self.deployment)
        info = await self._js.stream_info(f"KV_{name}", subjects_filter=f"$KV.{name}.>")
        subjects = info.state.subjects or {}
        prefix = f"$KV.{name}."
        keys = [s[len(prefix):] for s in subjects if s.startswith(prefix)]
        if not keys:
            raise NoKeysError
        return keys

    async def close(self) -> None:
        self._kv = None


def make_discovery(config: DiscoveryConfig, deployment: str, *, js: Any = None) -> Discovery:
    """Build the configured discovery. NATS KV needs the JetStream context of the request plane."""
    if config.kind == "nats":
        if js is None:
            raise ValueError("NATS KV discovery needs a JetStream context")
        return NatsKVDiscovery(js, deployment, ttl_s=config.ttl_s)
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
