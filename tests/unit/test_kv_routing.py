"""KV-aware routing (policy `kv`): block hashing, the per-instance index, and the choice."""

from __future__ import annotations

import pytest

from tdist.operators.routing.kv_routing import KvAware, KvIndex, block_hashes, text_block_hashes
from tdist.operators.routing.policies import Candidate, RouteKey, make_policy


def _key(tokens: list[int], block: int = 4) -> RouteKey:
    return RouteKey("", len(tokens), block_hashes(tokens, block))


def test_block_hashes_chain_and_drop_the_partial_block() -> None:
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # 2 full blocks, 2 tokens left over
    b = block_hashes(list(range(8)) + [99, 98, 97, 96], 4)
    assert b[:2] == a and len(b) == 3
    # same block content after a different first block → a different hash (chained)
    c = block_hashes([7, 7, 7, 7] + list(range(4, 8)), 4)
    assert c[1] != a[1]
    with pytest.raises(ValueError):
        block_hashes([1], 0)


def test_text_blocks_without_a_tokenizer_share_prefixes() -> None:
    p = "x" * 1000
    assert text_block_hashes(p + "a", 128)[:1] == text_block_hashes(p + "b", 128)[:1]


def test_index_counts_leading_blocks_and_evicts_lru() -> None:
    idx = KvIndex(capacity=3)
    idx.record("w0", [1, 2, 3])
    assert idx.overlap("w0", [1, 2, 9]) == 2
    assert idx.overlap("w0", [9, 2, 3]) == 0  # only a leading run counts
    assert idx.overlap("w1", [1]) == 0
    idx.record("w0", [4])  # evicts 1, the least recent
    assert idx.size("w0") == 3 and idx.overlap("w0", [1, 2]) == 0
    idx.forget("w0")
    assert idx.size("w0") == 0


def test_kv_routes_repeated_prefixes_to_the_worker_that_has_them() -> None:
    pol = make_policy("kv", {})
    assert isinstance(pol, KvAware)
    cands = [Candidate("w0"), Candidate("w1")]
    prefixes = [[p] * 16 for p in range(6)]
    first = {p: pol.select(_key(prefixes[p] + [100]), cands).name for p in range(6)}
    assert set(first.values()) == {"w0", "w1"}  # new prefixes spread (ties rotate)
    for rnd in range(3):
        for p in range(6):
            assert pol.select(_key(prefixes[p] + [200 + rnd]), cands).name == first[p]
    assert pol.stats()["kv_expected_hit_rate"] > 0.6


def test_kv_does_not_pile_onto_a_far_busier_worker() -> None:
    pol = KvAware(max_load_gap=2)
    key = _key([5] * 40)
    pol.index.record("w0", key.blocks)
    assert pol.select(key, [Candidate("w0", local_inflight=2), Candidate("w1")]).name == "w0"  # gap 2: allowed
    assert pol.select(key, [Candidate("w0", local_inflight=3), Candidate("w1")]).name == "w1"  # gap 3: too busy
    # load counts against a small gain: 1 block saved does not beat 3 more requests in flight
    small = _key([6] * 8)
    pol2 = KvAware(load_weight=1.0, max_load_gap=10)
    pol2.index.record("w0", small.blocks[:1])
    assert pol2.select(small, [Candidate("w0", reported_inflight=3), Candidate("w1")]).name == "w1"


def test_kv_without_blocks_is_least_loaded_and_forget_drops_a_worker() -> None:
    pol = KvAware()
    assert pol.select(RouteKey("hi"), [Candidate("w0", local_inflight=1), Candidate("w1")]).name == "w1"
    key = _key([3] * 8)
    pol.index.record("w0", key.blocks)
    pol.forget("w0")
    assert pol.index.overlap("w0", key.blocks) == 0
