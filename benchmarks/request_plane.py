"""Request-plane benchmark: tdist beside raw nats-py on the same nats-server, in one run.

    .venv/bin/python benchmarks/request_plane.py [--requests 2000] [--markdown]

1. No-op call, one hop, responder in another process:
   - baseline: raw nats-py core request/reply (the responder echoes the payload);
   - tdist: RequestClient → a no-op operator (JetStream work queue, pull window, ack).
   Latency p50/p99 at 1 in flight; throughput at 16 and 64 in flight.
2. Hello-world pipeline (client → encoder_decoder → encoder, decoder): req/s at 1, 16, 64.
Bounded loops; everything on 127.0.0.1; every process stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tdist.launch.local import LocalSupervisor  # noqa: E402
from tdist.launch.nats import start_nats  # noqa: E402
from tdist.runtime.config import WorkerConfig  # noqa: E402
from tdist.runtime.planes.request import RequestClient  # noqa: E402

RAW_RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def cb(msg):
        await msg.respond(msg.data)
    await nc.subscribe("bench.raw", cb=cb)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

NOOP_OP = """
from tdist.runtime import Operator
class Noop(Operator):
    async def execute(self, request):
        await request.send(dict(request.inputs), final=True)
"""


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def timed_load(call, n: int, concurrency: int) -> tuple[float, list[float]]:
    lat: list[float] = []
    it = iter(range(n))

    async def worker() -> None:
        for _ in it:
            t0 = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0), lat


def worker_config(dep: str, component: str, ops: list[dict], pythonpath: str) -> WorkerConfig:
    return WorkerConfig.model_validate({
        "name": f"{component}.0", "component": component, "deployment": dep, "operators": ops,
        "data_plane": {"kind": "inline"}, "env": {"PYTHONPATH": pythonpath},
    })


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    n = args.requests
    work = Path(tempfile.mkdtemp(prefix="tdist-bench-"))
    (work / "bench_ops.py").write_text(NOOP_OP)
    server = start_nats(work_dir=str(work / "nats"))
    rows: list[tuple[str, str, str]] = []
    procs: list[subprocess.Popen] = []
    sups: list[LocalSupervisor] = []
    try:
        payload = np.arange(8, dtype=np.int64)
        # ---- raw nats-py baseline
        raw = subprocess.Popen([sys.executable, "-c", RAW_RESPONDER, server.url], stdout=subprocess.PIPE, text=True)
        procs.append(raw)
        assert raw.stdout is not None and raw.stdout.readline().strip() == "ready"
        import nats

        nc = await nats.connect(server.url)
        body = payload.tobytes()
        for _ in range(50):  # warm-up (also covers the startup race noted in FIELD-NOTES)
            try:
                await nc.request("bench.raw", body, timeout=2)
            except Exception:
                pass

        async def raw_call() -> None:
            await nc.request("bench.raw", body, timeout=10)

        _, lat = await timed_load(raw_call, n, 1)
        rows.append(("raw nats-py request/reply", "p50 / p99 latency @1", f"{pct(lat, 50)*1e3:.3f} / {pct(lat, 99)*1e3:.3f} ms"))
        for c in (16, 64):
            rps, _ = await timed_load(raw_call, n * 2, c)
            rows.append(("raw nats-py request/reply", f"throughput @{c}", f"{rps:,.0f} req/s"))

        # ---- tdist no-op operator
        dep = "bench-noop"
        ops = [{"name": "noop", "kind": "python", "implementation": "bench_ops:Noop", "max_inflight_requests": 64}]
        sup = LocalSupervisor(deployment=dep, workers=[worker_config(dep, "noop", ops, str(work))], run_dir=work / dep, nats_url=server.url)
        sups.append(sup)
        await sup.start()
        client = await RequestClient.connect(server.url, dep, data_plane=sup.workers[0].data_plane)

        async def tdist_call() -> None:
            async for _ in client.infer("noop", inputs={"x": payload}):
                pass

        await timed_load(tdist_call, 100, 4)
        _, lat = await timed_load(tdist_call, n, 1)
        rows.append(("tdist no-op operator", "p50 / p99 latency @1", f"{pct(lat, 50)*1e3:.3f} / {pct(lat, 99)*1e3:.3f} ms"))
        for c in (16, 64):
            rps, _ = await timed_load(tdist_call, n * 2, c)
            rows.append(("tdist no-op operator", f"throughput @{c}", f"{rps:,.0f} req/s"))
        await client.close()

        # ---- hello world pipeline
        dep = "bench-hw"
        hello = str(REPO / "examples" / "hello_world" / "operators")
        mk = lambda name, cls: worker_config(dep, name, [{  # noqa: E731
            "name": name, "kind": "python", "implementation": f"hello_world_ops:{cls}", "max_inflight_requests": 64,
            "parameters": {"input_copies": 2}}], hello)
        sup = LocalSupervisor(deployment=dep, run_dir=work / dep, nats_url=server.url, workers=[
            mk("encoder", "EncoderOperator"), mk("decoder", "DecoderOperator"), mk("encoder_decoder", "EncodeDecodeOperator")])
        sups.append(sup)
        await sup.start()
        client = await RequestClient.connect(server.url, dep, data_plane=sup.workers[0].data_plane)

        async def hw_call() -> None:
            async for r in client.infer("encoder_decoder", inputs={"input": payload}):
                assert r.outputs["output"].tolist() == payload.tolist()

        await timed_load(hw_call, 100, 4)
        for c in (1, 16, 64):
            rps, lat = await timed_load(hw_call, n if c == 1 else n * 2, c)
            rows.append(("tdist hello-world pipeline", f"throughput @{c}", f"{rps:,.0f} req/s (p50 {pct(lat, 50)*1e3:.2f} ms)"))
        await client.close()
        await nc.close()
    finally:
        for sup in sups:
            await sup.stop()
        for p in procs:
            p.terminate()
            p.wait(10)
        server.stop()

    machine = f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.machine()}"
    print(f"\nmachine: {machine}; {n} requests per latency run\n")
    print("| path | measure | result |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    asyncio.run(main())
