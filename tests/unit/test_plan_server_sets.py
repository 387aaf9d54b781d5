"""LLM server sets in the plan: a declared operator of the set's name, and the layout's settings in
each engine's own terms (never an engine arg the engine refuses at start). Pure."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tdist.errors import SpecErrors
from tdist.plan import build_plan
from tdist.spec import parse_graph
from tdist.spec.engine_args import installed_engine_args

ROOT = Path(__file__).resolve().parents[2]


def plan_of(text: str):  # noqa: ANN201
    return build_plan(parse_graph(textwrap.dedent(text), file="g.yaml", base_dir=str(ROOT / "graphs")), run_dir="/run")


def errors_of(text: str) -> str:
    with pytest.raises(SpecErrors) as info:
        parse_graph(textwrap.dedent(text), file="g.yaml", base_dir=str(ROOT / "graphs"))
    return info.value.render()


def engine_ops(plan):  # noqa: ANN001, ANN201
    return [w.operators[0] for w in plan.world_workers]


MONOLITH = """\
name: g
llm:
  model: some/model
  servers: {num_instances: 2, max_inflight_requests: 32}
operators:
  - {name: llm, kind: vllm, parameters: {pin_engine: false}}
  - {name: router, kind: router}
workers: [{name: router, operators: [router]}]
"""


# ---------------------------------------------------------------- bug: max_inflight_requests became 1


def test_the_sets_max_inflight_requests_survives_a_declared_operator_of_its_name():
    ops = engine_ops(plan_of(MONOLITH))
    assert [o.max_inflight_requests for o in ops] == [32, 32]  # was 1: the declared operator's default
    assert all(o.parameters == {"pin_engine": False} for o in ops)  # the operator's settings still apply


def test_the_declared_operators_max_inflight_requests_applies_when_the_set_names_none():
    text = MONOLITH.replace(", max_inflight_requests: 32", "").replace("{name: llm, kind: vllm,", "{name: llm, kind: vllm, max_inflight_requests: 8,")
    assert [o.max_inflight_requests for o in engine_ops(plan_of(text))] == [8, 8]
    without = MONOLITH.replace(", max_inflight_requests: 32", "")
    assert [o.max_inflight_requests for o in engine_ops(plan_of(without))] == [16, 16]  # the set's default


def test_a_set_and_its_operator_disagreeing_on_max_inflight_requests_is_an_error():
    text = errors_of(MONOLITH.replace("{name: llm, kind: vllm,", "{name: llm, kind: vllm, max_inflight_requests: 8,"))
    assert "llm.servers.max_inflight_requests: operator 'llm' sets max_inflight_requests 8 (got 32)" in text


# ---------------------------------------------------------------- bug: layout settings became vLLM engine args


def layout_graph(engine: str, gpus: int = 1) -> str:
    return f"""\
name: t
llm:
  engine: {engine}
  model: some/model
  layout_file: ../configs/disagg_single_node.yaml
operators: [{{name: router, kind: router}}]
workers: [{{name: router, operators: [router]}}]
cluster: {{gpus_per_node: {gpus}}}
"""


def test_a_layouts_gpu_fraction_is_vllms_gpu_memory_utilization_and_backend_is_not_passed():
    for op in engine_ops(plan_of(layout_graph("vllm"))):
        assert op.kind == "vllm"
        assert op.engine_args["gpu_memory_utilization"] == 0.25
        assert not {"gpu_fraction", "backend", "kv_cache_config"} & set(op.engine_args)


def test_tensorrt_llm_still_gets_the_layouts_own_settings():
    for op in engine_ops(plan_of(layout_graph("trtllm"))):
        assert op.kind == "trtllm"
        assert (op.engine_args["backend"], op.engine_args["gpu_fraction"]) == ("pytorch", 0.25)  # trtllm.py maps gpu_fraction
        assert "gpu_memory_utilization" not in op.engine_args


@pytest.mark.skipif(installed_engine_args("vllm") is None, reason="vLLM is not installed")
def test_every_engine_arg_the_plan_gives_vllm_is_one_the_installed_vllm_accepts():
    """What failed at engine start after validate passed: every key reaches AsyncEngineArgs."""
    known = installed_engine_args("vllm")
    graphs = [layout_graph("vllm"), MONOLITH]
    graphs += [(ROOT / "graphs" / g).read_text() for g in ("llm_disagg.yaml", "llm_disagg_cpu.yaml", "llm_vllm_monolith.yaml")]
    for text in graphs:
        for op in engine_ops(plan_of(text)):
            assert set(op.engine_args) <= known, set(op.engine_args) - known


def test_vllm_rejects_what_it_cannot_take_from_a_layout_at_validation(tmp_path: Path):
    text = errors_of(layout_graph("vllm", gpus=0))  # CPU-only: gpu_memory_utilization would take the machine's memory
    assert "disagg_single_node.yaml:12:3: context_servers.gpu_fraction: gpu_fraction shares GPUs, and cluster.gpus_per_node is 0" in text
    layout = tmp_path / "layout.yaml"
    layout.write_text("backend: tensorrt\n")
    # the layout file beside the graph: an absolute layout_file is refused (docs/security.md)
    bad = layout_graph("vllm").replace("../configs/disagg_single_node.yaml", layout.name)
    bad = bad.replace("layout_file:", "servers: {num_instances: 1, kv_cache_config: {free_gpu_memory_fraction: 0.5}}\n  layout_file:")
    with pytest.raises(SpecErrors) as info:
        parse_graph(textwrap.dedent(bad), file="g.yaml", base_dir=str(tmp_path))
    text = info.value.render()
    assert "layout.yaml:1:1: backend: backend picks a TensorRT-LLM backend" in text  # points into the layout file
    assert "g.yaml" in text and "llm.servers.kv_cache_config: kv_cache_config is a TensorRT-LLM setting" in text


def test_gpu_fraction_and_gpu_memory_utilization_must_agree():
    text = errors_of(layout_graph("vllm").replace("  model: some/model\n", "  model: some/model\n  engine_args: {gpu_memory_utilization: 0.9}\n"))
    assert "context_servers.gpu_fraction: gpu_fraction is vLLM's gpu_memory_utilization, which engine_args set to 0.9" in text
    same = layout_graph("vllm").replace("  model: some/model\n", "  model: some/model\n  engine_args: {gpu_memory_utilization: 0.25}\n")
    assert all(o.engine_args["gpu_memory_utilization"] == 0.25 for o in engine_ops(plan_of(same)))


def test_a_declared_operators_role_must_be_its_sets():
    text = errors_of(MONOLITH.replace("{name: llm, kind: vllm,", "{name: llm, kind: vllm, role: context,"))
    assert "operators[0].role: operator 'llm' is llm.servers's, which serves role both (got 'context')" in text
