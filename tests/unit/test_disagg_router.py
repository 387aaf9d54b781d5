"""Disaggregated serving: connector settings per role, and the router's prefill → decode flow
over in-process fake context / generation workers (failures included)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

try:
    from test_llm_harness import FakeLLM, InProcessClient, make_context
except ImportError:  # pragma: no cover
    from tests.unit.test_llm_harness import FakeLLM, InProcessClient, make_context
from tdist.operators.llm.kv_transfer import check_handle, connector_settings, side_channel_env
from tdist.operators.routing.disagg import decide, prefill_parameters, valid_handle
from tdist.operators.routing.router import RouterOperator
from tdist.runtime.operator import Request

HANDLE = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "e1", "remote_block_ids": [[1, 2]],
          "remote_host": "127.0.0.1", "remote_port": 5600, "remote_request_id": "r1"}


def test_connector_settings_by_role() -> None:
    assert connector_settings("both", cpu=True) is None
    ctx = connector_settings("context", cpu=True)
    assert ctx["kv_connector"] == "NixlConnector" and ctx["kv_role"] == "kv_producer"
    assert ctx["kv_buffer_device"] == "cpu" and ctx["kv_connector_extra_config"]["kv_lease_duration"] >= 120
    gen = connector_settings("generation", cpu=False, given={"kv_connector_extra_config": {"x": 1}})
    assert gen["kv_role"] == "kv_consumer" and gen["kv_load_failure_policy"] == "recompute"
    assert "kv_buffer_device" not in gen and gen["kv_connector_extra_config"] == {"kv_lease_duration": 120, "x": 1}
    assert ctx["kv_connector_extra_config"]["num_threads"] == 1
    assert ctx["kv_connector_module_path"] == "tdist.operators.llm.nixl_cpu"  # AMX asked for in the engine processes
    assert "kv_connector_module_path" not in gen  # GPU: vLLM's own connector


def test_nixl_env_from_parameters() -> None:
    from tdist.errors import OperatorLoadError
    from tdist.operators.llm.kv_transfer import nixl_env

    assert nixl_env({}) == {"TDIST_NIXL_PROGRESS": "busy"}  # a context engine: the passive side of every READ
    assert nixl_env({}, "generation") == {"TDIST_NIXL_PROGRESS": "off"}  # it polls its own pulls each step
    assert nixl_env({"nixl_progress": "busy"}, "generation")["TDIST_NIXL_PROGRESS"] == "busy"
    assert nixl_env({"nixl_progress_thread": True})["TDIST_NIXL_PROGRESS"] == "busy"
    assert nixl_env({"nixl_progress_thread": False})["TDIST_NIXL_PROGRESS"] == "off"
    assert nixl_env({"nixl_progress": "OFF"})["TDIST_NIXL_PROGRESS"] == "off"
    with pytest.raises(OperatorLoadError, match="busy or off"):
        nixl_env({"nixl_progress": "sometimes"})


def test_side_channel_env_picks_a_free_port_unless_given() -> None:
    from tdist.runtime.ports import ephemeral_range

    env = side_channel_env({}, {})
    port = int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"])
    lo, hi = ephemeral_range()
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1" and not lo <= port <= hi
    assert side_channel_env({"kv_side_channel_port": 7777}, {})["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "7777"


def test_pure_helpers() -> None:
    p = prefill_parameters({"prompt": "x", "max_tokens": 50, "min_tokens": 3, "temperature": 0.0, "disagg": True})
    assert p["max_tokens"] == 1 and "min_tokens" not in p and "disagg" not in p
    assert p["kv_transfer_params"]["do_remote_decode"] is True
    assert valid_handle(HANDLE) and not valid_handle({**HANDLE, "remote_block_ids": None}) and not valid_handle(None)
    assert decide(10, 64, None) == "local_short_prompt"
    assert decide(100, 64, None) is None
    assert decide(100, 64, False) == "local_requested"


class FakeContext(FakeLLM):
    """Prefill-only worker: one token, final carries a KV handle (or misbehaves on request)."""

    mode = "ok"  # ok | fail | hang | nohandle

    async def execute(self, request: Request) -> None:
        self.seen.append(dict(request.parameters))
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "fail":
            from tdist.errors import WorkerLost

            raise WorkerLost("context worker died", operator=self.name)
        params: dict[str, Any] = {"text": "z", "finish_reason": "length", "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
        if self.mode == "ok":
            params["kv_transfer_params"] = dict(HANDLE)
        await request.send({"token_ids": np.asarray([1], np.int64)}, parameters=params, final=True)


def setup(threshold: int = 4, n_ctx: int = 1, **router_params: Any) -> tuple[InProcessClient, RouterOperator, list[FakeContext], list[FakeLLM]]:
    client = InProcessClient()
    ctxs = []
    for i in range(n_ctx):
        c = FakeContext(make_context("context", parameters={}))
        client.add(f"context.{i}", c)
        ctxs.append(c)
    gens = []
    for i in range(2):
        g = FakeLLM(make_context("generation", parameters={"tag": f"g{i}:"}))
        client.add(f"generation.{i}", g)
        gens.append(g)
    router = RouterOperator(make_context("router", "router", client=client, targets=["context", "generation"],
                                         parameters={"disagg_min_prompt_tokens": threshold, **router_params}))
    client.add("router.0", router)
    return client, router, ctxs, gens


async def run(client: InProcessClient, prompt: str, **params: Any) -> list[Any]:
    return [r async for r in client.infer("router", parameters={"prompt": prompt, "max_tokens": 3, **params}, timeout_s=20)]


LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen"


async def test_long_prompt_prefills_on_context_and_decodes_with_the_handle() -> None:
    client, router, ctxs, gens = setup()
    out = await run(client, LONG)
    assert out[-1].final and out[-1].parameters["disagg"] == "remote_prefill"
    assert out[-1].parameters["prefilled_on"] == "context.0"
    assert ctxs[0].seen[0]["max_tokens"] == 1 and ctxs[0].seen[0]["kv_transfer_params"]["do_remote_decode"]
    decoded = [s for g in gens for s in g.seen]
    assert len(decoded) == 1 and decoded[0]["kv_transfer_params"]["remote_engine_id"] == "e1"
    assert decoded[0]["max_tokens"] == 3 and len(out) == 3
    assert router.stats()["disagg"]["decisions"]["remote_prefill"] == 1


async def test_short_prompt_is_prefilled_on_the_generation_worker() -> None:
    client, router, ctxs, gens = setup(threshold=10_000)
    out = await run(client, "hi there")
    assert out[-1].parameters["disagg"] == "local_short_prompt"
    assert not ctxs[0].seen
    assert "kv_transfer_params" not in [s for g in gens for s in g.seen][0]
    assert router.stats()["disagg"]["decisions"]["local_short_prompt"] == 1


@pytest.mark.parametrize("mode", ["fail", "hang", "nohandle"])
async def test_context_failure_falls_back_to_local_prefill(mode: str) -> None:
    client, router, ctxs, gens = setup(context_timeout_s=0.3)
    ctxs[0].mode = mode
    out = await asyncio.wait_for(run(client, LONG), 10)
    assert out[-1].final and out[-1].parameters["disagg"] == "local_after_context_failure"
    assert "kv_transfer_params" not in [s for g in gens for s in g.seen][0]
    assert len(out) == 3


async def test_context_failure_retries_on_another_context_worker() -> None:
    client, router, ctxs, gens = setup(n_ctx=2, policy="round_robin")
    ctxs[0].mode = "fail"
    for _ in range(2):
        out = await run(client, LONG)
        assert out[-1].parameters["disagg"] == "remote_prefill"
        assert out[-1].parameters["prefilled_on"] == "context.1"
    assert router.stats()["disagg"]["decisions"]["context_retry"] <= 1  # context.0 cools down after one failure


async def test_no_context_worker_means_local_prefill_and_kv_policy_works_in_disagg_mode() -> None:
    client, router, ctxs, gens = setup(policy="kv")
    client.remove("context.0", "context")
    out = await run(client, LONG)
    assert out[-1].parameters["disagg"] == "local_no_context"
    client.add("context.0", ctxs[0])
    out = await run(client, LONG, disagg=False)
    assert out[-1].parameters["disagg"] == "local_requested"
    out = await run(client, LONG)
    assert out[-1].parameters["disagg"] == "remote_prefill"


def test_prometheus_families_of_router_and_llm_stats() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from tdist.operators.routing.router import router_metric_families
    from tdist.operators.llm.llm_common import llm_metric_families, register_collector

    reg = CollectorRegistry()
    register_collector(reg, lambda: router_metric_families(
        {"routed": {"context.0": 2}, "disagg": {"decisions": {"remote_prefill": 2, "local_short_prompt": 1}},
         "kv_expected_hit_rate": 0.5}, "router.0", "router"))
    register_collector(reg, lambda: llm_metric_families(
        {"role": "generation", "inflight": 1, "kv_cache_usage": 0.25, "prefix_cache_hit_rate": 0.5,
         "prompt_tokens_local_compute": 3, "prompt_tokens_external_kv_transfer": 500}, "generation.0", "generation"))
    text = generate_latest(reg).decode()
    assert 'tdist_router_disagg_requests_total{decision="local_short_prompt",operator="router",worker="router.0"} 1.0' in text
    assert 'tdist_llm_kv_cache_usage{operator="generation",role="generation",worker="generation.0"} 0.25' in text
    assert 'source="external_kv_transfer"' in text and "tdist_router_kv_expected_hit_rate" in text


def test_check_handle_refuses_shapes_that_would_crash_the_engine() -> None:
    assert check_handle(None) is None and check_handle(HANDLE) is None
    assert check_handle({"do_remote_decode": True}) is None  # a prefill request, not a pull
    assert "remote_block_ids" in check_handle({**HANDLE, "remote_block_ids": [1, 2]})
    assert "remote_port" in check_handle({**HANDLE, "remote_port": "5600"})
    assert "object" in check_handle([1])


async def test_a_remote_prefill_whose_kv_never_arrives_is_given_up_and_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM has no KV-pull timeout: the operator gives a stuck pull up (aborting the engine
    request) with WorkerLost, which the router retries with a local prefill."""
    pytest.importorskip("vllm")
    from tdist.errors import WorkerLost
    from tdist.operators.llm.convention import LLMPrompt, SamplingOptions
    from tdist.operators.llm.vllm import VllmEngine, _first_within

    async def stuck():
        await asyncio.sleep(3600)
        yield "never"

    async def quick():
        for i in range(3):
            yield i

    assert [x async for x in _first_within(quick(), 0.5)] == [0, 1, 2]
    assert [x async for x in _first_within(quick(), None)] == [0, 1, 2]

    class FakeLLM:
        def __init__(self) -> None:
            self.aborted: list[str] = []

        def generate(self, prompt, params, request_id):  # noqa: ANN001, ANN201
            return stuck()

        async def abort(self, request_id: str) -> None:
            self.aborted.append(request_id)

    eng = VllmEngine({"model": "m"}, role="generation", disagg_parameters={"kv_pull_timeout_s": 0.2})
    eng.llm = FakeLLM()
    eng._engine_prompt = lambda prompt: "x"  # type: ignore[method-assign]
    import tdist.operators.llm.vllm as vmod

    monkeypatch.setattr(vmod, "to_vllm_sampling", lambda sampling, extra=None: None)
    kvp = dict(HANDLE)
    with pytest.raises(WorkerLost, match="KV pull from 127.0.0.1:5600 did not complete"):
        async for _ in eng.generate(LLMPrompt(text="x"), SamplingOptions(), "r-1", extra={"kv_transfer_params": kvp}):
            pass
    assert eng.llm.aborted == ["r-1"]
