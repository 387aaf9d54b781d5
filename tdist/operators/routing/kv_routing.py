"""KV-aware routing (router `policy: kv`): send a prompt where its prefix is already cached.

The router cannot see inside the engines' caches, so it keeps its own picture of them: for every
instance, the prompt-prefix blocks it has routed there (block = `kv_block_size` tokens, the
engine's own cache block — 128 on vLLM's CPU backend, read from the engine's published stats).
A block is identified by a hash chained over all tokens up to its end, as vLLM's prefix cache
does, so "block 3 matches" means "the first 4 blocks are identical". Each instance's table is an
LRU bounded by `kv_index_blocks`, a stand-in for the engine's cache capacity.

Choice: cost = blocks to prefill (prompt blocks − leading blocks already there) + `load_weight`
× requests in flight; the cheapest wins. Load balance is kept by a hard rule too: an instance
with more than `max_load_gap` requests in flight above the least loaded one is not chosen for
any gain. Everything here is pure (no I/O) and unit tested; the router supplies tokens and loads.

Without a tokenizer (the router could not load the model's), text is cut into blocks of
`4 × block_size` UTF-8 bytes — the same prefix still maps to the same blocks, only the block
boundaries are approximate.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from typing import Any, Sequence

#: vLLM's CPU attention backend uses 128-token blocks; GPUs default to 16.
DEFAULT_BLOCK_SIZE = 128
#: Bytes of text per token when no tokenizer is available (English BPE averages ~4).
BYTES_PER_TOKEN = 4


def block_hashes(tokens: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full blocks of `tokens` (a trailing partial block is not cached)."""
    if block_size < 1:
        raise ValueError("block_size must be ≥ 1")
    out: list[int] = []
    prev = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(prev, digest_size=8)
        h.update(b",".join(str(int(t)).encode() for t in tokens[start:start + block_size]))
        prev = h.digest()
        out.append(int.from_bytes(prev, "big"))
    return tuple(out)


def text_block_hashes(text: str, block_size: int) -> tuple[int, ...]:
    """Block hashes of text without a tokenizer: blocks of BYTES_PER_TOKEN × block_size bytes."""
    return block_hashes(list(text.encode()), block_size * BYTES_PER_TOKEN)


def estimate_tokens(text: str) -> int:
    return max(1, len(text.encode()) // BYTES_PER_TOKEN)


class KvIndex:
    """Per instance: the prefix blocks routed there (LRU, at most `capacity` blocks each)."""

    def __init__(self, capacity: int = 20000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be ≥ 1")
        self.capacity = capacity
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def overlap(self, instance: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` the instance holds."""
        table = self._blocks.get(instance)
        if not table:
            return 0
        n = 0
        for h in hashes:
            if h not in table:
                break
            n += 1
        return n

    def record(self, instance: str, hashes: Sequence[int]) -> None:
        """The instance has (or is about to have) these blocks cached; they become most recent."""
        table = self._blocks.setdefault(instance, OrderedDict())
        for h in hashes:
            table[h] = None
            table.move_to_end(h)
        while len(table) > self.capacity:
            table.popitem(last=False)

    def forget(self, instance: str) -> None:
        """The instance died or restarted: its cache is gone."""
        self._blocks.pop(instance, None)

    def size(self, instance: str) -> int:
        return len(self._blocks.get(instance, ()))

    def instances(self) -> list[str]:
        return sorted(self._blocks)


class KvAware:
    """Router policy `kv`: maximise prefix reuse, bounded by load. See the module doc."""

    name = "kv"

    def __init__(self, *, load_weight: float = 1.0, max_load_gap: int = 4, index_blocks: int = 20000) -> None:
        if load_weight < 0 or max_load_gap < 0:
            raise ValueError("load_weight and max_load_gap must be ≥ 0")
        self.load_weight = load_weight
        self.max_load_gap = max_load_gap
        self.index = KvIndex(index_blocks)
        self._tiebreak = itertools.count()
        self.hit_blocks = 0  # blocks the chosen instances were expected to hold (router's view)
        self.total_blocks = 0

    def costs(self, blocks: Sequence[int], candidates: Sequence[Any]) -> dict[str, float]:
        """Cost of each candidate (lower is better); loads beyond the gap get +inf."""
        low = min(c.load for c in candidates)
        out: dict[str, float] = {}
        for c in candidates:
            if c.load > low + self.max_load_gap:
                out[c.name] = float("inf")
                continue
            out[c.name] = (len(blocks) - self.index.overlap(c.name, blocks)) + self.load_weight * c.load
        return out

    def select(self, key: Any, candidates: list[Any]) -> Any:
        blocks = tuple(getattr(key, "blocks", ()) or ())
        costs = self.costs(blocks, candidates)
        best = min(costs.values())
        tied = sorted((c for c in candidates if costs[c.name] == best), key=lambda c: (c.load, c.name))
        low = tied[0].load
        tied = [c for c in tied if c.load == low]
        chosen = tied[next(self._tiebreak) % len(tied)]
        if blocks:
            self.hit_blocks += self.index.overlap(chosen.name, blocks)
            self.total_blocks += len(blocks)
            self.index.record(chosen.name, blocks)
        return chosen

    def forget(self, instance: str) -> None:
        self.index.forget(instance)

    def stats(self) -> dict[str, Any]:
        return {
            "kv_index_blocks": {i: self.index.size(i) for i in self.index.instances()},
            "kv_expected_hit_rate": round(self.hit_blocks / self.total_blocks, 4) if self.total_blocks else 0.0,
        }


class PromptTokenizer:
    """The model's tokenizer in the router (lazy; the one non-pure piece of this module).

    Loaded from `parameters.tokenizer`, else from the `model_path` an engine publishes in its
    stats (same file system). If neither loads, prompts are measured in estimated tokens and
    cut into byte blocks (see the module doc) — routing still works, only less exactly.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.tokenizer: Any = None
        self.failed: set[str] = set()

    def load(self, path: str | None) -> bool:
        """Load from `path` (or the configured one) if nothing is loaded yet; True when ready."""
        if self.tokenizer is not None:
            return True
        path = self.path or path
        if not path or path in self.failed:
            return False
        try:
            os_path = __import__("os").path
            if not os_path.isdir(os_path.expanduser(path)):
                raise FileNotFoundError(path)
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(os_path.expanduser(path))
            return True
        except Exception:
            self.failed.add(path)
            return False

    def tokens(self, text: str) -> list[int] | None:
        if self.tokenizer is None:
            return None
        return list(self.tokenizer(text)["input_ids"])
