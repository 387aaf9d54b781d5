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
PLAN_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MpirunPlan(_Frozen):
    """Resolved mpirun settings."""

    allow_run_as_root: bool | None = Field(None, description="--allow-run-as-root; None: decided when emitting (running as root)")
    oversubscribe: bool = Field(False, description="--oversubscribe")
    extra_args: list[str] = Field(default_factory=list, description="Extra mpirun arguments before the program")
    env_names: list[str] = Field(default_factory=list, description="Variables forwarded from the launching environment (-x NAME)")


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
    request_plane: str = Field(description="`embedded` (the launcher starts nats-server, sets NATS_SERVER) or a NATS URL")
    discovery: Literal["nats", "etcd"] = Field(description="Discovery backend")
    etcd_endpoints: list[str] | Literal["embedded"] | None = Field(
        None, description="etcd only: endpoints, or `embedded` (the launcher starts etcd, sets ETCD_ENDPOINTS)"
    )
    data_plane: DataPlaneConfig = Field(description="Tensor transport settings (also in every WorkerConfig)")
    world_size: int = Field(description="Ranks mpirun/srun start as one world (workers[0:world_size])")
    nodes: int = Field(description="Nodes in the cluster")
    hosts: list[str | None] = Field(description="Hostname per node (None where the graph does not say)")
    python: str = Field("python", description="Python executable each rank runs")
    python_path: list[str] = Field(default_factory=list, description="Absolute directories on every worker's PYTHONPATH")
    env: dict[str, str] = Field(default_factory=dict, description="Graph-level environment for every worker")
    startup_timeout_s: float = Field(120.0, description="Seconds the launcher waits for all workers to be ready")
    restart_on_crash: bool = Field(True, description="Local launcher: restart a worker that dies")
    mpirun: MpirunPlan = Field(default_factory=MpirunPlan, description="mpirun settings")
    srun: SrunPlan = Field(description="Slurm settings")
    workers: list[WorkerConfig] = Field(description="One WorkerConfig per process; index = rank for the world")

    @property
    def nats_url(self) -> str | None:
        """The NATS URL the graph names; None when embedded (the launcher starts one, sets NATS_SERVER)."""
        return None if self.request_plane == "embedded" else self.request_plane

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
