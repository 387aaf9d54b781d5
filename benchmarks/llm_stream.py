#!/usr/bin/env python3
"""LLM streaming through tdist beside the same engine called directly, in one run.

    python benchmarks/llm_stream.py [--requests 32] [--concurrency 1,8] [--max-tokens 64]
                                    [--prompt-words 48] [--model DIR | --hidden-size 64 --layers 2]
                                    [--workers 1] [--out results.json]

Three paths over the same workload (greedy, ignore_eos, fixed lengths), one after the other so
they never share the 2 cores:

1. **direct** — vLLM's AsyncLLM in this process, the engine args the worker uses;
2. **router** — `tdist deploy` of the monolith graph (--workers vLLM workers, router, frontend);
   requests via the request plane (RequestClient → router → worker), as `tdist infer` sends them;
3. **frontend** — the same deployment over HTTP: OpenAI /v1/completions with SSE streaming
   (frontend → router → worker), as an OpenAI client sends them.

Reported per path and concurrency: tokens/s (completion tokens of all requests / wall time),
TTFT p50/p90 (time to the first non-empty text delta), inter-chunk p50, request latency p50.
The model is built by scripts/make_tiny_model.py (random weights: speed only, not quality).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TDIST = [PY, "-m", "tdist"]
WORDS = ("Paris is the capital and most populous city of France located on the river Seine in the north of "
         "the country known for its museums architecture and cafes requests travel over a message bus").split()


@dataclass
class Sample:
    ttft_s: float
    latency_s: float
    tokens: int
    gaps_s: list[float] = field(default_factory=list)


@dataclass
class Result:
    path: str
    concurrency: int
    requests: int
    wall_s: float
    tokens: int
    tok_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    itl_p50_ms: float
    latency_p50_ms: float


def prompts(n: int, words: int) -> list[str]:
    """Distinct prompts of `words` words (distinct first words: no prefix-cache help)."""
    out = []
    for i in range(n):
        body = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words - 1))
        out.append(f"{i} {body}")
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def run_load(one: Callable[[str], Awaitable[Sample]], ps: list[str], concurrency: int) -> tuple[float, list[Sample]]:
    queue = list(ps)
    samples: list[Sample] = []

    async def lane() -> None:
        while queue:
            samples.append(await one(queue.pop()))

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - t0, samples


def summarize(path: str, concurrency: int, wall: float, samples: list[Sample]) -> Result:
    tokens = sum(s.tokens for s in samples)
    gaps = [g for s in samples for g in s.gaps_s]
    return Result(
        path=path, concurrency=concurrency, requests=len(samples), wall_s=round(wall, 3), tokens=tokens,
        tok_per_s=round(tokens / wall, 1),
        ttft_p50_ms=round(1000 * pct([s.ttft_s for s in samples], 0.5), 1),
        ttft_p90_ms=round(1000 * pct([s.ttft_s for s in samples], 0.9), 1),
        itl_p50_ms=round(1000 * pct(gaps, 0.5), 2),
        latency_p50_ms=round(1000 * pct([s.latency_s for s in samples], 0.5), 1),
    )


# -- path 1: the engine directly -----------------------------------------------------------------


async def bench_direct(engine_args: dict[str, Any], ps: list[str], levels: list[int], max_tokens: int) -> list[Result]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def one(prompt: str) -> Sample:
        t0 = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        tokens = 0
        async for out in llm.generate(prompt, sp, request_id=uuid.uuid4().hex):
            c = out.outputs[0]
            tokens += len(c.token_ids)
            now = time.perf_counter()
            if c.text:
                if first is None:
                    first = now
                elif last is not None:
                    gaps.append(now - last)
                last = now
        end = time.perf_counter()
        return Sample(ttft_s=(first or end) - t0, latency_s=end - t0, tokens=tokens, gaps_s=gaps)

    results = []
    try:
        await run_load(one, ps[:4], 2)  # warm-up
        for c in levels:
            wall, samples = await run_load(one, ps, c)
            results.append(summarize("direct: vLLM AsyncLLM", c, wall, samples))
    finally:
        llm.shutdown()
    return results


# -- paths 2 and 3: through a deployment ---------------------------------------------------------


async def bench_router(nats_url: str, name: str, ps: list[str], levels: list[int], max_tokens: int) -> list[Result]:
    from tdist.runtime.planes.request import RequestClient

    client = await RequestClient.connect(nats_url, name)

    async def one(prompt: str) -> Sample:
        t0 = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        tokens = 0
        params = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        async for r in client.infer("router", parameters=params, timeout_s=300):
            now = time.perf_counter()
            if r.parameters.get("text"):
                if first is None:
                    first = now
                elif last is not None:
                    gaps.append(now - last)
                last = now
            if r.final:
                tokens = int(r.parameters["usage"]["completion_tokens"])
        end = time.perf_counter()
        return Sample(ttft_s=(first or end) - t0, latency_s=end - t0, tokens=tokens, gaps_s=gaps)

    results = []
    try:
        await run_load(one, ps[:4], 2)
        for c in levels:
            wall, samples = await run_load(one, ps, c)
            results.append(summarize("tdist: router→worker", c, wall, samples))
    finally:
        await client.close()
    return results


async def bench_frontend(url: str, model: str, ps: list[str], levels: list[int], max_tokens: int) -> list[Result]:
    import aiohttp

    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))

    async def one(prompt: str) -> Sample:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        tokens = 0
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                now = time.perf_counter()
                if ev.get("choices") and ev["choices"][0].get("text"):
                    if first is None:
                        first = now
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
                if ev.get("usage"):
                    tokens = int(ev["usage"]["completion_tokens"])
        end = time.perf_counter()
        return Sample(ttft_s=(first or end) - t0, latency_s=end - t0, tokens=tokens, gaps_s=gaps)

    results = []
    try:
        await run_load(one, ps[:4], 2)
        for c in levels:
            wall, samples = await run_load(one, ps, c)
            results.append(summarize("tdist: HTTP→router→worker", c, wall, samples))
    finally:
        await session.close()
    return results


def _cli(args: list[str], env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(TDIST + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"tdist {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def write_graph(path: Path, name: str, model: Path, engine_args: dict[str, Any], workers: int,
                engine_cpus: str | None = None) -> None:
    import yaml

    g = yaml.safe_load((REPO / "graphs" / "llm_vllm_monolith.yaml").read_text())
    g["name"] = name
    g["llm"]["model"] = str(model)
    g["llm"]["engine_args"] = {k: v for k, v in engine_args.items() if k != "model"}
    g["llm"]["servers"]["num_instances"] = workers
    g["llm"]["servers"]["max_inflight_requests"] = 64
    if engine_cpus:
        g.setdefault("env", {})["VLLM_CPU_OMP_THREADS_BIND"] = engine_cpus
    for op in g["operators"]:
        if op["name"] == "frontend":
            op["host"], op["port"] = "127.0.0.1", 0
    path.write_text(yaml.safe_dump(g, sort_keys=False))


def renice_nats(home: Path, name: str, nice: int) -> None:
    """Set the niceness of the embedded nats-server of this deployment (found by its store dir)."""
    marker = str(home / "runs" / name / "nats")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "nats-server" in cmd and marker in cmd:
            os.setpriority(os.PRIO_PROCESS, int(pid), nice)
            print(f"== nats-server pid {pid} reniced to {nice}", flush=True)
            return
    print("== nats-server of the deployment not found: not reniced", flush=True)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import vllm

    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(), "vllm": vllm.__version__}


def print_table(results: list[Result]) -> None:
    cols = ["path", "concurrency", "requests", "tokens", "tok_per_s", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "latency_p50_ms"]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="LLM streaming: tdist vs the engine directly")
        for c in cols:
            t.add_column(c, justify="left" if c == "path" else "right")
        for r in results:
            d = asdict(r)
            t.add_row(*(str(d[c]) for c in cols))
        Console().print(t)
    except ImportError:  # pragma: no cover
        for r in results:
            print(asdict(r))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--model", type=Path, help="model directory (default: build the tiny model)")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="vLLM workers in the deployment")
    ap.add_argument("--skip-direct", action="store_true")
    ap.add_argument("--engine-cpus", default=None,
                    help='pin the deployed engines (EngineCore and model threads) to these CPUs, e.g. "0": '
                         "leaves the other cores to the message bus and the workers")
    ap.add_argument("--nats-nice", type=int, default=None,
                    help="renice the deployment's nats-server to this niceness (e.g. -10; needs root): "
                         "shows how much of the streaming delay is the message bus starved of CPU")
    ap.add_argument("--out", type=Path, help="write results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    work = Path(tempfile.mkdtemp(prefix="tdist-llm-bench-"))
    model = args.model
    if model is None:
        model = work / "model"
        subprocess.run([PY, str(REPO / "scripts" / "make_tiny_model.py"), str(model), "--hidden-size", str(args.hidden_size),
                        "--layers", str(args.layers), "--heads", str(args.heads), "--intermediate-size", str(2 * args.hidden_size)],
                       check=True, capture_output=True)
    engine_args = {"model": str(model), "enforce_eager": True, "kv_cache_memory_bytes": 512 << 20, "max_model_len": 1024,
                   "served_model_name": "bench"}
    ps = prompts(args.requests, args.prompt_words)
    results: list[Result] = []

    if not args.skip_direct:
        print("== direct: starting the engine in this process", flush=True)
        results += asyncio.run(bench_direct(engine_args, ps, levels, args.max_tokens))

    env = dict(os.environ, TDIST_HOME=str(work / "home"))
    name = f"bench-{uuid.uuid4().hex[:6]}"
    graph = work / "graph.yaml"
    write_graph(graph, name, model, engine_args, args.workers, args.engine_cpus)
    print(f"== tdist: deploying {args.workers} vLLM worker(s) + router + frontend", flush=True)
    t0 = time.monotonic()
    _cli(["deploy", "-d", str(graph), "--startup-timeout-s", "400"], env)
    deploy_s = time.monotonic() - t0
    try:
        if args.nats_nice is not None:
            renice_nats(work / "home", name, args.nats_nice)
        status = json.loads(_cli(["status", "--name", name, "--json"], env))
        url = status["components"]["frontend"]["workers"][0]["operators"]["frontend"]["stats"]["url"]
        results += asyncio.run(bench_router(status["nats_url"], name, ps, levels, args.max_tokens))
        results += asyncio.run(bench_frontend(url, "bench", ps, levels, args.max_tokens))
    finally:
        _cli(["stop", "--name", name], env, timeout=180)

    results.sort(key=lambda r: (r.concurrency, r.path))
    print_table(results)
    info = {"machine": machine(), "deploy_s": round(deploy_s, 1), "args": {k: str(v) for k, v in vars(args).items()},
            "engine_args": engine_args, "command": " ".join([Path(PY).name] + sys.argv),
            "results": [asdict(r) for r in results]}
    print(json.dumps(info["machine"]))
    if args.out:
        args.out.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
