"""What a router decides with: candidates (live instances as discovery shows them), route keys,
pure policies (`select(key, candidates)`) and the failure cool-down.

Apart from the forwarding loop (router.py) and the disaggregated flow (disagg.py), which both
use them, so policies stay unit-testable without any plane and neither of those imports the other.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from tdist.errors import OperatorLoadError
from tdist.operators.routing.kv_routing import KvAware
from tdist.runtime.planes.discovery_entry import WorkerEntry

# ---------------------------------------------------------------------------------------------
# instances as the router sees them


@dataclass(frozen=True)
class Candidate:
    """One live instance of the target operator."""

    name: str
    reported_inflight: int = 0  # from its discovery entry (lags by a heartbeat)
    local_inflight: int = 0  # requests this router has outstanding there now
    role: str = "both"
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def load(self) -> int:
        return max(self.reported_inflight, self.local_inflight)


def _entry(entry: WorkerEntry | dict[str, Any]) -> WorkerEntry:
    return entry if isinstance(entry, WorkerEntry) else WorkerEntry.from_wire(entry)


def inflight_of(entry: WorkerEntry | dict[str, Any], operator: str) -> int:
    """Requests in flight (running + queued) for `operator` on a worker, from its discovery entry."""
    return _entry(entry).inflight_of(operator)


def operator_stats(entry: WorkerEntry | dict[str, Any], operator: str) -> dict[str, Any]:
    """The operator's own stats() block inside a discovery entry (empty if not published)."""
    return _entry(entry).stats_of(operator)


def role_of(entry: WorkerEntry | dict[str, Any], operator: str) -> str:
    return _entry(entry).role_of(operator)


# ---------------------------------------------------------------------------------------------
# policies (pure)


@dataclass(frozen=True)
class RouteKey:
    """What a policy may look at: the routing text (prompt / flattened messages), its length in
    tokens and its prefix-block hashes (filled when the policy or disaggregation needs them)."""

    text: str = ""
    tokens: int = 0
    blocks: tuple[int, ...] = ()


class Policy(Protocol):
    name: str

    def select(self, key: RouteKey, candidates: list[Candidate]) -> Candidate:
        """Pick one of a non-empty list of healthy candidates."""


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, key: RouteKey, candidates: list[Candidate]) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.name)
        return ordered[next(self._counter) % len(ordered)]


class LeastLoaded:
    name = "least_loaded"

    def __init__(self) -> None:
        self._tiebreak = itertools.count()

    def select(self, key: RouteKey, candidates: list[Candidate]) -> Candidate:
        low = min(c.load for c in candidates)
        tied = sorted((c for c in candidates if c.load == low), key=lambda c: c.name)
        return tied[next(self._tiebreak) % len(tied)]  # rotate among equals, not always the first


def _score(key: str, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\x00{name}".encode(), digest_size=8).digest(), "big")


class PrefixAffinity:
    """Same prefix → same instance while it is a candidate; new prefixes by rendezvous hashing."""

    name = "prefix"

    def __init__(self, prefix_chars: int = 64, table_size: int = 10000) -> None:
        if prefix_chars < 1:
            raise ValueError("prefix_chars must be ≥ 1")
        self.prefix_chars = prefix_chars
        self.table_size = table_size
        self._sticky: OrderedDict[str, str] = OrderedDict()

    def prefix(self, key: RouteKey) -> str:
        return key.text[: self.prefix_chars]

    def select(self, key: RouteKey, candidates: list[Candidate]) -> Candidate:
        p = self.prefix(key)
        by_name = {c.name: c for c in candidates}
        held = self._sticky.get(p)
        if held in by_name:
            self._sticky.move_to_end(p)
            return by_name[held]
        chosen = max(candidates, key=lambda c: _score(p, c.name))
        self._sticky[p] = chosen.name
        self._sticky.move_to_end(p)
        while len(self._sticky) > self.table_size:
            self._sticky.popitem(last=False)
        return chosen


POLICIES = ("round_robin", "least_loaded", "prefix", "kv")


def make_policy(name: str, parameters: dict[str, Any] | None = None) -> Policy:
    parameters = parameters or {}
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "prefix":
        return PrefixAffinity(prefix_chars=int(parameters.get("prefix_chars", 64)))
    if name == "kv":
        return KvAware(load_weight=float(parameters.get("load_weight", 1.0)),
                       max_load_gap=int(parameters.get("max_load_gap", 4)),
                       index_blocks=int(parameters.get("kv_index_blocks", 20000)))
    raise OperatorLoadError(f"router policy {name!r} unknown; use one of {', '.join(POLICIES)}")


# ---------------------------------------------------------------------------------------------
# health


class Health:
    """Instances that failed recently are skipped until their cool-down ends."""

    def __init__(self, cooldown_s: float = 5.0) -> None:
        self.cooldown_s = cooldown_s
        self._until: dict[str, float] = {}
        self.failures: dict[str, int] = {}

    def fail(self, name: str) -> None:
        self._until[name] = time.monotonic() + self.cooldown_s
        self.failures[name] = self.failures.get(name, 0) + 1

    def ok(self, name: str) -> None:
        self._until.pop(name, None)

    def healthy(self, names: Iterable[str]) -> list[str]:
        now = time.monotonic()
        return [n for n in names if self._until.get(n, 0.0) <= now]
