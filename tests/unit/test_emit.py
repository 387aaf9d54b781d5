"""Plan → mpirun / srun argv and sbatch script, checked against golden files. Pure.

Regenerate the golden files (after an intended change, then review the diff):
    TDIST_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_emit.py
Plans are built as if the repo lived at /repo with run dir /run, so the files do not depend on
the machine.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from tdist.errors import PlanError
from tdist.plan import Plan, build_plan, emit_local, emit_mpirun, emit_sbatch, emit_srun
from tdist.spec import load_graph, parse_graph

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "plan"
REGEN = os.environ.get("TDIST_REGEN_GOLDEN") == "1"
PLAN_PATH = "/run/plan.json"


def _plan(graph: str, launcher: str) -> Plan:
    spec = load_graph(ROOT / "graphs" / graph).relocated("/repo/graphs", f"graphs/{graph}")
    return build_plan(spec, launcher=launcher, run_dir="/run")


def _render(graph: str, what: str) -> str:
    if what == "mpirun":
        return shlex.join(emit_mpirun(_plan(graph, "mpirun"), PLAN_PATH, as_root=True)) + "\n"
    if what == "srun":
        return shlex.join(emit_srun(_plan(graph, "srun"), PLAN_PATH)) + "\n"
    if what == "sbatch":
        return emit_sbatch(_plan(graph, "sbatch"), PLAN_PATH)
    if what == "local":
        return "".join(shlex.join(a) + "\n" for a in emit_local(_plan(graph, "local"), PLAN_PATH))
    if what == "plan.json":
        return _plan(graph, "srun").model_dump_json(indent=2) + "\n"
    raise AssertionError(what)


CASES = [
    ("hello_world.yaml", "local"),
    ("hello_world.yaml", "mpirun"),
    ("hello_world.yaml", "srun"),
    ("hello_world.yaml", "sbatch"),
    ("hello_world.yaml", "plan.json"),
    ("llm_vllm_monolith.yaml", "mpirun"),
    ("llm_disagg.yaml", "mpirun"),
    ("llm_disagg.yaml", "srun"),
    ("llm_disagg.yaml", "sbatch"),
    ("llm_disagg.yaml", "plan.json"),
    ("trtllm_disagg.yaml", "mpirun"),
    ("trtllm_disagg.yaml", "sbatch"),
]


@pytest.mark.parametrize(("graph", "what"), CASES, ids=[f"{g[:-5]}-{w}" for g, w in CASES])
def test_golden(graph: str, what: str):
    text = _render(graph, what)
    path = GOLDEN / f"{graph[:-5]}.{what}" if what == "plan.json" else GOLDEN / f"{graph[:-5]}.{what}.txt"
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with TDIST_REGEN_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs; if intended, regenerate with TDIST_REGEN_GOLDEN=1"


def test_golden_files_are_machine_independent():
    for path in GOLDEN.iterdir():
        text = path.read_text()
        assert str(ROOT) not in text and "/tmp" not in text, path.name


def test_llm_disagg_sbatch_is_complete_for_a_world_of_3():
    script = _render("llm_disagg.yaml", "sbatch")
    assert script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks=3", "#SBATCH --ntasks-per-node=3", "#SBATCH --job-name=llm-disagg",
                 "#SBATCH --time=01:00:00", "#SBATCH --output=/run/logs/slurm-%j.out", "export HF_HUB_OFFLINE=1",
                 'export NATS_SERVER="nats://${HEAD_NODE}:4222"'):
        assert line in script
    last = script.strip().splitlines()[-1]
    assert last.startswith("srun --mpi=pmix --nodes=1 --ntasks=3 --ntasks-per-node=3")
    assert "--export=ALL,NATS_SERVER,HF_HUB_OFFLINE=1" in last
    assert last.endswith('python -m tdist.runtime.worker --plan "$PLAN"')
    assert "--rank 3" in script and "--rank 4" in script  # frontend, router beside the request plane


def test_mpirun_root_and_oversubscribe():
    plan = _plan("hello_world.yaml", "mpirun")
    assert "--allow-run-as-root" in emit_mpirun(plan, PLAN_PATH, as_root=True)
    argv = emit_mpirun(plan, PLAN_PATH, as_root=False)
    assert "--allow-run-as-root" not in argv and "--oversubscribe" in argv
    assert argv[argv.index("-np") + 1] == "3"
    assert emit_mpirun(plan, PLAN_PATH, python="/venv/bin/python")[-5] == "/venv/bin/python"


def test_mpirun_forwards_env_and_hosts():
    plan = _plan("trtllm_disagg.yaml", "mpirun")
    argv = emit_mpirun(plan, PLAN_PATH, as_root=False)
    assert argv[argv.index("--host") + 1] == "node1:4,node2:4"
    assert ["-x", "NATS_SERVER"] == argv[argv.index("NATS_SERVER") - 1: argv.index("NATS_SERVER") + 1]
    assert "ETCD_ENDPOINTS" in argv


def test_sbatch_container_flags_and_embedded_etcd():
    script = _render("trtllm_disagg.yaml", "sbatch")
    assert "--container-image=nvcr.io#nvidia/tritonserver:25.01-trtllm-python-py3" in script
    assert "--container-mounts=/models:/models" in script
    assert "#SBATCH --nodelist=node1,node2" in script and "#SBATCH --nodes=2" in script
    assert 'export ETCD_ENDPOINTS="http://${HEAD_NODE}:2379"' in script


def test_sbatch_uses_a_given_request_plane():
    script = emit_sbatch(_plan("hello_world.yaml", "sbatch"), PLAN_PATH, nats_url="nats://login:4222")
    assert "export NATS_SERVER=nats://login:4222" in script and "nats-server" not in script


def test_srun_rejects_uneven_nodes_and_commas():
    text = """\
name: u
operators: [{name: a, implementation: "m:A"}]
workers:
  - {name: a, operators: [a], replicas: 1}
  - {name: b, operators: [a], replicas: 2, placement: {node: 1}}
cluster: {nodes: 2}
env: {LIST: "a,b"}
"""
    plan = build_plan(parse_graph(text, file="u.yaml", base_dir="/x"), launcher="srun", run_dir="/run")
    with pytest.raises(PlanError, match=r"\[1, 2\] ranks"):
        emit_srun(plan, PLAN_PATH)
    assert "--host" not in emit_mpirun(plan, PLAN_PATH)  # hostnames unknown: mpirun takes them from a hostfile/extra args
    balanced = build_plan(parse_graph(text.replace("replicas: 1}", "replicas: 2}"), file="u.yaml", base_dir="/x"),
                          launcher="srun", run_dir="/run")
    with pytest.raises(PlanError, match="comma"):
        emit_srun(balanced, PLAN_PATH)


def test_sbatch_lines_for_every_slurm_setting():
    text = """\
name: s
operators: [{name: a, implementation: "m:A"}]
workers: [{name: a, operators: [a], replicas: 2}]
env: {TOKEN: "two words"}
launch:
  python: /opt/venv/bin/python
  srun:
    partition: gpu
    account: proj1
    time_limit: "0-02:00:00"
    job_name: myjob
    output: /logs/%j.out
    container_image: img:1
    container_mounts: ["/a:/a", "/b:/b"]
    extra_args: ["--exclusive"]
    env: [HF_TOKEN]
"""
    plan = build_plan(parse_graph(text, file="s.yaml", base_dir="/x"), launcher="sbatch", run_dir="/run")
    script = emit_sbatch(plan, PLAN_PATH)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj1", "#SBATCH --time=0-02:00:00",
                 "#SBATCH --job-name=myjob", "#SBATCH --output=/logs/%j.out", "export TOKEN='two words'"):
        assert line in script
    argv = emit_srun(plan, PLAN_PATH)
    assert "--container-image=img:1" in argv and "--container-mounts=/a:/a,/b:/b" in argv
    assert "--export=ALL,NATS_SERVER,HF_TOKEN,TOKEN=two words" in argv
    assert argv[-6:] == ["--exclusive", "/opt/venv/bin/python", "-m", "tdist.runtime.worker", "--plan", PLAN_PATH]
