"""The launch commands for the seed's multi-node TensorRT-LLM layout (graphs/trtllm_disagg.yaml:
2 context servers TP2 + 2 generation servers TP2 over 2 nodes, etcd discovery), as the launchers
run them (`tdist deploy --dry-run --launcher mpirun|srun|sbatch`), checked against golden files;
and every rank of that world finding its own WorkerConfig (node, GPUs by local rank) from the
rank variables mpirun / srun give it.

Regenerate after an intended change (then review the diff):
    TDIST_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/integration/test_mpirun_golden.py
Plans are built as if the repo lived at /repo with run dir /run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tdist.cli.multinode_cmds import render_command
from tdist.plan import Plan, build_plan
from tdist.runtime.worker import config_from_plan
from tdist.spec import load_graph

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "launch"
REGEN = os.environ.get("TDIST_REGEN_GOLDEN") == "1"
GRAPH = "trtllm_disagg.yaml"


def _plan(launcher: str) -> Plan:
    spec = load_graph(ROOT / "graphs" / GRAPH).relocated("/repo/graphs", f"graphs/{GRAPH}")
    return build_plan(spec, launcher=launcher, run_dir="/run")


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN:
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with TDIST_REGEN_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs; if intended, regenerate with TDIST_REGEN_GOLDEN=1"


@pytest.fixture(autouse=True)
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The golden mpirun line is the one root gets (--allow-run-as-root), whoever runs the test."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)


@pytest.mark.parametrize("launcher,ext", [("mpirun", "txt"), ("srun", "txt"), ("sbatch", "sh")])
def test_launch_command_golden(launcher: str, ext: str) -> None:
    _check(f"trtllm_disagg.{launcher}.{ext}", render_command(_plan(launcher)))


def test_layout_is_two_nodes_of_four_ranks() -> None:
    plan = _plan("mpirun")
    assert plan.world_size == 8 and plan.nodes == 2
    assert plan.srun.ranks_per_node == [4, 4]
    mpirun = render_command(plan)
    assert "-np 8" in mpirun and "--host node1:4,node2:4" in mpirun
    assert "-x NATS_SERVER -x ETCD_ENDPOINTS" in mpirun  # request plane + etcd reach every rank
    srun = render_command(_plan("srun"))
    assert "--mpi=pmix" in srun and "--nodes=2" in srun and "--ntasks-per-node=4" in srun
    script = render_command(_plan("sbatch"))
    assert "#SBATCH --nodes=2" in script and "export ETCD_ENDPOINTS=" in script


def _rank_table(plan: Plan, plan_path: Path, rank_env: str, local_env: str) -> list[dict]:
    """What each rank of the world resolves, given only the variables its launcher sets."""
    rows = []
    per_node = plan.srun.ranks_per_node
    for rank in range(plan.world_size):
        node = 0 if rank < per_node[0] else 1
        local = rank - sum(per_node[:node])
        env = {rank_env: str(rank), local_env: str(local)}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            cfg = config_from_plan(str(plan_path))
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        op = cfg.operators[0]
        rows.append({
            "rank": rank, "worker": cfg.name, "host": cfg.host, "local_rank": cfg.local_rank,
            "gpu_ids": list(cfg.gpu_ids), "gpu_fraction": cfg.gpu_fraction, "operator": op.name, "role": op.role,
            "instance": cfg.instance, "instance_rank": cfg.instance_rank, "instance_size": cfg.instance_size,
            "discovery": cfg.discovery.kind,
        })
    return rows


def test_each_rank_finds_its_worker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    plan = _plan("mpirun")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.model_dump_json())
    under_mpirun = _rank_table(plan, plan_path, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
    under_srun = _rank_table(plan, plan_path, "SLURM_PROCID", "SLURM_LOCALID")
    assert under_mpirun == under_srun
    for row in under_mpirun:
        assert row["rank"] == plan.workers[row["rank"]].rank
        assert row["host"] == ("node1" if row["rank"] < 4 else "node2")
        assert row["gpu_ids"] == [row["local_rank"]]  # GPUs by local rank
        assert row["role"] == ("context" if row["rank"] < 4 else "generation")
    _check("trtllm_disagg.ranks.json", json.dumps(under_mpirun, indent=2) + "\n")
