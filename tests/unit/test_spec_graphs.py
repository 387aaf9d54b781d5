"""Every graph in graphs/ validates and plans; the seed's layout files in configs/ are accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdist.plan import build_plan
from tdist.spec import load_graph, parse_graph

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = sorted((ROOT / "graphs").glob("*.yaml"))

# WORLD_SIZE = Σ num_instances × tp_size × pp_size for LLM graphs; every non-service worker otherwise.
EXPECTED_WORLD = {
    "hello_world.yaml": 3,
    "hello_world_python.yaml": 3,
    "llm_vllm_monolith.yaml": 2,
    "llm_disagg.yaml": 3,
    "trtllm_disagg.yaml": 8,
}


def test_the_expected_graphs_exist():
    assert {g.name for g in GRAPHS} >= set(EXPECTED_WORLD)


@pytest.mark.parametrize("path", GRAPHS, ids=lambda p: p.name)
def test_graph_validates_and_plans(path: Path, tmp_path: Path):
    spec = load_graph(path)
    for launcher in ("local", "mpirun", "srun", "sbatch"):
        plan = build_plan(spec, launcher=launcher, run_dir=str(tmp_path))
        if path.name in EXPECTED_WORLD:
            assert plan.world_size == EXPECTED_WORLD[path.name]
        assert len({w.name for w in plan.workers}) == len(plan.workers)
        assert [w.rank for w in plan.world_workers] == list(range(plan.world_size))


def test_hello_world_matches_the_seed():
    """The seed's hello world: Triton encoder/decoder models with instance groups and
    delay / input_copies parameters, a python encoder_decoder chaining them (+ a KServe frontend)."""
    spec = load_graph(ROOT / "graphs" / "hello_world.yaml")
    ops = {o.name: o for o in spec.operators}
    assert set(ops) == {"encoder", "decoder", "encoder_decoder", "kserve"}
    assert ops["encoder"].kind == ops["decoder"].kind == "triton"
    enc = ops["encoder"].triton_config
    assert [(g.count, g.kind) for g in enc.instance_group] == [(2, "KIND_CPU")]
    assert set(enc.parameters) == {"input_copies", "delay"}
    assert ops["encoder_decoder"].implementation == "hello_world_ops:EncodeDecodeOperator"
    assert [(w.name, w.replicas) for w in spec.workers][:3] == [("encoder", 1), ("decoder", 1), ("encoder_decoder", 1)]
    assert spec.python_path == ["../examples/hello_world/operators"]


def test_hello_world_python_is_the_pure_python_copy():
    spec = load_graph(ROOT / "graphs" / "hello_world_python.yaml")
    ops = {o.name: o for o in spec.operators}
    assert set(ops) == {"encoder", "decoder", "encoder_decoder"}
    assert ops["encoder"].implementation == "hello_world_ops:EncoderOperator"
    assert ops["encoder"].parameters == {"delay": 0, "input_copies": 1}
    assert [(w.name, w.replicas) for w in spec.workers] == [("encoder", 1), ("decoder", 1), ("encoder_decoder", 1)]


def test_llm_disagg_layout():
    plan = build_plan(load_graph(ROOT / "graphs" / "llm_disagg.yaml"), launcher="srun", run_dir="/run")
    world = plan.world_workers
    # a vLLM instance is one process holding its tp x pp GPUs (vLLM starts the TP workers itself)
    assert [w.name for w in world] == ["context.0", "generation.0", "generation.1"]
    assert [(w.instance, w.instance_rank, w.instance_size) for w in world] == [(0, 0, 2), (0, 0, 1), (1, 0, 1)]
    assert [w.gpu_ids for w in world] == [[0, 1], [2], [3]]
    assert world[0].env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert [w.name for w in plan.service_workers] == ["frontend.0", "router.0"]
    ctx = world[0].operators[0]
    assert (ctx.kind, ctx.role, ctx.engine_args["tensor_parallel_size"]) == ("vllm", "context", 2)
    assert ctx.engine_args["model"] == str(ROOT / "models" / "tiny-llama")
    router = plan.worker("router.0").operators[0]
    assert router.targets == ["context", "generation"]


@pytest.mark.parametrize(
    ("config", "gpus", "world", "nodes"),
    [("disagg_single_node.yaml", 1, 3, 1), ("disagg_multi_node.yaml", 4, 8, 2), ("llmapi_single_node.yaml", 8, 8, 1)],
)
def test_seed_layout_files_are_accepted(config: str, gpus: int, world: int, nodes: int):
    text = f"""\
name: t
llm:
  engine: trtllm
  model: some/model
  layout_file: ../configs/{config}
operators:
  - {{name: router, kind: router}}
workers:
  - {{name: router, operators: [router]}}
cluster: {{nodes: {nodes}, gpus_per_node: {gpus}}}
"""
    spec = parse_graph(text, file="t.yaml", base_dir=str(ROOT / "graphs"))
    plan = build_plan(spec, run_dir="/run")
    assert plan.world_size == world
    ctx = plan.world_workers[0]
    assert ctx.operators[0].parameters["url"].endswith(":8001")
    if config == "llmapi_single_node.yaml":
        assert ctx.operators[0].engine_args["kv_cache_config"] == {"free_gpu_memory_fraction": 0.2}
        assert ctx.operators[0].engine_args["tensor_parallel_size"] == 2
    if config == "disagg_single_node.yaml":  # 3 ranks x 0.25 share one GPU
        assert {tuple(w.gpu_ids) for w in plan.world_workers} == {(0,)}


def test_graph_keys_win_over_the_layout_file():
    text = """\
name: t
llm:
  model: mine
  layout_file: ../configs/disagg_single_node.yaml
  generation_servers: {num_instances: 1, urls: ["localhost:9000"]}
operators: [{name: router, kind: router}]
workers: [{name: router, operators: [router]}]
cluster: {gpus_per_node: 3}
"""
    spec = parse_graph(text, file="t.yaml", base_dir=str(ROOT / "graphs"))
    assert spec.llm.model == "mine"
    assert spec.llm.generation_servers.urls == ["localhost:9000"]
    assert spec.llm.context_servers.num_instances == 2  # from the file


def test_docs_spec_reference_is_current():
    from tdist.spec.reference import splice

    doc = (ROOT / "docs" / "spec.md").read_text()
    assert splice(doc) == doc, "regenerate: python -m tdist.spec.reference --write docs/spec.md"


def test_openai_frontends_get_the_served_model_names_from_the_plan():
    plan = build_plan(load_graph(ROOT / "graphs" / "llm_vllm_monolith.yaml"), launcher="local", run_dir="/run")
    fe = next(o for w in plan.workers for o in w.operators if o.kind == "frontend")
    assert fe.parameters["served_models"] == ["tiny-llama"]
    hello = build_plan(load_graph(ROOT / "graphs" / "hello_world.yaml"), launcher="local", run_dir="/run")
    assert all("served_models" not in o.parameters for w in hello.workers for o in w.operators)
