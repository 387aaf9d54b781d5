#!/usr/bin/env python3
"""KV-aware routing (`policy: kv`) beside round robin, 2 vLLM workers, one deployment, one run.

    python benchmarks/kv_routing.py [--prefixes 5] [--rounds 3] [--prefix-words 1400]
                                    [--hidden-size 512 --layers 8 --heads 8] [--out results.json]

Workload (shared long prefixes, as in chat sessions or agents reusing a system prompt):
`--prefixes` distinct long prefixes, each asked `--rounds` times with a different short question
after it, round after round (prefix 0..P-1, then again ...). Requests go one at a time (TTFT is
what is measured, not throughput) and ask for `--max-tokens` tokens.

Both routers run in the same deployment over the same 2 engines (one core each): `router_rr`
(round robin) first, then `router_kv` — each with its own fresh set of prefixes, so neither
finds the other's prefixes in the engines' caches. With an odd number of prefixes round robin
sends a prefix's successive rounds to alternating workers; `kv` sends them back where the
prefix's blocks are. Reported: TTFT median / p90 / mean per router, the factor, and the engines'
own prefix-cache hit rates. Random weights: speed only. The model defaults to the size measured
in shared/FIELD-NOTES.md (hidden 512, 8 layers, head_dim 64 → ~1.5 s to prefill 2000 tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from llm_stream import WORDS, _cli, machine, pct  # noqa: E402

PY = sys.executable


def write_graph(path: Path, name: str, model: Path, max_model_len: int) -> None:
    import yaml

    g = yaml.safe_load((REPO / "graphs" / "llm_vllm_monolith.yaml").read_text())
    g["name"] = name
    g["llm"]["model"] = str(model)
    g["llm"]["engine_args"].update({"served_model_name": "bench", "max_model_len": max_model_len,
                                    "kv_cache_memory_bytes": 1 << 30})
    g["llm"]["servers"]["num_instances"] = 2
    g["operators"] = [op for op in g["operators"] if op["name"] != "frontend"]
    g["operators"].append({"name": "llm", "kind": "vllm", "parameters": {"cpu_bind": "replica"}})  # one core each
    g["operators"] = [op for op in g["operators"] if op["name"] != "router"]
    g["operators"] += [
        {"name": "router_rr", "kind": "router", "targets": ["llm"], "max_inflight_requests": 64, "parameters": {"policy": "round_robin"}},
        {"name": "router_kv", "kind": "router", "targets": ["llm"], "max_inflight_requests": 64, "parameters": {"policy": "kv"}},
    ]
    g["workers"] = [{"name": "router", "operators": ["router_rr", "router_kv"]}]
    path.write_text(yaml.safe_dump(g, sort_keys=False))


def make_prefixes(tag: str, n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{tag} session {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


async def run_policy(client: Any, router: str, prefixes: list[str], rounds: int, max_tokens: int) -> list[dict[str, Any]]:
    out = []
    for rnd in range(rounds):
        for i, pre in enumerate(prefixes):
            params = {"prompt": f"{pre}\nQuestion {rnd}: what comes next?", "max_tokens": max_tokens, "temperature": 0.0,
                      "ignore_eos": True}
            t0 = time.perf_counter()
            first = None
            final: dict[str, Any] = {}
            async for r in client.infer(router, parameters=params, timeout_s=300):
                if first is None and r.parameters.get("text") is not None and len(r.outputs.get("token_ids", [])):
                    first = time.perf_counter()
                if r.final:
                    final = dict(r.parameters)
            end = time.perf_counter()
            out.append({"round": rnd, "prefix": i, "ttft_s": (first or end) - t0, "latency_s": end - t0,
                        "worker": final.get("routed_to"), "prompt_tokens": final.get("usage", {}).get("prompt_tokens"),
                        "cached_tokens": final.get("usage", {}).get("cached_tokens")})
    return out


def summarize(name: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [s["ttft_s"] for s in samples]
    cached = [s["cached_tokens"] or 0 for s in samples]
    prompt = [s["prompt_tokens"] or 0 for s in samples]
    cold = [s["ttft_s"] for s in samples if not s["cached_tokens"]] or [float("nan")]
    warm = [s["ttft_s"] for s in samples if s["cached_tokens"]] or [float("nan")]
    return {"router": name, "requests": len(samples), "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
            "hits": sum(1 for s in samples if s["cached_tokens"]), "ttft_cold_p50_ms": round(statistics.median(cold) * 1000, 1),
            "ttft_warm_p50_ms": round(statistics.median(warm) * 1000, 1),
            "ttft_p90_ms": round(pct(ttft, 0.9) * 1000, 1), "ttft_mean_ms": round(statistics.mean(ttft) * 1000, 1),
            "prompt_tokens_mean": round(statistics.mean(prompt)), "cached_share": round(sum(cached) / max(1, sum(prompt)), 3),
            "per_worker": {w: sum(1 for s in samples if s["worker"] == w) for w in sorted({s["worker"] for s in samples})}}


async def bench(nats_url: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    from tdist.operators.routing.router import wait_for_instances
    from tdist.runtime.planes.request import RequestClient

    client = await RequestClient.connect(nats_url, name)
    try:
        await wait_for_instances(client, "llm", 2, timeout_s=60)
        await asyncio.sleep(3)  # router_kv loads the model's tokenizer in the background at start
        # warm both engines up (first-request costs) with an unrelated prompt
        for router in ("router_rr", "router_rr"):
            async for _ in client.infer(router, parameters={"prompt": "warm up " * 50, "max_tokens": 2}, timeout_s=300):
                pass
        rr = await run_policy(client, "router_rr", make_prefixes("RR", args.prefixes, args.prefix_words, 1), args.rounds, args.max_tokens)
        kv = await run_policy(client, "router_kv", make_prefixes("KV", args.prefixes, args.prefix_words, 2), args.rounds, args.max_tokens)
        await asyncio.sleep(1.5)  # one heartbeat: stats in discovery catch up
        workers = await client.workers(max_age_s=0)
        engines = {n: {k: e["per_operator"]["llm"]["stats"].get(k) for k in ("prefix_cache_hit_rate", "served", "kv_cache_usage")}
                   for n, e in workers.items() if "llm" in e.get("per_operator", {})}
        kv_router = workers["router.0"]["per_operator"]["router_kv"]["stats"]
    finally:
        await client.close()
    return {"round_robin": summarize("round_robin", rr), "kv": summarize("kv", kv), "samples": {"round_robin": rr, "kv": kv},
            "engines": engines, "kv_router": {k: v for k, v in kv_router.items() if k.startswith("kv_")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefixes", type=int, default=5, help="distinct shared prefixes (odd: round robin alternates workers)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix-words", type=int, default=1400, help="words per prefix (~1.3 tokens each with the tiny BPE)")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--model", type=Path, help="model directory (default: build one with scripts/make_tiny_model.py)")
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="tdist-kv-bench-"))
    model = args.model
    if model is None:
        model = work / "model"
        subprocess.run([PY, str(REPO / "scripts" / "make_tiny_model.py"), str(model), "--hidden-size", str(args.hidden_size),
                        "--layers", str(args.layers), "--heads", str(args.heads), "--intermediate-size", str(2 * args.hidden_size),
                        "--max-position", str(args.max_model_len)], check=True, capture_output=True)
    env = dict(os.environ, TDIST_HOME=str(work / "home"))
    name = f"kvb-{uuid.uuid4().hex[:6]}"
    graph = work / "graph.yaml"
    write_graph(graph, name, model, args.max_model_len)
    print("== deploying 2 vLLM workers + router_rr + router_kv", flush=True)
    t0 = time.monotonic()
    _cli(["deploy", "-d", str(graph), "--startup-timeout-s", "400"], env)
    deploy_s = time.monotonic() - t0
    try:
        status = json.loads(_cli(["status", "--name", name, "--json"], env))
        res = asyncio.run(bench(status["nats_url"], name, args))
    finally:
        _cli(["stop", "--name", name], env, timeout=180)
    rr, kv = res["round_robin"], res["kv"]
    factor = rr["ttft_p50_ms"] / kv["ttft_p50_ms"] if kv["ttft_p50_ms"] else float("nan")
    cols = ["router", "requests", "prompt_tokens_mean", "hits", "ttft_p50_ms", "ttft_p90_ms", "ttft_mean_ms", "ttft_cold_p50_ms",
            "ttft_warm_p50_ms", "cached_share", "per_worker"]
    print(" | ".join(cols))
    for r in (rr, kv):
        print(" | ".join(str(r[c]) for c in cols))
    print(f"median TTFT round_robin / kv = {factor:.2f}x")
    info = {"machine": machine(), "deploy_s": round(deploy_s, 1), "command": " ".join([Path(PY).name] + sys.argv),
            "args": {k: str(v) for k, v in vars(args).items()}, "factor_p50": round(factor, 2), **res}
    print(json.dumps({"engines": res["engines"], "kv_router": res["kv_router"]}))
    if args.out:
        args.out.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
