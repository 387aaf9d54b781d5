"""The Plan: everything `deploy` will start, as plain data.

`Plan.model_dump_json()` is what the launcher writes to `<run dir>/plan.json`; a worker reads it
with `json.load(...)["workers"][rank]` → `WorkerConfig` without importing this package (the
runtime never imports plan/). Ranks 0..world_size-1 are the processes mpirun/srun start as one
world; the workers after them are service workers (routers, frontends) that the launcher starts
next to the request plane with `--rank <index>`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tdist.runtime.config import DataPlaneConfig, WorkerConfig

Launcher = Literal["local", "mpirun", "srun", "sbatch"]
LAUNCHERS: tuple[str, ...] = ("local", "mpirun", "srun", "sbatch")
PLAN_VERSION = 2  # 2: request plane and etcd as typed NatsPlan / EtcdPlan, `embedded` resolved


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MpirunPlan(_Frozen):
    """Resolved mpirun settings."""

    allow_run_as_root: bool | None = Field(None, description="--allow-run-as-root; None: decided when emitting (running as root)")
    oversubscribe: bool = Field(False, description="--oversubscribe")
    extra_args: list[str] = Field(default_factory=list, description="Extra mpirun arguments before the program")
    env_names: list[str] = Field(default_factory=list, description="Variables forwarded from the launching environment (-x NAME)")


#: What a graph writes for "tdist starts this server itself" (request_plane, etcd_endpoints).
EMBEDDED = "embedded"


class NatsPlan(_Frozen):
    """The request plane, resolved: either tdist starts nats-server (embedded) or the graph names one."""

    embedded: bool = Field(description="The launcher (or the batch script) starts nats-server and sets NATS_SERVER")
    url: str | None = Field(None, description="The graph's NATS URL; None when embedded")

    @classmethod
    def resolve(cls, request_plane: str) -> "NatsPlan":
        """The graph's `request_plane` (`embedded` or a URL) → NatsPlan. The one place that reads the word."""
        return cls(embedded=True) if request_plane == EMBEDDED else cls(embedded=False, url=request_plane)


class EtcdPlan(_Frozen):
    """etcd discovery, resolved: either tdist starts etcd (embedded) or the graph names endpoints."""

    embedded: bool = Field(description="The launcher (or the batch script) starts etcd and sets ETCD_ENDPOINTS")
    endpoints: list[str] = Field(default_factory=list, description="The graph's endpoints; empty when embedded")

    @classmethod
    def resolve(cls, etcd_endpoints: "list[str] | str | None") -> "EtcdPlan":
        """The graph's `etcd_endpoints` (`embedded`, a list, or unset: ETCD_ENDPOINTS) → EtcdPlan."""
        if etcd_endpoints == EMBEDDED:
            return cls(embedded=True)
        return cls(embedded=False, endpoints=list(etcd_endpoints or []))


class SrunPlan(_Frozen):
    """Resolved Slurm settings (srun argv and sbatch script)."""

    nodes: int = Field(description="--nodes")
    ntasks: int = Field(description="--ntasks (the world size)")
    ntasks_per_node: int = Field(description="--ntasks-per-node")
    ranks_per_node: list[int] = Field(description="Ranks the plan puts on each node, in node order")
    nodelist: list[str] = Field(default_factory=list, description="--nodelist when every node's hostname is known")
    partition: str | None = Field(None, description="--partition")
    account: str | None = Field(None, description="--account")
    time_limit: str | None = Field(None, description="--time")
    job_name: str = Field(description="--job-name")
    output: str = Field(description="sbatch --output")
    mpi: str = Field("pmix", description="--mpi plugin")
    container_image: str | None = Field(None, description="Pyxis --container-image")
    container_mounts: list[str] = Field(default_factory=list, description="Pyxis --container-mounts")
    extra_args: list[str] = Field(default_factory=list, description="Extra srun arguments before the program")
    env_names: list[str] = Field(default_factory=list, description="Variables added to --export from the launching environment")
    nats_port: int = Field(4222, description="Port of the nats-server the batch script starts (request_plane: embedded)")
    etcd_port: int = Field(2379, description="Port of the etcd the batch script starts (etcd_endpoints: embedded)")


class Plan(_Frozen):
    """One deployment, planned: the WorkerConfigs in rank order and how to launch them."""

    plan_version: int = Field(PLAN_VERSION, description="Format version of this document")
    deployment: str = Field(description="Deployment name (namespace of subjects, streams, discovery keys)")
    graph_file: str | None = Field(None, description="The graph YAML this plan came from")
    launcher: Launcher = Field(description="local | mpirun | srun | sbatch")
    run_dir: str = Field(description="Directory for plan.json, logs and embedded servers' state")
    log_dir: str = Field(description="Directory of the worker logs")
    nats: NatsPlan = Field(description="The request plane: embedded (started by the launcher) or the graph's URL")
    discovery: Literal["nats", "etcd"] = Field(description="Discovery backend")
    etcd: EtcdPlan | None = Field(None, description="etcd discovery only: embedded, or the graph's endpoints")
    data_plane: DataPlaneConfig = Field(description="Tensor transport settings (also in every WorkerConfig)")
    world_size: int = Field(description="Ranks mpirun/srun start as one world (workers[0:world_size])")
    nodes: int = Field(description="Nodes in the cluster")
    hosts: list[str | None] = Field(description="Hostname per node (None where the graph does not say)")
    python: str = Field("python", description="Python executable each rank runs")
    python_path: list[str] = Field(default_factory=list, description="Absolute directories on every worker's PYTHONPATH")
    env: dict[str, str] = Field(default_factory=dict, description="Graph-level environment for every worker")
    startup_timeout_s: float = Field(120.0, description="Seconds the launcher waits for all workers to be ready")
    restart_on_crash: bool = Field(True, description="Local launcher: restart a worker that dies")
    restart_max_crashes: int = Field(5, description="Crashes within restart_window_s after which a worker is `failed`")
    restart_window_s: float = Field(300.0, description="Seconds over which a worker's crashes are counted")
    mpirun: MpirunPlan = Field(default_factory=MpirunPlan, description="mpirun settings")
    srun: SrunPlan = Field(description="Slurm settings")
    workers: list[WorkerConfig] = Field(description="One WorkerConfig per process; index = rank for the world")

    @property
    def nats_url(self) -> str | None:
        """The NATS URL the graph names; None when embedded (the launcher starts one, sets NATS_SERVER)."""
        return self.nats.url

    @property
    def request_plane(self) -> str:
        """The graph's words, for display: `embedded` or the NATS URL."""
        return EMBEDDED if self.nats.embedded else str(self.nats.url)

    @property
    def etcd_embedded(self) -> bool:
        """etcd discovery with an etcd the launcher starts."""
        return self.discovery == "etcd" and self.etcd is not None and self.etcd.embedded

    @property
    def world_workers(self) -> list[WorkerConfig]:
        """The ranks mpirun/srun start."""
        return self.workers[: self.world_size]

    @property
    def service_workers(self) -> list[WorkerConfig]:
        """Routers/frontends the launcher starts beside the request plane (`--rank <index>`)."""
        return self.workers[self.world_size :]

    def worker(self, name: str) -> WorkerConfig:
        """The WorkerConfig named `name` ("component.i")."""
        for w in self.workers:
            if w.name == name:
                return w
        raise KeyError(name)
