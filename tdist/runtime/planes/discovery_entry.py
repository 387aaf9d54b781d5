"""The worker's discovery entry, typed: what a worker publishes about itself and every reader
(request client, router, frontends, `tdist status`, the launchers' readiness waits) reads.

The wire format is the JSON object `WorkerEntry.to_wire()` writes (keys as below, unchanged from
the dicts of before), so readers that still index a dict keep working. Readers in runtime and
operators go through the model: `WorkerEntry.from_wire(d)` (unknown keys are kept, missing ones
take the defaults, so an older or newer worker's entry still reads).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: The worker states of ARCHITECTURE.md ("States"); a worker itself writes starting, ready,
#: draining or failed, the others are a reader's verdict.
WorkerState = Literal["starting", "ready", "draining", "restarting", "failed", "stale", "lost"]


class OperatorStatus(BaseModel):
    """One hosted operator's figures in its worker's entry (`per_operator[name]`)."""

    model_config = ConfigDict(extra="allow")

    inflight: int = Field(0, description="Requests executing now")
    queued: int = Field(0, description="Requests taken from the plane, waiting for a runner")
    served: int = Field(0, description="Requests answered without error since start")
    errors: int = Field(0, description="Requests that ended in an error since start")
    stats: dict[str, Any] = Field(default_factory=dict, description="The operator's own stats() (e.g. KV-cache use, model)")


class WorkerEntry(BaseModel):
    """One worker instance in discovery, refreshed every heartbeat."""

    model_config = ConfigDict(extra="allow")

    name: str = Field("", description="Instance name (`component.N`), the key of the entry")
    component: str = Field("", description="The graph worker it is a replica of")
    deployment: str = ""
    operators: list[str] = Field(default_factory=list, description="Operators it hosts")
    kinds: dict[str, str] = Field(default_factory=dict, description="Operator name → kind")
    roles: dict[str, str | None] = Field(default_factory=dict, description="Operator name → LLM role (both, context, generation)")
    host: str | None = Field(None, description="Host name of the process")
    pid: int | None = None
    rank: int | None = None
    state: WorkerState = "starting"
    error: str | None = Field(None, description="Why it failed (state failed)")
    inflight: int = Field(0, description="Requests executing or queued, all operators")
    served: int = 0
    errors: int = 0
    per_operator: dict[str, OperatorStatus] = Field(default_factory=dict)
    started_at: float | None = Field(None, description="time.time() at process start")
    heartbeat_at: float | None = Field(None, description="time.time() of this publication")
    metrics_port: int | None = None
    plane_reconnects: int = Field(0, description="Times this worker lost the request plane (NATS) and got it back")
    plane_last_outage_s: float | None = Field(
        None, description="Seconds this worker was cut off from the request plane the last time (it could not say "
        "so meanwhile: its entry tells once it can write again)")

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "WorkerEntry":
        return cls.model_validate(data)

    @classmethod
    def read(cls, data: Any) -> "WorkerEntry | None":
        """The entry, or None for something in discovery that is not a worker entry."""
        if isinstance(data, WorkerEntry):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError:
            return None

    def to_wire(self) -> dict[str, Any]:
        """The published dict. The request-plane outage keys appear once there was an outage to
        tell of, so what readers see of a worker that never lost NATS does not change."""
        data = self.model_dump(mode="json")
        if not self.plane_reconnects:
            data.pop("plane_reconnects", None)
            data.pop("plane_last_outage_s", None)
        return data

    # -- what readers ask ----------------------------------------------------------------------

    def serves(self, operator: str) -> bool:
        """Ready and hosting `operator`: requests for it may be sent here."""
        return self.state == "ready" and operator in self.operators

    def inflight_of(self, operator: str) -> int:
        """Requests in flight for `operator` (running + queued); the worker's total if it has no
        per-operator figures."""
        st = self.per_operator.get(operator)
        if st is not None:
            return st.inflight + st.queued
        return self.inflight

    def stats_of(self, operator: str) -> dict[str, Any]:
        st = self.per_operator.get(operator)
        return st.stats if st is not None else {}

    def role_of(self, operator: str) -> str:
        return str(self.roles.get(operator) or self.stats_of(operator).get("role") or "both")

    def identity(self) -> tuple[Any, ...]:
        """Which process this is (a restarted worker keeps its name but not this)."""
        return (self.host, self.pid, self.started_at)
