"""Discovery on etcd with leases (the way the seeds use etcd), through the async client `aetcd`.

Layout: `/tdist/<deployment>/workers/<key>` → JSON entry. Each process holds ONE lease (TTL =
ttl_s, rounded up to whole seconds as etcd grants them); every key it puts is attached to it, and
every `put` also sends a keepalive. So a process that stops heart-beating — killed, hung, cut off —
loses its lease after ttl_s and etcd deletes all its keys at once; `close()` revokes the lease so
a clean shutdown leaves discovery immediately. If the lease expired while we were alive (e.g. a
long GC pause), the next `put` grants a new lease and re-registers every key this process owns.

Imported lazily by `make_discovery` so `aetcd`/grpc are only needed with `discovery: etcd`.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any
from urllib.parse import urlsplit


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """`http://host:port`, `host:port` or `host` → (host, port); etcd's client port is 2379."""
    text = endpoint.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", ""):
        raise ValueError(f"etcd endpoint {endpoint!r}: only plain http endpoints are supported (no TLS)")
    return parts.hostname or "127.0.0.1", parts.port or 2379


def workers_prefix(deployment: str) -> str:
    return f"/tdist/{deployment}/workers/"


class EtcdDiscovery:
    """`Discovery` on etcd: a lease per process, keys under `/tdist/<deployment>/workers/`."""

    def __init__(self, endpoints: list[str], deployment: str, ttl_s: float = 5.0, *, timeout_s: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("etcd discovery needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.deployment = deployment
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.prefix = workers_prefix(deployment)
        self._client: Any = None
        self._lease: Any = None
        self._owned: dict[str, bytes] = {}
        self._lock = asyncio.Lock()

    @property
    def lease_ttl_s(self) -> int:
        """etcd grants whole seconds (and at least ~2 s with default election settings)."""
        return max(1, math.ceil(self.ttl_s))

    @property
    def lease_id(self) -> int | None:
        return None if self._lease is None else int(self._lease.id)

    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    async def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        import aetcd

        errors: list[str] = []
        for ep in self.endpoints:
            host, port = parse_endpoint(ep)
            client = aetcd.Client(host=host, port=port, timeout=self.timeout_s)
            try:
                # A real round trip: aetcd's connect() only builds the channel.
                await asyncio.wait_for(client.status(), self.timeout_s)
            except Exception as e:  # noqa: BLE001 - try the next endpoint, report all
                errors.append(f"{ep}: {type(e).__name__}: {e}".rstrip(": "))
                try:
                    await client.close()
                except Exception:  # noqa: BLE001
                    pass
                continue
            self._client = client
            return client
        raise ConnectionError(
            "etcd unreachable at " + ", ".join(self.endpoints) + " (" + "; ".join(errors) + ")."
            " Is etcd running? Set discovery.etcd_endpoints or ETCD_ENDPOINTS."
        )

    async def _grant(self) -> Any:
        client = await self._connect()
        self._lease = await client.lease(self.lease_ttl_s)
        # Re-attach every key this process owns (they went with the old lease).
        for k, v in self._owned.items():
            await client.put(self._key(k), v, lease=self._lease)
        return self._lease

    async def put(self, key: str, entry: dict[str, Any]) -> None:
        """Register or refresh `key` (and keep this process's lease alive)."""
        value = json.dumps(entry, separators=(",", ":")).encode()
        async with self._lock:
            client = await self._connect()
            fresh = self._lease is None
            lease = self._lease or await self._grant()
            self._owned[key] = value
            try:
                await client.put(self._key(key), value, lease=lease)
            except Exception as e:  # noqa: BLE001
                if "lease not found" not in str(e):
                    raise
                # The lease expired under us: etcd dropped our keys; put them back on a new one.
                await self._grant()
                return
            if not fresh:
                reply = await client.refresh_lease(lease.id)
                if reply is None or int(getattr(reply, "TTL", 0)) <= 0:
                    # The lease expired under us: etcd dropped our keys; put them back on a new one.
                    await self._grant()

    async def delete(self, key: str) -> None:
        async with self._lock:
            self._owned.pop(key, None)
            client = await self._connect()
            await client.delete(self._key(key))

    async def list(self) -> dict[str, dict[str, Any]]:
        client = await self._connect()
        rng = await client.get_prefix(self.prefix.encode())
        out: dict[str, dict[str, Any]] = {}
        n = len(self.prefix)
        for kv in rng:
            try:
                out[kv.key.decode()[n:]] = json.loads(kv.value)
            except (ValueError, UnicodeDecodeError):
                continue
        return out

    async def close(self) -> None:
        """Revoke this process's lease (its keys leave now) and close the connection."""
        async with self._lock:
            client, lease = self._client, self._lease
            self._client, self._lease = None, None
            self._owned.clear()
            if client is None:
                return
            try:
                if lease is not None:
                    await asyncio.wait_for(client.revoke_lease(lease.id), self.timeout_s)
            except Exception:  # noqa: BLE001 - best effort: the lease expires anyway
                pass
            finally:
                await client.close()
