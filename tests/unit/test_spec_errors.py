"""Bad graphs: each error names the YAML path, what was found, the rule and the fix. Pure (no I/O but tmp files)."""

from __future__ import annotations

import textwrap

import pytest

from tdist.errors import SpecError, SpecErrors, TdistError
from tdist.spec import parse_graph

GOOD = """\
name: g
python_path: [ops]
operators:
  - name: encoder
    implementation: "mod:Encoder"
  - name: decoder
    implementation: "mod:Decoder"
workers:
  - name: encoder
    operators: [encoder]
    replicas: 2
  - name: decoder
    operators: [decoder]
"""

LLM = """\
name: llm
llm:
  model: ./m
  context_servers: {num_instances: 1, tp_size: 2}
  generation_servers: {num_instances: 2}
operators:
  - {name: router, kind: router}
  - {name: frontend, kind: frontend, port: 8000}
workers:
  - {name: router, operators: [router]}
  - {name: frontend, operators: [frontend]}
cluster: {gpus_per_node: 4}
"""


def error_text(text: str, **kw) -> str:
    with pytest.raises(TdistError) as info:
        parse_graph(textwrap.dedent(text), file="g.yaml", base_dir="/base", **kw)
    assert isinstance(info.value, (SpecError, SpecErrors))
    assert info.value.exit_code == 2
    return info.value.render()


def test_good_graphs_parse():
    assert parse_graph(GOOD, file="g.yaml", base_dir="/base").workers[0].replicas == 2
    assert parse_graph(LLM, file="g.yaml", base_dir="/base").llm is not None


def test_misspelt_key_says_did_you_mean_with_line_and_column():
    text = error_text(GOOD.replace("    replicas: 2", "    replcas: 2"))
    assert "g.yaml:11:5: workers[0].replcas: unknown key (got 'replcas')" in text
    assert "did you mean 'replicas'?" in text


def test_unknown_top_level_key_lists_allowed_keys_or_suggests():
    assert "did you mean 'operators'?" in error_text(GOOD.replace("operators:\n  - name: encoder\n", "operator:\n  - name: encoder\n", 1))
    text = error_text(GOOD + "zzz: 1\n")
    assert "zzz: unknown key" in text and "allowed keys here: name," in text


def test_yaml_syntax_error_has_line_and_column():
    text = error_text("name: g\noperators:\n  - name: [a\n    kind: python\n")
    assert "YAML syntax error" in text
    assert "g.yaml:4:" in text


def test_duplicate_yaml_key():
    text = error_text("name: g\nname: h\nworkers: []\n")
    assert "g.yaml:2:1: name: duplicate key in the same mapping" in text


def test_graph_must_be_a_mapping():
    assert "a graph must be a YAML mapping" in error_text("- a\n- b\n")


def test_missing_required_name():
    text = error_text(GOOD.replace("name: g\n", ""))
    assert text.startswith("g.yaml:1:1: name: ")
    assert "required key 'name' is missing" in text
    assert "Deployment name" in text


def test_bad_operator_kind_lists_choices():
    text = error_text(GOOD.replace('    implementation: "mod:Encoder"', '    kind: pythn\n    implementation: "mod:Encoder"'))
    assert "operators[0].kind" in text and "'pythn'" in text and "'python'" in text


def test_max_inflight_must_be_positive():
    text = error_text(GOOD.replace('    implementation: "mod:Decoder"', '    implementation: "mod:Decoder"\n    max_inflight_requests: 0'))
    assert "operators[1].max_inflight_requests" in text and "greater than or equal to 1" in text


def test_implementation_syntax():
    text = error_text(GOOD.replace('"mod:Encoder"', '"mod.Encoder"'))
    assert "operators[0].implementation" in text and "'mod.Encoder'" in text and "module:Class" in text


def test_python_operator_needs_implementation():
    text = error_text(GOOD.replace('    implementation: "mod:Encoder"\n', ""))
    assert "operators[0]: a python operator needs `implementation`" in text


def test_unknown_operator_reference_suggests_the_close_one():
    text = error_text(GOOD.replace("operators: [decoder]", "operators: [decodr]"))
    assert "workers[1].operators[0]: unknown operator (got 'decodr')" in text
    assert "did you mean 'decoder'?" in text


def test_duplicate_operator_and_worker_names():
    text = error_text(GOOD.replace("- name: decoder\n    implementation", "- name: encoder\n    implementation"))
    assert "operators[1].name: duplicate name (also operators[0])" in text
    text = error_text(GOOD.replace("  - name: decoder\n    operators", "  - name: encoder\n    operators"))
    assert "workers[1].name: duplicate name (also workers[0])" in text


def test_operator_no_worker_hosts():
    text = error_text(GOOD.replace("  - name: decoder\n    operators: [decoder]\n", ""))
    assert "operators[1]: no worker hosts this operator" in text and "add it to a worker" in text


def test_router_target_unknown():
    text = error_text(LLM.replace("{name: router, kind: router}", "{name: router, kind: router, targets: [contxt]}"))
    assert "operators[0].targets[0]: unknown operator (got 'contxt')" in text and "did you mean 'context'?" in text


def test_gpu_oversubscription_unless_fraction_allows():
    g = GOOD + "cluster: {gpus_per_node: 1}\n"
    g = g.replace("    replicas: 2\n", "    replicas: 2\n    placement: {gpus: 1}\n")
    text = error_text(g)
    assert "workers[0].placement: GPUs over-subscribed: replica 1 of 'encoder'" in text
    assert "gpu_fraction" in text
    shared = parse_graph(g.replace("{gpus: 1}", "{gpus: 1, gpu_fraction: 0.5}"), file="g.yaml", base_dir="/b")
    assert shared.workers[0].placement.gpu_fraction == 0.5


def test_fixed_gpu_ids_shared_without_fraction():
    g = (GOOD + "cluster: {gpus_per_node: 2}\n").replace("    replicas: 2\n", "    replicas: 2\n    placement: {gpu_ids: [1]}\n")
    text = error_text(g)
    assert "workers[0].placement.gpu_ids: GPU 1 on node 0 is over-subscribed" in text
    parse_graph(g.replace("{gpu_ids: [1]}", "{gpu_ids: [1], gpu_fraction: 0.5}"), file="g.yaml", base_dir="/b")


def test_gpus_on_a_cpu_cluster():
    text = error_text(GOOD.replace("    replicas: 2\n", "    replicas: 2\n    placement: {gpus: 1}\n"))
    assert "cluster.gpus_per_node is 0" in text


def test_tp_times_pp_larger_than_a_node_without_multi_node():
    trt = LLM.replace("  model: ./m\n", "  model: ./m\n  engine: trtllm\n")
    text = error_text(trt.replace("{num_instances: 1, tp_size: 2}", "{num_instances: 1, tp_size: 4, pp_size: 2}"))
    assert "llm.context_servers: one instance needs 8 GPUs but a node has 4" in text
    assert "cluster.nodes > 1" in text
    ok = trt.replace("{num_instances: 1, tp_size: 2}", "{num_instances: 1, tp_size: 4, pp_size: 2}")
    ok = ok.replace("cluster: {gpus_per_node: 4}", "cluster: {gpus_per_node: 4, nodes: 3}")
    parse_graph(ok, file="g.yaml", base_dir="/b")


def test_a_vllm_instance_must_fit_one_node_even_with_more_nodes():
    big = LLM.replace("{num_instances: 1, tp_size: 2}", "{num_instances: 1, tp_size: 4, pp_size: 2}")
    text = error_text(big.replace("cluster: {gpus_per_node: 4}", "cluster: {gpus_per_node: 4, nodes: 3}"))
    assert "llm.context_servers: a vLLM instance runs on one node" in text and "needs 8 GPUs, but a node has 4" in text
    assert "engine: trtllm" in text


def test_urls_count_must_match_num_instances():
    text = error_text(LLM.replace("{num_instances: 2}", '{num_instances: 2, urls: ["localhost:8003"]}'))
    assert "llm.generation_servers.urls: 1 urls for num_instances: 2" in text


def test_port_collision_between_frontend_and_server_url():
    text = error_text(LLM.replace("{num_instances: 2}", '{num_instances: 2, urls: ["localhost:8000", "localhost:8001"]}'))
    assert "port collision on localhost" in text and "frontend 'frontend'" in text


def test_metrics_ports_collide_with_frontend_port():
    text = error_text(LLM + "launch: {local: {metrics_port_base: 7998}}\n")
    assert "launch.local.metrics_port_base: metrics ports 7998..8002 include 8000" in text


def test_frontend_replicas_on_one_fixed_port():
    text = error_text(LLM.replace("{name: frontend, operators: [frontend]}", "{name: frontend, operators: [frontend], replicas: 2}"))
    assert "2 replicas of the worker hosting 'frontend' would all listen on 8000" in text


def test_disaggregated_servers_need_a_router():
    text = error_text(LLM.replace("  - {name: router, kind: router}\n", "").replace("  - {name: router, operators: [router]}\n", ""))
    assert "context/generation servers need a router" in text


def test_context_servers_alone():
    text = error_text(LLM.replace("  generation_servers: {num_instances: 2}\n", ""))
    assert "disaggregated serving needs both context and generation servers" in text


def test_request_plane_url():
    text = error_text(GOOD + "request_plane: http://x:4222\n")
    assert "request_plane: must be `embedded` or a URL like nats://host:4222 (got 'http://x:4222')" in text


def test_etcd_endpoints():
    assert "must look like http://host:2379" in error_text(GOOD + "discovery: {kind: etcd, etcd_endpoints: [x]}\n")
    text = error_text(GOOD + "discovery: {kind: nats, etcd_endpoints: ['http://e:2379']}\n")
    assert "discovery.etcd_endpoints: etcd_endpoints only applies with kind: etcd" in text


def test_field_for_another_kind():
    text = error_text(GOOD.replace('"mod:Encoder"', '"mod:Encoder"\n    port: 8000'))
    assert "operators[0].port: 'port' only applies to kind frontend" in text


def test_layout_file_missing_and_bad(tmp_path):
    g = LLM.replace("  model: ./m\n", "  model: ./m\n  layout_file: layout.yaml\n")
    assert "llm.layout_file: cannot read layout file" in error_text(g)
    (tmp_path / "layout.yaml").write_text("context_servers:\n  num_instances: 1\n  tp_sise: 2\n")
    with pytest.raises(SpecErrors) as info:
        parse_graph(g, file="g.yaml", base_dir=str(tmp_path))
    text = info.value.render()
    assert "layout.yaml:3:3: context_servers.tp_sise: unknown key" in text and "did you mean 'tp_size'?" in text


def test_url_host_outside_cluster():
    g = LLM.replace("{num_instances: 2}", '{num_instances: 2, urls: ["node1:8003", "node2:8004"]}')
    text = error_text(g)
    assert "llm.generation_servers.urls[1]: url host is not one of the cluster's nodes (cluster.nodes: 1)" in text


def test_srun_ntasks_must_match_world():
    text = error_text(LLM + "launch: {srun: {ntasks: 4}}\n")
    assert "launch.srun.ntasks: ntasks must equal the world size (3 ranks)" in text


def test_name_pattern_and_env_and_ucx():
    assert "name: String should match pattern" in error_text(GOOD.replace("name: g\n", "name: my.graph\n"))
    assert "env.1BAD: not a valid environment variable name" in error_text(GOOD + "env: {1BAD: x}\n")
    assert "must start with UCX_ (found 'TLS')" in error_text(GOOD + "data_plane: {ucx_env: {TLS: tcp}}\n")


def test_time_limit_format():
    text = error_text(GOOD + "launch: {srun: {time_limit: one hour}}\n")
    assert "launch.srun.time_limit" in text and "'one hour'" in text


def test_graph_with_nothing_to_start():
    assert "the graph starts no processes" in error_text("name: g\n")


def test_several_errors_reported_together():
    bad = GOOD.replace("operators: [decoder]", "operators: [decodr]").replace('"mod:Encoder"', '"mod:Encoder"\n    port: 1')
    text = error_text(bad)
    assert "unknown operator" in text and "only applies to kind frontend" in text


def test_frontend_extra_port_parameter_collides():
    text = error_text(LLM.replace("{name: frontend, kind: frontend, port: 8000}",
                                  "{name: frontend, kind: frontend, port: 8000, parameters: {grpc_port: 8000}}"))
    assert "operators[1].parameters.grpc_port: port collision on localhost" in text


def test_wrong_shape_says_what_to_write():
    text = error_text(GOOD.replace("  - name: decoder\n    operators: [decoder]\n", "  - decoder\n"))
    assert "workers[1]: Input should be a valid dictionary (got 'decoder')" in text
    assert "write a mapping with keys from: name, operators, replicas" in text
