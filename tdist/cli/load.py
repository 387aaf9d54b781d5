"""`tdist infer --requests N --concurrency C`: a bounded load run with a progress bar.

Prints the seed client's line (`Throughput: … Total Time: …`) plus latency percentiles and
errors by kind. The request count bounds the loop; every request has its own deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Awaitable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tdist.errors import RequestError


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[idx]


async def run_load(
    client_coro: Awaitable[Any],
    component: str,
    tensors: dict[str, Any],
    parameters: dict[str, Any],
    requests: int,
    concurrency: int,
    timeout_s: float,
    instance: str | None,
    console: Console,
) -> dict[str, Any]:
    client = await client_coro
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task(f"{component} ×{requests} @ {concurrency}", total=requests)

            async def worker() -> None:
                while True:
                    try:
                        queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    t0 = time.perf_counter()
                    try:
                        async for _ in client.infer(component, inputs=tensors, parameters=parameters,
                                                    timeout_s=timeout_s, instance=instance):
                            pass
                        latencies.append(time.perf_counter() - t0)
                    except RequestError as exc:
                        errors[exc.kind] += 1
                        first_error.setdefault(exc.kind, exc.render())
                    progress.advance(task)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
            total = time.perf_counter() - start
    finally:
        await client.close()
    latencies.sort()
    ok = len(latencies)
    result = {
        "requests": requests, "ok": ok, "errors": dict(errors), "total_s": total,
        "throughput_rps": ok / total if total > 0 else 0.0,
        "p50_ms": percentile(latencies, 50) * 1e3, "p90_ms": percentile(latencies, 90) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
    }
    console.print(f"Throughput: {result['throughput_rps']:.1f} req/s Total Time: {total:.3f} s")
    t = Table(show_header=True)
    for col in ("requests", "ok", "errors", "p50 ms", "p90 ms", "p99 ms"):
        t.add_column(col, justify="right")
    t.add_row(str(requests), str(ok), ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0",
              f"{result['p50_ms']:.2f}", f"{result['p90_ms']:.2f}", f"{result['p99_ms']:.2f}")
    console.print(t)
    for text in first_error.values():
        console.print(f"[red]first error:[/] {text}")
    return result
