"""Operator kinds: one model per kind, typed parameters for tdist's own kinds, engine args left to
the engine. Pure, apart from reading the installed vLLM's source (and importing it once to compare)."""

from __future__ import annotations

import dataclasses
import importlib.util
import pkgutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import tdist.operators
from tdist.errors import SpecErrors
from tdist.plan import build_plan
from tdist.spec import GraphSpec, parse_graph
from tdist.spec.engine_args import check_engine_args, dataclass_fields_in_source, installed_engine_args
from tdist.spec.operators import (
    OPERATOR_KINDS,
    FrontendParameters,
    RouterParameters,
    TritonParameters,
    TrtllmParameters,
    VllmParameters,
)
from tdist.spec.reference import SECTIONS

ROOT = Path(__file__).resolve().parents[2]

GRAPH = """\
name: g
llm:
  model: some/model
  servers: {num_instances: 1}
operators:
  - {name: router, kind: router, targets: [llm], parameters: {policy: kv, retries: 3}}
  - {name: fe, kind: frontend, targets: [router], port: 9000}
  - {name: kserve, kind: frontend, protocol: kserve, targets: [router], port: 9001, parameters: {grpc_port: null}}
  - {name: tri, kind: triton, repository: ./models, parameters: {triton_mode: process}}
  - {name: py, implementation: "m:A", parameters: {anything: [1, 2]}}
workers:
  - {name: router, operators: [router]}
  - {name: fe, operators: [fe, kserve]}
  - {name: work, operators: [tri, py]}
"""


def errors_of(text: str) -> str:
    with pytest.raises(SpecErrors) as info:
        parse_graph(textwrap.dedent(text), file="g.yaml", base_dir="/base")
    assert info.value.exit_code == 2
    return info.value.render()


def test_each_kind_gets_its_own_model():
    spec = parse_graph(GRAPH, file="g.yaml", base_dir="/base")
    assert [type(op) for op in spec.operators] == [OPERATOR_KINDS[k] for k in ("router", "frontend", "frontend", "triton", "python")]
    router = spec.operators[0]
    assert isinstance(router.parameters, RouterParameters) and router.parameters.policy == "kv"
    assert spec.operators[2].parameters.grpc_port is None


def test_the_plan_passes_the_keys_the_operators_read_and_only_those_the_graph_sets():
    plan = build_plan(parse_graph(GRAPH, file="g.yaml", base_dir="/base"), run_dir="/run")
    ops = {o.name: o for w in plan.workers for o in w.operators}
    assert ops["router"].parameters == {"policy": "kv", "retries": 3}
    assert ops["fe"].parameters == {"protocol": "openai", "port": 9000, "served_models": ["some/model"]}
    assert ops["kserve"].parameters == {"grpc_port": None, "protocol": "kserve", "port": 9001}  # null: no gRPC
    assert ops["tri"].parameters == {"triton_mode": "process"}
    assert ops["py"].parameters == {"anything": [1, 2]} and ops["py"].implementation == "m:A"
    assert ops["router"].targets == ["llm"] and ops["py"].targets == [] and ops["tri"].targets == []


@pytest.mark.parametrize(("operator", "where", "wanted"), [
    ("{name: router, kind: router, targets: [llm], parameters: {polcy: kv}}", "operators[0].parameters.polcy", "policy"),
    ("{name: router, kind: router, targets: [llm], parameters: {retrys: 1}}", "operators[0].parameters.retrys", "retries"),
    ("{name: router, kind: frontend, targets: [llm], parameters: {grcp_port: 1}}", "operators[0].parameters.grcp_port", "grpc_port"),
    ("{name: router, kind: triton, repository: x, parameters: {triton_mod: auto}}", "operators[0].parameters.triton_mod", "triton_mode"),
    ("{name: router, kind: vllm, parameters: {pin_engin: false}}", "operators[0].parameters.pin_engin", "pin_engine"),
    ("{name: router, kind: trtllm, parameters: {default_max_token: 4}}", "operators[0].parameters.default_max_token",
     "default_max_tokens"),
])
def test_a_misspelt_setting_of_each_kind_says_did_you_mean(operator: str, where: str, wanted: str):
    text = errors_of(f"name: g\nllm: {{model: m, servers: {{}}}}\noperators:\n  - {operator}\n"
                     "workers: [{name: w, operators: [router]}]\n")
    assert f"{where}: unknown key" in text and f"did you mean {wanted!r}?" in text


def test_router_polcy_fails_tdist_validate_with_exit_2(monkeypatch, capsys, tmp_path):
    from tdist.cli.app import main

    text = (ROOT / "graphs" / "llm_vllm_monolith.yaml").read_text().replace("      policy: round_robin", "      polcy: round_robin")
    path = tmp_path / "g.yaml"
    path.write_text(text)
    monkeypatch.setattr(sys, "argv", ["tdist", "validate", str(path)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "operators[1].parameters.polcy: unknown key (got 'polcy')" in err and "did you mean 'policy'?" in err
    assert "Traceback" not in err


def test_a_setting_one_level_off_is_pointed_at():
    text = errors_of("""\
        name: g
        operators:
          - {name: r, kind: router, targets: [p], policy: kv}
          - {name: f, kind: frontend, targets: [r], parameters: {port: 80}}
          - {name: p, implementation: "m:A"}
        workers: [{name: w, operators: [r, f, p]}]
        """)
    assert "operators[0].policy: unknown key" in text and "did you mean 'operators[0].parameters.policy'?" in text
    assert "operators[1].parameters.port: unknown key" in text and "did you mean 'operators[1].port'?" in text


def test_an_unknown_kind_suggests_the_close_one():
    text = errors_of("name: g\noperators: [{name: r, kind: routr}]\nworkers: [{name: w, operators: [r]}]\n")
    assert "operators[0].kind: unknown kind" in text and "did you mean 'router'?" in text


def test_a_key_of_another_kind_is_reported_with_the_cross_field_checks():
    text = errors_of("""\
        name: g
        operators:
          - {name: r, kind: router, targets: [p], repository: x}
          - {name: p, implementation: "m:A", targets: [r]}
        workers: [{name: w, operators: [r, p, nope]}]
        """)
    assert "operators[0].repository: 'repository' only applies to kind triton (got 'router')" in text
    assert "operators[1].targets: 'targets' only applies to kind frontend / router" in text
    assert "workers[0].operators[2]: unknown operator" in text  # the checks still ran


def test_frontend_parameters_of_the_other_protocol_are_rejected():
    text = errors_of("""\
        name: g
        operators:
          - {name: p, implementation: "m:A"}
          - {name: f, kind: frontend, protocol: kserve, targets: [p], parameters: {default_chat_max_tokens: 9}}
        workers: [{name: w, operators: [p, f]}]
        """)
    assert "operators[1].parameters.default_chat_max_tokens: 'default_chat_max_tokens' only applies to protocol openai" in text


def test_router_disaggregation_targets_must_be_its_targets():
    text = errors_of("""\
        name: g
        operators:
          - {name: a, implementation: "m:A"}
          - {name: b, implementation: "m:A"}
          - {name: r, kind: router, targets: [a, b], parameters: {context_target: c}}
        workers: [{name: w, operators: [a, b, r]}]
        """)
    assert "operators[2].parameters.context_target: not one of the router's targets (got 'c')" in text


def test_every_parameter_is_a_key_some_operator_reads():
    """The typed parameters name what tdist/operators/* read (`parameters.get("policy")`...)."""
    sources = ""
    for mod in pkgutil.walk_packages(tdist.operators.__path__, "tdist.operators."):
        spec = importlib.util.find_spec(mod.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            sources += Path(spec.origin).read_text()
    for model in (RouterParameters, FrontendParameters, TritonParameters, VllmParameters, TrtllmParameters):
        for name in model.model_fields:
            assert f'"{name}"' in sources, f"{model.__name__}.{name}: no operator reads parameters[{name!r}]"


def test_every_field_of_every_spec_model_has_a_description():
    seen: set[type[BaseModel]] = set()
    for _title, model in SECTIONS:
        assert model.__doc__, model
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"
        seen.add(model)
    assert set(OPERATOR_KINDS.values()) <= seen


# ---------------------------------------------------------------- engine args


def test_dataclass_fields_in_source():
    src = textwrap.dedent("""\
        from typing import ClassVar
        @dataclass
        class EngineArgs:
            model: str = "m"
            max_model_len: int | None = None
            registry: ClassVar[dict] = {}
            def method(self) -> None:
                local: int = 1
        class AsyncEngineArgs(EngineArgs):
            enable_log_requests: bool = False
        """)
    assert dataclass_fields_in_source(src, ("EngineArgs", "AsyncEngineArgs")) == {"model", "max_model_len", "enable_log_requests"}
    assert dataclass_fields_in_source(src, ("EngineArgs", "Missing")) is None


ENGINE_GRAPH = """\
name: g
llm:
  model: some/model
  engine_args: {max_model_len: 512, enforce_eagr: true, config: x.yaml}
  servers: {num_instances: 1, engine_args: {default_max_tokens: 5}}
operators:
  - {name: v, kind: vllm, engine_args: {max_model_lenn: 1}}
workers: [{name: w, operators: [v]}]
"""


def _problems(names_of) -> str:  # noqa: ANN001
    spec = GraphSpec.model_validate(yaml.safe_load(ENGINE_GRAPH))
    return "\n".join(f"{'.'.join(map(str, p.loc))}: {p.rule} / {p.hint}" for p in check_engine_args(spec, names_of))


def test_engine_args_are_checked_against_the_installed_engine():
    known = frozenset({"model", "max_model_len", "enforce_eager", "tensor_parallel_size"})
    text = _problems(lambda engine: known if engine == "vllm" else None)
    assert "llm.engine_args.enforce_eagr: not an engine argument of the installed vllm / did you mean 'enforce_eager'?" in text
    assert "llm.servers.engine_args.default_max_tokens" in text and "a tdist setting: put it under the vllm operator's parameters" in text
    assert "operators.0.engine_args.max_model_lenn" in text and "did you mean 'max_model_len'?" in text
    assert "config" not in text  # tdist's own key: a file of engine args
    assert len(text.splitlines()) == 3


def test_engine_args_pass_through_when_the_engine_is_not_installed():
    assert _problems(lambda engine: None) == ""


VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_validate_reports_an_engine_arg_the_installed_vllm_does_not_know():
    text = errors_of(ENGINE_GRAPH.replace("  servers: {num_instances: 1, engine_args: {default_max_tokens: 5}}\n", "")
                     .replace("max_model_lenn", "max_model_len"))
    assert "llm.engine_args.enforce_eagr: not an engine argument of the installed vllm" in text
    assert "did you mean 'enforce_eager'?" in text


@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_vllm_engine_args_read_from_source_are_the_dataclass_fields():
    names = installed_engine_args("vllm")
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert names == {f.name for f in dataclasses.fields(AsyncEngineArgs)}
