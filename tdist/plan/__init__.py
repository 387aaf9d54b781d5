"""Planning: a validated graph → `Plan` (WorkerConfigs in rank order) → launch commands. Pure."""

from tdist.plan.build import build_plan
from tdist.plan.emit import emit_local, emit_mpirun, emit_sbatch, emit_script, emit_srun, worker_argv
from tdist.plan.model import LAUNCHERS, EtcdPlan, MpirunPlan, NatsPlan, Plan, SrunPlan

__all__ = [
    "LAUNCHERS",
    "EtcdPlan",
    "MpirunPlan",
    "NatsPlan",
    "Plan",
    "SrunPlan",
    "build_plan",
    "emit_local",
    "emit_mpirun",
    "emit_sbatch",
    "emit_script",
    "emit_srun",
    "worker_argv",
]
