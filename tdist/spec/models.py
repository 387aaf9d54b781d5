"""The graph YAML schema: frozen pydantic models, unknown keys forbidden, a description on every field.

These models check what one field (or one object) can check on its own; rules that relate several
parts of the graph (references, placement, ports) live in `tdist.spec.checks`. Shorthands the
user may write (`request_plane: embedded`, `discovery: etcd`, `operators: encoder`) are expanded
by before-validators, so the validated objects always have one shape. Operators, one model per
`kind`, live in `tdist.spec.operators`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import AliasChoices, Field, PrivateAttr, field_validator, model_validator

from tdist.names import NAME_PATTERN  # names become subjects, streams and run directories
from tdist.spec import limits as L
from tdist.spec.base import SpecModel
from tdist.spec.operators import OperatorSpec  # one model per operator kind (tdist/spec/operators.py)


# ---------------------------------------------------------------- planes


class RequestPlaneSpec(SpecModel):
    """Where requests travel: a NATS server tdist starts (`embedded`) or an existing one."""

    url: str = Field("embedded", description="`embedded` (tdist starts nats-server) or a nats:// / tls:// URL")
    ack_wait_s: float = Field(5.0, gt=0, description="Seconds before an unacknowledged request is redelivered")
    max_deliver: int = Field(3, ge=1, description="Deliveries of one request before it is dropped as poison")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="Seconds between a worker's discovery heartbeats")
    default_timeout_s: float = Field(60.0, gt=0, description="Deadline in seconds for requests that name none")
    storage: Literal["file", "memory"] = Field(
        "file", description="Where the work-queue stream and the discovery bucket live: `file` survives a "
        "nats-server restart (accepted requests are kept); `memory` is faster but loses them")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"url": data} if isinstance(data, str) else data

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if v != "embedded" and not re.fullmatch(r"(nats|tls)://[^\s/]+", v):
            raise ValueError("must be `embedded` or a URL like nats://host:4222")
        return v


class DataPlaneSpec(SpecModel):
    """How tensors move between workers."""

    kind: Literal["auto", "inline", "ucx", "shm"] = Field(
        "auto", description="auto: shared memory on one host, UCX across hosts; inline: always inside the message"
    )
    inline_threshold_bytes: int = Field(131072, ge=0, description="Tensors up to this many bytes travel inline")
    lease_s: float = Field(60.0, gt=0, description="Seconds a stored tensor waits for its consumer before it is freed")
    ucx_env: dict[str, str] = Field(default_factory=dict, description="UCX_* environment (UCX_TLS, UCX_NET_DEVICES, ...)")

    @field_validator("ucx_env")
    @classmethod
    def _ucx_keys(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not k.startswith("UCX_")]
        if bad:
            raise ValueError(f"keys must start with UCX_ (found {bad[0]!r})")
        return v


class DiscoverySpec(SpecModel):
    """Where workers register: NATS KV (default) or etcd."""

    kind: Literal["nats", "etcd"] = Field("nats", description="Discovery backend")
    etcd_endpoints: list[str] | Literal["embedded"] = Field(
        "embedded", description="etcd only: `embedded` (tdist starts etcd) or a list of http(s):// endpoints"
    )
    ttl_s: float = Field(5.0, gt=0, description="Seconds without a heartbeat before a worker's entry disappears")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data

    @field_validator("etcd_endpoints")
    @classmethod
    def _check_endpoints(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list):
            if not v:
                raise ValueError("must list at least one endpoint, or be `embedded`")
            for ep in v:
                if not re.fullmatch(r"https?://[^\s/]+", ep):
                    raise ValueError(f"endpoint {ep!r} must look like http://host:2379")
        return v


# ---------------------------------------------------------------- workers


class PlacementSpec(SpecModel):
    """Where one worker process runs and which devices it sees."""

    gpus: int = Field(0, ge=0, le=L.MAX_GPUS_PER_NODE, description="GPUs per process; tdist picks which (0: CPU only)")
    gpu_ids: list[int] | None = Field(None, description="Exact GPU ids per process instead of a count")
    gpu_fraction: float | None = Field(
        None, gt=0, le=1, description="Share of each GPU a process uses; processes may share a GPU up to 1.0"
    )
    cpu_ids: list[int] = Field(default_factory=list, description="CPU cores to bind the process to")
    node: int | None = Field(None, ge=0, description="Node index (into cluster) to place the processes on")

    @field_validator("gpu_ids")
    @classmethod
    def _ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if any(i < 0 for i in v):
                raise ValueError("GPU ids are >= 0")
            if len(set(v)) != len(v):
                raise ValueError("GPU ids must not repeat")
        return v


class WorkerSpec(SpecModel):
    """A group of identical worker processes hosting one or more operators."""

    name: str = Field(pattern=NAME_PATTERN, description='Worker group name; processes are "{name}.{i}"')
    operators: list[str] = Field(min_length=1, description="Names of the operators each process hosts")
    replicas: int = Field(1, ge=1, le=L.MAX_REPLICAS, description="How many processes of this worker run")
    placement: PlacementSpec = Field(default_factory=PlacementSpec, description="Devices and node")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for these processes")

    @field_validator("operators", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


# ---------------------------------------------------------------- LLM layouts


class ServerSetSpec(SpecModel):
    """A set of identical LLM engine instances (the seed's context_servers / generation_servers)."""

    num_instances: int = Field(1, ge=1, le=L.MAX_INSTANCES, description="Engine instances in this set")
    tp_size: int = Field(
        1, ge=1, le=L.MAX_PARALLEL_SIZE, validation_alias=AliasChoices("tp_size", "tensor_parallel_size"),
        description="Tensor-parallel ranks per instance"
    )
    pp_size: int = Field(
        1, ge=1, le=L.MAX_PARALLEL_SIZE, validation_alias=AliasChoices("pp_size", "pipeline_parallel_size"),
        description="Pipeline-parallel ranks per instance"
    )
    gpu_fraction: float | None = Field(
        None, gt=0, le=1, description="Share of each GPU a rank uses (lets ranks share GPUs); vLLM: its gpu_memory_utilization "
        "(GPU clusters only), TensorRT-LLM: kv_cache_config.free_gpu_memory_fraction")
    urls: list[str] = Field(default_factory=list, description='Optional "host:port" per instance; the host places it')
    kv_cache_config: dict[str, Any] = Field(default_factory=dict, description="TensorRT-LLM KV-cache settings, passed as is")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Engine args for this set (over llm.engine_args)")
    operator: str | None = Field(None, pattern=NAME_PATTERN, description="Operator name (default: llm/context/generation)")
    max_inflight_requests: int = Field(16, ge=1, description="Requests one instance runs at once")

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        # the message names the entry, not its value: a layout file's values are never shown
        for i, u in enumerate(v):
            m = re.fullmatch(r"[A-Za-z0-9_.-]+:(\d{1,5})", u)
            if not m:
                raise ValueError(f"urls[{i}] must be host:port")
            if not 1 <= int(m.group(1)) <= 65535:
                raise ValueError(f"urls[{i}]: the port must be 1..65535")
        return v

    @property
    def ranks_per_instance(self) -> int:
        return self.tp_size * self.pp_size


class DisaggLayoutFile(SpecModel):
    """The seed's disaggregated server layout file (configs/*.yaml), referenced by `llm.layout_file`."""

    model: str | None = Field(None, description="Model path or hub id")
    hostname: str | None = Field(None, description="Where the serving frontend listens")
    port: int | None = Field(None, ge=0, le=65535, description="Frontend TCP port")
    backend: str | None = Field(None, description='TensorRT-LLM backend, e.g. "pytorch"')
    context_servers: ServerSetSpec | None = Field(None, description="Prefill (context) servers")
    generation_servers: ServerSetSpec | None = Field(None, description="Decode (generation) servers")


class LLMSpec(SpecModel):
    """An LLM served by engine instances: monolithic (`servers`) or disaggregated (context + generation)."""

    model: str | None = Field(None, description="Model path (relative to the YAML if it starts with . or /) or hub id")
    engine: Literal["vllm", "trtllm"] = Field("vllm", description="Engine that runs the model")
    backend: str | None = Field(None, description='TensorRT-LLM backend, e.g. "pytorch" (vLLM: only pytorch, which it always is)')
    hostname: str | None = Field(None, description="Default listen address for the frontend")
    port: int | None = Field(None, ge=0, le=65535, description="Default TCP port for the frontend")
    layout_file: str | None = Field(None, description="Seed-style layout YAML (relative to this YAML); graph keys win")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Engine args for every server set")
    router: str | None = Field(None, description="Router operator in front of the servers (default: the only router)")
    servers: ServerSetSpec | None = Field(None, description="Monolithic servers (prefill and decode in one engine)")
    context_servers: ServerSetSpec | None = Field(None, description="Disaggregated prefill servers")
    generation_servers: ServerSetSpec | None = Field(None, description="Disaggregated decode servers")

    def server_sets(self) -> list[tuple[str, str, ServerSetSpec]]:
        """(yaml key, role, set) for each declared set, in rank order."""
        out = []
        for key, role in (("servers", "both"), ("context_servers", "context"), ("generation_servers", "generation")):
            s = getattr(self, key)
            if s is not None:
                out.append((key, role, s))
        return out


# ---------------------------------------------------------------- cluster and launch


class ClusterSpec(SpecModel):
    """The machines the graph runs on (used for placement checks and multi-node launches)."""

    nodes: int = Field(1, ge=1, le=L.MAX_NODES, description="Number of nodes")
    gpus_per_node: int = Field(0, ge=0, le=L.MAX_GPUS_PER_NODE, description="GPUs on each node (0: CPU-only)")
    cpus_per_node: int = Field(
        0, ge=0, le=L.MAX_CPUS_PER_NODE,
        description="CPU cores on each node. On a CPU-only cluster (gpus_per_node 0) the plan then gives every "
        "LLM engine its own cores (its worker's cpu_ids), context engines apart from the rest; 0: the plan "
        "binds nothing (vLLM's own binding, or the operator's parameters.cpu_bind)")
    hosts: list[str] = Field(default_factory=list, description="Node hostnames, one per node (optional)")

    @model_validator(mode="after")
    def _bounded(self) -> "ClusterSpec":
        # placement keeps a counter per GPU and a core list per node: bound the products, not only the factors
        if self.nodes * self.gpus_per_node > L.MAX_CLUSTER_GPUS:
            raise ValueError(f"nodes x gpus_per_node is {self.nodes * self.gpus_per_node:,}; at most {L.MAX_CLUSTER_GPUS:,} GPUs")
        if self.nodes * self.cpus_per_node > L.MAX_CLUSTER_CPUS:
            raise ValueError(f"nodes x cpus_per_node is {self.nodes * self.cpus_per_node:,}; at most {L.MAX_CLUSTER_CPUS:,} cores")
        return self


class LocalLaunchSpec(SpecModel):
    """Settings for `--launcher local` (processes on this machine)."""

    log_dir: str = Field("logs", description="Worker logs directory (relative to the run directory)")
    metrics_port_base: int = Field(0, ge=0, le=65535, description="Metrics port of worker 0 (worker i: base+i); 0: each picks a free one")
    startup_timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for all workers to report ready")
    restart_on_crash: bool = Field(True, description="Restart a worker that dies unexpectedly")
    restart_max_crashes: int = Field(
        5, ge=1, le=1000,
        description="Crashes within restart_window_s after which a worker is not restarted again: it is `failed`, "
        "the deployment `degraded`, and `tdist status` shows the tail of its last log. Restarts back off "
        "1 s, 2 s, 4 s, ... (at most 30 s) by the crashes in the window. Applies to every worker a tdist "
        "supervisor restarts (local workers, a world's service workers)")
    restart_window_s: float = Field(
        300.0, gt=0, le=86400,
        description="Seconds over which restart_max_crashes counts a worker's crashes; older crashes are forgotten")


class MpirunLaunchSpec(SpecModel):
    """Settings for `--launcher mpirun`."""

    allow_run_as_root: bool | None = Field(None, description="Pass --allow-run-as-root (default: when running as root)")
    oversubscribe: bool = Field(False, description="Pass --oversubscribe (more ranks than cores)")
    extra_args: list[str] = Field(default_factory=list, description="Extra mpirun arguments, placed before the program")
    env: list[str] = Field(default_factory=list, description="Names of environment variables to pass to the ranks (-x)")


class SrunLaunchSpec(SpecModel):
    """Settings for `--launcher srun` / `sbatch` (Slurm)."""

    nodes: int | None = Field(None, ge=1, description="--nodes (default: cluster.nodes)")
    ntasks: int | None = Field(None, ge=1, description="--ntasks; must equal the world size if set")
    ntasks_per_node: int | None = Field(None, ge=1, description="--ntasks-per-node (default: world / nodes, rounded up)")
    partition: str | None = Field(None, description="--partition")
    account: str | None = Field(None, description="--account")
    time_limit: str | None = Field(None, pattern=r"^(\d+-)?\d+(:\d{2}){0,2}$", description="--time, e.g. 01:00:00")
    job_name: str | None = Field(None, description="--job-name (default: the graph name)")
    output: str | None = Field(None, description="sbatch --output (default: <run dir>/logs/slurm-%j.out)")
    mpi: str = Field("pmix", description="--mpi plugin (pmix works with Open MPI; pmi2 does not)")
    container_image: str | None = Field(None, description="Pyxis --container-image")
    container_mounts: list[str] = Field(default_factory=list, description='Pyxis --container-mounts entries "src:dst"')
    extra_args: list[str] = Field(default_factory=list, description="Extra srun arguments, placed before the program")
    env: list[str] = Field(default_factory=list, description="Names of environment variables to pass (added to --export)")
    nats_port: int = Field(4222, ge=1, le=65535, description="Port of the embedded nats-server the batch script starts")
    etcd_port: int = Field(2379, ge=1, le=65535, description="Port of the embedded etcd the batch script starts")


class LaunchSpec(SpecModel):
    """How the graph is started, per launcher."""

    python: str = Field("python", description="Python executable the ranks run")
    local: LocalLaunchSpec = Field(default_factory=LocalLaunchSpec, description="--launcher local")
    mpirun: MpirunLaunchSpec = Field(default_factory=MpirunLaunchSpec, description="--launcher mpirun")
    srun: SrunLaunchSpec = Field(default_factory=SrunLaunchSpec, description="--launcher srun / sbatch")


# ---------------------------------------------------------------- the graph


class GraphSpec(SpecModel):
    """One deployment: operators, the workers hosting them, planes, cluster and launch settings."""

    name: str = Field(pattern=NAME_PATTERN, description="Deployment name (namespaces subjects, streams, keys)")
    description: str | None = Field(None, description="Free text for people")
    python_path: list[str] = Field(default_factory=list, description="Directories (relative to the YAML) put on PYTHONPATH")
    env: dict[str, str] = Field(default_factory=dict, description="Environment for every worker")
    request_plane: RequestPlaneSpec = Field(default_factory=RequestPlaneSpec, description="`embedded` or nats:// URL (or a mapping)")
    data_plane: DataPlaneSpec = Field(default_factory=DataPlaneSpec, description="Tensor transport")
    discovery: DiscoverySpec = Field(default_factory=DiscoverySpec, description="`nats` or `etcd` (or a mapping)")
    operators: list[OperatorSpec] = Field(default_factory=list, description="Operators in the graph")
    workers: list[WorkerSpec] = Field(default_factory=list, description="Worker groups hosting the operators")
    llm: LLMSpec | None = Field(None, description="LLM engine servers (monolithic or disaggregated)")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Nodes and GPUs")
    launch: LaunchSpec = Field(default_factory=LaunchSpec, description="Launcher settings")

    _base_dir: str | None = PrivateAttr(None)
    _file: str | None = PrivateAttr(None)

    @property
    def base_dir(self) -> str | None:
        """Directory relative paths resolve against (the YAML's directory); set by the loader."""
        return self._base_dir

    @property
    def file(self) -> str | None:
        """The YAML file this spec came from (for messages)."""
        return self._file

    def relocated(self, base_dir: str, file: str | None = None) -> "GraphSpec":
        """This spec as if its YAML lived in `base_dir` (plans for another mount point; golden tests)."""
        copy = self.model_copy()
        copy._base_dir = base_dir
        copy._file = file if file is not None else self._file
        return copy
