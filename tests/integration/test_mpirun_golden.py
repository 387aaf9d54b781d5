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

from tdist.plan import Plan, build_plan, emit_script
from tdist.runtime.worker import config_from_plan
from tdist.spec import load_graph

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "launch"
REGEN = os.environ.get("TDIST_REGEN_GOLDEN") == "1"
GRAPH = "trtllm_disagg.yaml"


def _plan(launcher: str) -> Plan:
    spec = load_graph(ROOT / "graphs" / GRAPH).relocated("/repo/graphs", f"graphs/{GRAPH}")
    return build_plan(spec, launcher=launcher, run_dir="/run")


def render_command(plan: Plan) -> str:
    """What `tdist deploy --dry-run` prints for the plan (its run directory's plan.json)."""
    return emit_script(plan, os.path.join(plan.run_dir, "plan.json"))


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


# ---- pure helpers of the launchers (no mpirun, no Slurm needed) --------------------------------


def test_parse_rank_line() -> None:
    from tdist.launch.mpirun import parse_rank_line

    assert parse_rank_line("[1,2]<stdout>:tdist worker ready: x\n", "mpirun") == (2, "tdist worker ready: x\n")
    assert parse_rank_line("[1,10]<stderr>:boom", "mpirun") == (10, "boom")
    assert parse_rank_line("[1,2]<stdout>:done[1,2]<stdout>:\n", "mpirun") == (2, "done\n")  # chunked line end
    assert parse_rank_line("mpirun noticed that ...", "mpirun") == (None, "mpirun noticed that ...")
    assert parse_rank_line("3: hello", "srun") == (3, "hello")
    assert parse_rank_line("srun: error: vm: task 0: Killed", "srun")[0] is None


def test_rank_log_demux_splits_tagged_output(tmp_path: Path) -> None:
    import io

    from tdist.launch.mpirun import RankLogDemux

    stream = io.BytesIO(b"[1,0]<stdout>:a\n[1,1]<stderr>:b\nuntagged\n[1,0]<stderr>:c\n"
                        b"[1,0]<stdout>:d[1,1]<stdout>:e[1,0]<stdout>:\n[1,1]<stdout>:\n[1,1]<stdout>:f")
    logs = {0: str(tmp_path / "w0.log"), 1: str(tmp_path / "w1.log")}
    demux = RankLogDemux(stream, "mpirun", tmp_path / "mpirun.log", logs).start()
    demux.join()
    assert (tmp_path / "w0.log").read_text() == "a\nc\nd\n"
    assert (tmp_path / "w1.log").read_text() == "b\ne\nf\n"  # chunked lines rejoined per rank
    assert "untagged" in (tmp_path / "mpirun.log").read_text()


def test_world_env_forwards_planes_and_tags_output() -> None:
    import sys as _sys

    from tdist.launch.mpirun import world_env

    env = world_env("mpirun", base={"PATH": "/usr/bin"}, nats_url="nats://h:1", etcd_endpoints=["http://h:2"])
    assert env["NATS_SERVER"] == "nats://h:1" and env["ETCD_ENDPOINTS"] == "http://h:2"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(_sys.executable)  # `python` in the argv
    assert env["OMPI_MCA_orte_tag_output"] == "1" and env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    srun = world_env("srun", base={"PATH": "/usr/bin"})
    assert srun["SLURM_LABELIO"] == "1" and "OMPI_MCA_orte_tag_output" not in srun


def test_sbatch_job_id_and_output_split(tmp_path: Path) -> None:
    from tdist.errors import LaunchError
    from tdist.launch.slurm import parse_job_id, split_rank_output

    assert parse_job_id("42\n") == "42"
    assert parse_job_id("42;cluster\n") == "42"
    assert parse_job_id("Submitted batch job 7\n") == "7"
    with pytest.raises(LaunchError):
        parse_job_id("sbatch: error: invalid partition")
    out = tmp_path / "slurm-1.out"
    out.write_text("0: x\n1: y\nsrun: error: something\n0: z\n")
    written = split_rank_output(out, {0: str(tmp_path / "a.log"), 1: str(tmp_path / "b.log")})
    assert sorted(written) == sorted([str(tmp_path / "a.log"), str(tmp_path / "b.log")])
    assert (tmp_path / "a.log").read_text() == "x\nz\n"
