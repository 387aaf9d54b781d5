"""Router: pure policies, and the forwarding loop over in-process fake LLM workers."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

try:  # tests/unit is a rootdir-less test folder; also importable as a package
    from test_llm_harness import FakeLLM, InProcessClient, make_context
except ImportError:  # pragma: no cover
    from tests.unit.test_llm_harness import FakeLLM, InProcessClient, make_context
from tdist.errors import BadRequest, NoWorkerError, OperatorError, OperatorLoadError
from tdist.operators.routing.policies import (
    Candidate,
    LeastLoaded,
    PrefixAffinity,
    RoundRobin,
    RouteKey,
    inflight_of,
    make_policy,
    role_of,
)
from tdist.operators.routing.router import RouterOperator


def cands(*names: str, loads: dict[str, int] | None = None) -> list[Candidate]:
    loads = loads or {}
    return [Candidate(name=n, reported_inflight=loads.get(n, 0)) for n in names]


# -- policies -----------------------------------------------------------------------------------


def test_round_robin_cycles_in_name_order() -> None:
    p = RoundRobin()
    picks = [p.select(RouteKey("x"), cands("b", "a", "c")).name for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_prefers_idle_and_rotates_ties() -> None:
    p = LeastLoaded()
    assert p.select(RouteKey(), cands("a", "b", loads={"a": 3, "b": 1})).name == "b"
    picks = {p.select(RouteKey(), cands("a", "b")).name for _ in range(4)}
    assert picks == {"a", "b"}
    # local outstanding counts beat a stale report
    c = [Candidate("a", reported_inflight=0, local_inflight=5), Candidate("b", reported_inflight=2)]
    assert p.select(RouteKey(), c).name == "b"


def test_prefix_affinity_sticks_and_moves_only_when_gone() -> None:
    p = PrefixAffinity(prefix_chars=10)
    first = p.select(RouteKey("0123456789 tail one"), cands("a", "b", "c")).name
    for tail in ("tail two", "another tail", ""):
        assert p.select(RouteKey("0123456789" + tail), cands("a", "b", "c")).name == first
    # load does not move it while it is alive
    assert p.select(RouteKey("0123456789"), cands("a", "b", "c", loads={first: 50})).name == first
    # gone → another, and the new choice sticks
    rest = [n for n in ("a", "b", "c") if n != first]
    moved = p.select(RouteKey("0123456789"), cands(*rest)).name
    assert moved in rest
    assert p.select(RouteKey("0123456789"), cands("a", "b", "c")).name == moved


def test_prefix_affinity_spreads_distinct_prefixes() -> None:
    p = PrefixAffinity(prefix_chars=8)
    picks = Counter(p.select(RouteKey(f"prefix{i:02d} and more"), cands("a", "b")).name for i in range(40))
    assert set(picks) == {"a", "b"} and min(picks.values()) >= 8


def test_rendezvous_choice_is_shared_between_routers() -> None:
    a, b = PrefixAffinity(16), PrefixAffinity(16)
    for i in range(20):
        key = RouteKey(f"conversation {i} says hello")
        assert a.select(key, cands("w0", "w1", "w2")).name == b.select(key, cands("w2", "w1", "w0")).name


def test_make_policy_rejects_unknown() -> None:
    assert make_policy("prefix", {"prefix_chars": 5}).prefix(RouteKey("abcdefgh")) == "abcde"  # type: ignore[attr-defined]
    with pytest.raises(OperatorLoadError, match="round_robin"):
        make_policy("random")


def test_discovery_entry_extractors() -> None:
    entry = {"roles": {"llm": "context"}, "inflight": 9,
             "per_operator": {"llm": {"inflight": 2, "queued": 3, "stats": {"kv_cache_usage": 0.5}}}}
    assert inflight_of(entry, "llm") == 5
    assert role_of(entry, "llm") == "context"
    assert inflight_of({"inflight": 4}, "llm") == 4
    assert role_of({}, "llm") == "both"


# -- forwarding ---------------------------------------------------------------------------------


def make_router(client: InProcessClient, **params: object) -> RouterOperator:
    return RouterOperator(make_context("router", "router", client=client, targets=["llm"], parameters=dict(params)))


def add_workers(client: InProcessClient, n: int, **params: object) -> list[FakeLLM]:
    ops = []
    for i in range(n):
        op = FakeLLM(make_context("llm", parameters={"tag": f"w{i}:", **params}))
        client.add(f"llm.{i}", op)
        ops.append(op)
    return ops


async def call(client: InProcessClient, prompt: str, **params: object) -> list:
    return [r async for r in client.infer("router", parameters={"prompt": prompt, **params})]


async def test_router_round_robin_spreads_and_streams() -> None:
    client = InProcessClient()
    add_workers(client, 2)
    client.add("router.0", make_router(client, policy="round_robin"))
    routed = []
    for i in range(6):
        chunks = await call(client, f"hello {i}", max_tokens=3)
        assert len(chunks) == 3 and chunks[-1].final
        assert chunks[-1].parameters["finish_reason"] == "length"
        routed.append(chunks[-1].parameters["routed_to"])
    assert Counter(routed) == {"llm.0": 3, "llm.1": 3}


async def test_router_prefix_affinity_sticks() -> None:
    client = InProcessClient()
    add_workers(client, 2)
    client.add("router.0", make_router(client, policy="prefix", prefix_chars=20))
    system = "You are a helpful assistant. "
    routed = {(await call(client, system + f"question {i}", max_tokens=1))[-1].parameters["routed_to"] for i in range(5)}
    assert len(routed) == 1


async def test_router_least_loaded_avoids_busy_worker() -> None:
    client = InProcessClient()
    add_workers(client, 2, delay_s=0.05)
    router = make_router(client, policy="least_loaded")
    client.add("router.0", router)
    results = await asyncio.gather(*(call(client, f"p{i}", max_tokens=4) for i in range(6)))
    routed = Counter(r[-1].parameters["routed_to"] for r in results)
    assert routed == {"llm.0": 3, "llm.1": 3}


async def test_router_retries_when_a_worker_vanished() -> None:
    client = InProcessClient()
    add_workers(client, 2)
    router = make_router(client, policy="round_robin", retries=2)
    client.add("router.0", router)

    async def gone_instances(operator: str, *, max_age_s: float = 1.0) -> dict:
        # discovery still lists llm.9, which no longer answers
        live = await InProcessClient.instances(client, operator)
        return {**live, "llm.9": {"operators": [operator], "state": "ready"}} if operator == "llm" else live

    client.instances = gone_instances  # type: ignore[method-assign]
    for i in range(4):
        chunks = await call(client, f"q{i}", max_tokens=2)
        assert chunks[-1].parameters["routed_to"] in ("llm.0", "llm.1")
    assert router.health.failures.get("llm.9", 0) >= 1
    assert router.retried >= 1


async def test_router_errors_are_typed() -> None:
    client = InProcessClient()
    client.add("router.0", make_router(client))
    with pytest.raises(NoWorkerError):
        await call(client, "nobody home")
    add_workers(client, 1, fail=True)
    with pytest.raises(OperatorError, match="exploded"):
        await call(client, "boom")
    with pytest.raises(BadRequest):
        async for _ in client.infer("router", parameters={"max_tokens": 3}):
            pass


async def test_router_cancellation_reaches_the_worker() -> None:
    client = InProcessClient()
    (w,) = add_workers(client, 1, delay_s=0.02)
    client.add("router.0", make_router(client))
    gen = client.infer("router", parameters={"prompt": "a b c", "max_tokens": 1000})
    first = await gen.__anext__()
    assert first.parameters["text"] == "w0:a "
    await gen.aclose()
    for _ in range(50):
        if w.cancelled:
            break
        await asyncio.sleep(0.01)
    assert w.cancelled == 1


def test_router_needs_a_target() -> None:
    with pytest.raises(OperatorLoadError, match="targets"):
        RouterOperator(make_context("router", "router", client=InProcessClient()))
