"""WorkerConfig: the contract between `plan` and the runtime.

A worker process starts from `python -m tdist.runtime.worker --plan plan.json --rank N` and takes
`workers[N]` of the plan; everything it needs is in this plain data (no code, no live objects), so every WorkerConfig survives a JSON
round trip (`WorkerConfig.model_validate_json(cfg.model_dump_json()) == cfg`).
The runtime never imports spec/plan/launch/cli: this module is the only shape they share.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OperatorKind = Literal["python", "triton", "vllm", "trtllm", "router", "frontend"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RequestPlaneConfig(_Frozen):
    """Where the NATS request plane is. `url=None` means: take NATS_SERVER from the environment."""

    url: str | None = Field(None, description="NATS URL, e.g. nats://127.0.0.1:4222; None → $NATS_SERVER")
    ack_wait_s: float = Field(5.0, description="JetStream ack wait; an unacked request is redelivered after it")
    max_deliver: int = Field(3, description="Deliveries of one request before it is dropped as poison")
    heartbeat_interval_s: float = Field(1.0, description="How often a worker refreshes its discovery entry")
    default_timeout_s: float = Field(60.0, description="Deadline given to a request that names none")
    storage: Literal["file", "memory"] = Field("file", description="JetStream storage of the work-queue stream and the discovery bucket (file: survives a server restart)")


class DataPlaneConfig(_Frozen):
    """How tensors move between workers (issue: data plane)."""

    kind: Literal["auto", "inline", "ucx", "shm"] = Field("auto", description="auto picks shm on one host, UCX across hosts")
    inline_threshold_bytes: int = Field(131072, description="Tensors up to this size travel inside the NATS message (128 KiB: where inline and shared memory break even through NATS, docs/benchmarks.md)")
    lease_s: float = Field(60.0, description="A stored tensor not released by its consumer is freed after this")
    ucx_env: dict[str, str] = Field(default_factory=dict, description="UCX_* settings (UCX_TLS, UCX_NET_DEVICES, ...)")


class DiscoveryConfig(_Frozen):
    """Where workers register. NATS KV (per-deployment bucket) or etcd with leases."""

    kind: Literal["nats", "etcd"] = Field("nats", description="Discovery backend")
    etcd_endpoints: list[str] = Field(default_factory=list, description="etcd endpoints; empty → $ETCD_ENDPOINTS")
    ttl_s: float = Field(5.0, description="An entry with no heartbeat for this long disappears")


class OperatorConfig(_Frozen):
    """One operator hosted by a worker, with everything needed to construct it."""

    name: str = Field(description="Operator name in the graph; requests address it by this name")
    kind: OperatorKind = Field("python", description="Which built-in runs it")
    implementation: str | None = Field(None, description='"pkg.mod:Class" for python operators')
    version: int = Field(1, description="Operator / model version")
    max_inflight_requests: int = Field(1, ge=1, description="Requests this worker runs at once for this operator")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Free-form, passed to the operator")
    log_level: str = Field("INFO", description="Python logging level for this operator")
    # Triton core models
    repository: str | None = Field(None, description="Triton model repository (kind: triton)")
    model_name: str | None = Field(None, description="Model name in the repository (default: operator name)")
    triton_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides merged into the model's config (instance_group, parameters, max_batch_size)",
    )
    # LLM engines
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Engine args (vllm / trtllm)")
    role: Literal["both", "context", "generation"] = Field("both", description="LLM worker role in disaggregated serving")
    # Router / frontend
    targets: list[str] = Field(default_factory=list, description="Operators a router/frontend forwards to")


class WorkerConfig(_Frozen):
    """One worker process: what it hosts, where it connects, how it is placed."""

    name: str = Field(description='Instance name, "{component}.{i}"; unique within the deployment')
    component: str = Field(description="The worker group (graph `workers[].name`)")
    replica: int = Field(0, ge=0, description="Index within the component")
    deployment: str = Field(description="Namespace for subjects, streams and discovery keys")
    operators: list[OperatorConfig] = Field(description="Operators this process hosts")
    request_plane: RequestPlaneConfig = Field(default_factory=RequestPlaneConfig)
    data_plane: DataPlaneConfig = Field(default_factory=DataPlaneConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the process")
    gpu_ids: list[int] = Field(default_factory=list, description="GPUs this process sees (CUDA_VISIBLE_DEVICES)")
    gpu_fraction: float | None = Field(None, description="Share of each GPU this process may use")
    cpu_ids: list[int] = Field(default_factory=list, description="CPU cores to bind to (empty: no binding)")
    metrics_port: int | None = Field(None, description="Prometheus port; 0 picks a free one; None disables")
    log_path: str | None = Field(None, description="Where the launcher writes this process's log")
    host: str | None = Field(None, description="Node the plan places it on (None: any / local)")
    rank: int | None = Field(None, description="MPI/Slurm rank when launched as one world")
    world_size: int | None = Field(None, description="Ranks in the world")
    local_rank: int | None = Field(None, description="Rank on its node (GPU choice under mpirun/srun)")
    node_index: int | None = Field(None, description="Index of the node the plan places it on (0: the launch node)")
    instance: int | None = Field(None, description="LLM engine instance this rank belongs to (index within the component)")
    instance_rank: int | None = Field(None, description="Rank within its engine instance (0: the leader that serves requests)")
    instance_size: int | None = Field(None, description="Ranks in its engine instance (tp_size x pp_size)")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> "WorkerConfig":
        return cls.model_validate_json(text)
