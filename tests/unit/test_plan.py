"""spec → Plan: names, env, ports, GPUs, ranks; the plan JSON is what the runtime reads. Pure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdist.errors import PlanError
from tdist.plan import Plan, build_plan
from tdist.runtime.config import OperatorConfig, WorkerConfig
from tdist.spec import load_graph, parse_graph

ROOT = Path(__file__).resolve().parents[2]

GRAPH = """\
name: g
python_path: [../ops, /abs/ops]
env: {COMMON: "1"}
request_plane: nats://nats.example:4222
data_plane: {kind: ucx, inline_threshold_bytes: 1024, ucx_env: {UCX_TLS: "tcp,self"}}
discovery: {kind: etcd, etcd_endpoints: ["http://e1:2379"]}
operators:
  - {name: enc, implementation: "m:Enc", max_inflight_requests: 4, parameters: {delay: 0.5}, log_level: debug}
  - name: tri
    kind: triton
    repository: ../models
    triton_config:
      max_batch_size: 8
      instance_group: [{count: 1, kind: KIND_CPU}]
      parameters: {delay: {string_value: "0"}, input_copies: 1}
workers:
  - {name: enc, operators: [enc], replicas: 3, env: {ONLY_ENC: x}, placement: {gpus: 1, gpu_fraction: 0.5}}
  - {name: tri, operators: [tri], placement: {gpu_ids: [1], gpu_fraction: 0.5}}
cluster: {gpus_per_node: 2}
launch: {local: {metrics_port_base: 9100, log_dir: my-logs}}
"""


@pytest.fixture
def plan() -> Plan:
    return build_plan(parse_graph(GRAPH, file="g.yaml", base_dir="/repo/graphs"), run_dir="/run")


def test_workers_are_named_component_dot_index_in_rank_order(plan: Plan):
    assert [w.name for w in plan.workers] == ["enc.0", "enc.1", "enc.2", "tri.0"]
    assert [w.rank for w in plan.workers] == [0, 1, 2, 3]
    assert {w.world_size for w in plan.workers} == {4}
    assert [w.local_rank for w in plan.workers] == [0, 1, 2, 3]
    assert plan.deployment == "g" and all(w.deployment == "g" for w in plan.workers)


def test_env_has_absolute_python_path_graph_and_worker_env(plan: Plan):
    enc = plan.workers[0]
    assert enc.env["PYTHONPATH"] == "/repo/ops:/abs/ops"
    assert enc.env["COMMON"] == "1" and enc.env["ONLY_ENC"] == "x"
    assert "ONLY_ENC" not in plan.workers[3].env
    assert plan.python_path == ["/repo/ops", "/abs/ops"]


def test_gpus_shared_by_fraction_and_fixed_ids(plan: Plan):
    assert [w.gpu_ids for w in plan.workers] == [[0], [1], [0], [1]]  # spread over the emptiest GPUs
    assert plan.workers[0].env["CUDA_VISIBLE_DEVICES"] == "0"
    assert plan.workers[0].gpu_fraction == 0.5
    assert plan.workers[3].env["CUDA_VISIBLE_DEVICES"] == "1"


def test_metrics_port_is_base_plus_index_and_logs_under_run_dir(plan: Plan):
    assert [w.metrics_port for w in plan.workers] == [9100, 9101, 9102, 9103]
    assert plan.workers[1].log_path == "/run/my-logs/enc.1.log"
    assert plan.log_dir == "/run/my-logs"


def test_metrics_port_zero_when_no_base():
    p = build_plan(load_graph(ROOT / "graphs" / "hello_world.yaml"), run_dir="/run")
    assert {w.metrics_port for w in p.workers} == {0}


def test_planes_and_operator_configs(plan: Plan):
    enc, tri = plan.workers[0], plan.workers[3]
    assert enc.request_plane.url == "nats://nats.example:4222" and plan.nats_url == "nats://nats.example:4222"
    assert enc.data_plane.kind == "ucx" and enc.data_plane.ucx_env == {"UCX_TLS": "tcp,self"}
    assert enc.discovery.kind == "etcd" and enc.discovery.etcd_endpoints == ["http://e1:2379"]
    op = enc.operators[0]
    assert (op.implementation, op.max_inflight_requests, op.parameters, op.log_level) == ("m:Enc", 4, {"delay": 0.5}, "DEBUG")
    t = tri.operators[0]
    assert t.repository == "/repo/models" and t.model_name == "tri"
    assert t.triton_config == {
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {"delay": {"string_value": "0"}, "input_copies": {"string_value": "1"}},
        "max_batch_size": 8,
    }


def test_embedded_request_plane_leaves_url_to_the_environment():
    p = build_plan(load_graph(ROOT / "graphs" / "hello_world.yaml"), run_dir="/run")
    assert p.request_plane == "embedded" and p.nats_url is None
    assert all(w.request_plane.url is None for w in p.workers)
    assert p.workers[0].env["PYTHONPATH"] == str(ROOT / "examples" / "hello_world" / "operators")


def test_request_plane_storage_is_file_by_default_and_the_graph_chooses_memory(plan: Plan):
    """Durable by default (issue 15): the setting travels spec → plan → every WorkerConfig."""
    assert {w.request_plane.storage for w in plan.workers} == {"file"}
    fast = build_plan(parse_graph(GRAPH.replace("request_plane: nats://nats.example:4222",
                                                "request_plane: {url: 'nats://nats.example:4222', storage: memory}"),
                                  file="g.yaml", base_dir="/repo/graphs"), run_dir="/run")
    assert {w.request_plane.storage for w in fast.workers} == {"memory"}
    assert WorkerConfig.from_json(fast.workers[0].to_json()).request_plane.storage == "memory"


def test_plan_json_is_read_by_the_runtime_without_tdist_plan(plan: Plan, tmp_path: Path):
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json())
    for rank in range(len(plan.workers)):
        cfg = WorkerConfig.model_validate(json.load(path.open())["workers"][rank])
        assert cfg == plan.workers[rank]
    from tdist.runtime.worker import config_from_plan

    assert config_from_plan(str(path), 2) == plan.workers[2]
    assert Plan.model_validate_json(path.read_text()) == plan


def test_plan_is_frozen(plan: Plan):
    with pytest.raises(Exception):
        plan.world_size = 7  # type: ignore[misc]


def test_unknown_launcher():
    with pytest.raises(PlanError, match="unknown launcher 'kubectl'"):
        build_plan(load_graph(ROOT / "graphs" / "hello_world.yaml"), launcher="kubectl")


def test_default_run_dir_is_absolute(monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    p = build_plan(load_graph(ROOT / "graphs" / "hello_world.yaml"))
    assert p.run_dir == str(tmp_path / ".tdist" / "hello-world")


def test_relocated_spec_resolves_paths_elsewhere():
    spec = load_graph(ROOT / "graphs" / "hello_world.yaml").relocated("/mnt/repo/graphs", "graphs/hello_world.yaml")
    p = build_plan(spec, run_dir="/run")
    assert p.python_path == ["/mnt/repo/examples/hello_world/operators"] and p.graph_file == "graphs/hello_world.yaml"


def test_multi_node_ranks_sorted_by_node_with_local_ranks():
    text = """\
name: m
operators: [{name: a, implementation: "m:A"}]
workers:
  - {name: b, operators: [a], replicas: 2, placement: {node: 1}}
  - {name: a, operators: [a], replicas: 2}
cluster: {nodes: 2, hosts: [h0, h1]}
"""
    p = build_plan(parse_graph(text, file="m.yaml", base_dir="/x"), run_dir="/run")
    assert [(w.name, w.host, w.local_rank) for w in p.workers] == [("a.0", "h0", 0), ("a.1", "h0", 1), ("b.0", "h1", 0), ("b.1", "h1", 1)]
    assert p.srun.ranks_per_node == [2, 2] and p.srun.nodelist == ["h0", "h1"]


# ---------------------------------------------------------------- WorkerConfig JSON round trip

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | _names,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_names, kids, max_size=3),
    max_leaves=10,
)
_operator = st.builds(
    OperatorConfig,
    name=_names,
    kind=st.sampled_from(["python", "triton", "vllm", "trtllm", "router", "frontend"]),
    implementation=st.none() | _names,
    version=st.integers(1, 100),
    max_inflight_requests=st.integers(1, 1000),
    parameters=st.dictionaries(_names, _json, max_size=4),
    repository=st.none() | _names,
    triton_config=st.dictionaries(_names, _json, max_size=3),
    engine_args=st.dictionaries(_names, _json, max_size=3),
    role=st.sampled_from(["both", "context", "generation"]),
    targets=st.lists(_names, max_size=3),
)
_opt_int = st.none() | st.integers(0, 10**6)
_worker = st.builds(
    WorkerConfig,
    name=_names,
    component=_names,
    replica=st.integers(0, 10**6),
    deployment=_names,
    operators=st.lists(_operator, max_size=3),
    env=st.dictionaries(_names, _names, max_size=4),
    gpu_ids=st.lists(st.integers(0, 64), max_size=8),
    gpu_fraction=st.none() | st.floats(0.001, 1.0),
    cpu_ids=st.lists(st.integers(0, 256), max_size=4),
    metrics_port=st.none() | st.integers(0, 65535),
    log_path=st.none() | _names,
    host=st.none() | _names,
    rank=_opt_int,
    world_size=_opt_int,
    local_rank=_opt_int,
    node_index=_opt_int,
    instance=_opt_int,
    instance_rank=_opt_int,
    instance_size=_opt_int,
)


@settings(max_examples=150, deadline=None)
@given(_worker)
def test_worker_config_survives_a_json_round_trip(cfg: WorkerConfig):
    assert WorkerConfig.from_json(cfg.to_json()) == cfg
    assert WorkerConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg


def test_embedded_is_resolved_once_into_typed_plan_fields(plan: Plan):
    """`embedded` is a word of the graph; the plan carries booleans and URLs that launch/ and emit use."""
    assert plan.nats.embedded is False and plan.nats.url == "nats://nats.example:4222"
    assert plan.etcd is not None and plan.etcd.embedded is False and plan.etcd.endpoints == ["http://e1:2379"]
    assert plan.etcd_embedded is False
    text = (ROOT / "graphs" / "hello_world_python.yaml").read_text()
    embedded = parse_graph(text.replace("discovery: nats", "discovery: {kind: etcd, etcd_endpoints: embedded}"),
                           file=str(ROOT / "graphs" / "x.yaml"))
    p = build_plan(embedded, run_dir="/run")
    assert p.nats.embedded is True and p.nats.url is None
    assert p.etcd is not None and p.etcd.embedded is True and p.etcd.endpoints == [] and p.etcd_embedded
    assert all(w.discovery.etcd_endpoints == [] for w in p.workers)  # the launcher's etcd, via ETCD_ENDPOINTS
    dumped = json.loads(p.model_dump_json())
    assert "embedded" not in (dumped["nats"]["url"], dumped["etcd"]["endpoints"])  # no sentinel string left in the plan
    assert build_plan(load_graph(ROOT / "graphs" / "hello_world_python.yaml"), run_dir="/run").etcd is None
