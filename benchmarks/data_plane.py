"""Data-plane bandwidth, producer process → consumer process, beside memcpy and raw ucxx.

    .venv/bin/python benchmarks/data_plane.py                 # 4 KiB … 256 MiB, markdown table
    .venv/bin/python benchmarks/data_plane.py --sizes 4K,64M --budget-s 0.3 --json out.json

One transfer = producer `encode` → the wire dict (msgpack) over a Unix socket (stand-in for the
NATS message) → consumer `decode` → a one-byte "done" back. Time is producer-side, from before
encode to the done (so it includes both processes' work and the control round trip).
Paths: inline (kind=inline), shm (kind=shm: pooled /dev/shm, zero-copy view at the consumer),
UCX (kind=ucx over TCP loopback). Baselines in the same run: numpy memcpy (np.copyto into a
preallocated array, one process) and raw ucxx (consumer asks, producer `send`s a preallocated
buffer, consumer `recv`s into a preallocated buffer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

import msgpack
import numpy as np

UCX_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}
os.environ.update({k: os.environ.get(k, v) for k, v in UCX_ENV.items()})

from tdist.runtime.config import DataPlaneConfig  # noqa: E402
from tdist.runtime.planes.data import make_data_plane  # noqa: E402

PATHS = ["inline", "shm", "ucx"]
DEFAULT_SIZES = "4K,64K,256K,1M,4M,16M,64M,256M"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * mult)


def fmt_size(n: int) -> str:
    for unit, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m:
            return f"{n // m} {unit}"
    return f"{n} B"


def config(kind: str) -> DataPlaneConfig:
    return DataPlaneConfig(kind=kind, inline_threshold_bytes=-1 if kind != "inline" else 1 << 62, ucx_env=UCX_ENV, lease_s=60)


async def send_frame(w: asyncio.StreamWriter, data: bytes) -> None:
    w.write(struct.pack("<Q", len(data)))
    w.write(data)
    await w.drain()


async def recv_frame(r: asyncio.StreamReader) -> bytes:
    (n,) = struct.unpack("<Q", await r.readexactly(8))
    return await r.readexactly(n)


# ------------------------------------------------------------------ consumer process
async def consumer_main(fd: int, nats_url: str | None) -> None:
    sock = socket.socket(fileno=fd)
    r, w = await asyncio.open_connection(sock=sock, limit=1 << 20)
    planes: dict[str, Any] = {}
    nc = None
    if nats_url:
        import nats

        nc = await nats.connect(nats_url)

        async def on_msg(msg: Any) -> None:
            m = msgpack.unpackb(msg.data, raw=False)
            arr = await planes[m["kind"]].decode(m["wire"])
            if arr.size:
                arr.reshape(-1)[-1]
            del arr
            await msg.respond(b"k")

        await nc.subscribe("tdist.bench.dp", cb=on_msg)
        await nc.flush()
    while True:
        msg = msgpack.unpackb(await recv_frame(r), raw=False)
        op = msg["op"]
        if op == "wire":
            arr = await planes[msg["kind"]].decode(msg["wire"])
            if arr.size:
                arr.reshape(-1)[-1]  # touch it
            del arr
            await send_frame(w, b"k")
        elif op == "plane":
            planes[msg["kind"]] = make_data_plane(config(msg["kind"]))
            await planes[msg["kind"]].start()
            await send_frame(w, b"k")
        elif op == "raw":
            times = await raw_client(msg["port"], msg["size"], msg["reps"])
            await send_frame(w, msgpack.packb(times))
        elif op == "exit":
            break
    if nc is not None:
        await nc.drain()
    for p in planes.values():
        await p.close()


async def raw_client(port: int, size: int, reps: int) -> list[float]:
    import ucxx

    ep = await ucxx.create_endpoint("127.0.0.1", port)
    buf = np.empty(size, dtype=np.uint8)
    req = np.zeros(1, dtype=np.uint64)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        await ep.send(req)
        await ep.recv(buf)
        times.append(time.perf_counter() - t0)
    req[0] = 1
    await ep.send(req)  # "bye": the server stops; it ends the exchange (no reset on close)
    await asyncio.sleep(0.05)
    await ep.close()
    return times[1:]


# ------------------------------------------------------------------ producer (this process)
class Bench:
    def __init__(self, budget_s: float, max_reps: int, nats_url: str | None) -> None:
        self.budget_s = budget_s
        self.max_reps = max_reps
        self.nats_url = nats_url
        self.nc: Any = None

    async def start(self) -> None:
        a, b = socket.socketpair()
        argv = [sys.executable, __file__, "--consumer-fd", str(b.fileno())]
        if self.nats_url:
            import nats

            argv += ["--nats-url", self.nats_url]
            self.nc = await nats.connect(self.nats_url)
        self.proc = subprocess.Popen(argv, pass_fds=[b.fileno()])
        b.close()
        self.r, self.w = await asyncio.open_connection(sock=a, limit=1 << 20)
        self.planes = {}
        for kind in PATHS:
            self.planes[kind] = make_data_plane(config(kind))
            await self.planes[kind].start()
            await self.ask({"op": "plane", "kind": kind})

    async def ask(self, msg: dict[str, Any]) -> bytes:
        await send_frame(self.w, msgpack.packb(msg, use_bin_type=True))
        return await asyncio.wait_for(recv_frame(self.r), 300)

    def reps_for(self, first_s: float) -> int:
        return max(3, min(self.max_reps, int(self.budget_s / max(first_s, 1e-6))))

    async def path(self, kind: str, arr: np.ndarray) -> list[float]:
        plane = self.planes[kind]
        if self.nc is not None and kind == "inline" and arr.nbytes > self.nc.max_payload - 1024:
            return []  # does not fit in one NATS message

        async def once() -> float:
            t0 = time.perf_counter()
            wire = await plane.encode(arr)
            if self.nc is not None:
                msg = msgpack.packb({"kind": kind, "wire": wire}, use_bin_type=True)
                await self.nc.request("tdist.bench.dp", msg, timeout=300)
            else:
                await self.ask({"op": "wire", "kind": kind, "wire": wire})
            return time.perf_counter() - t0

        first = await once()  # warm-up: connects, pools segments
        return [await once() for _ in range(self.reps_for(first))]

    async def raw(self, arr: np.ndarray) -> list[float]:
        import ucxx

        async def serve(ep: Any) -> None:
            req = np.zeros(1, dtype=np.uint64)
            while True:
                await ep.recv(req)
                if req[0]:
                    break
                await ep.send(arr)

        listener = ucxx.create_listener(serve, port=0)
        t0 = time.perf_counter()
        await self.ask({"op": "raw", "port": listener.port, "size": arr.nbytes, "reps": 1})
        reps = self.reps_for(time.perf_counter() - t0)
        times = msgpack.unpackb(await self.ask({"op": "raw", "port": listener.port, "size": arr.nbytes, "reps": reps}))
        listener.close()
        return times

    def memcpy(self, arr: np.ndarray) -> list[float]:
        dst = np.empty_like(arr)
        np.copyto(dst, arr)
        times = []
        for _ in range(self.reps_for(1e-3)):
            t0 = time.perf_counter()
            np.copyto(dst, arr)
            times.append(time.perf_counter() - t0)
            if sum(times) > self.budget_s and len(times) >= 3:
                break
        return times

    async def close(self) -> None:
        try:
            await send_frame(self.w, msgpack.packb({"op": "exit"}))
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            for p in self.planes.values():
                await p.close()
            if self.nc is not None:
                await self.nc.close()


async def run(sizes: list[int], budget_s: float, max_reps: int, nats_url: str | None = None) -> list[dict[str, Any]]:
    bench = Bench(budget_s, max_reps, nats_url)
    await bench.start()
    rows = []
    try:
        warm = np.zeros(4096, dtype=np.uint8)  # process start-up noise stays out of the first row
        for kind in PATHS:
            for _ in range(30):
                wire = await bench.planes[kind].encode(warm)
                await bench.ask({"op": "wire", "kind": kind, "wire": wire}) if bench.nc is None else await bench.nc.request(
                    "tdist.bench.dp", msgpack.packb({"kind": kind, "wire": wire}, use_bin_type=True), timeout=60)
        for size in sizes:
            arr = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
            row: dict[str, Any] = {"bytes": size}
            for name in ["memcpy", *PATHS, "raw_ucxx"]:
                if name == "memcpy":
                    times = bench.memcpy(arr)
                elif name == "raw_ucxx":
                    times = await bench.raw(arr)
                else:
                    times = await bench.path(name, arr)
                if not times:
                    row[name] = None
                    continue
                med = statistics.median(times)
                row[name] = {"median_s": med, "gbps": size / med / 1e9, "reps": len(times)}
            rows.append(row)
            print(" | ".join([fmt_size(size)] + [f"{k} {v['gbps']:.2f} GB/s" for k, v in row.items() if k != "bytes" and v]), file=sys.stderr, flush=True)
    finally:
        await bench.close()
    return rows


def best_of(sweeps: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per cell, the sweep with the lowest median (neighbours' load only ever slows a cell)."""
    rows = []
    for cells in zip(*sweeps):
        row: dict[str, Any] = {"bytes": cells[0]["bytes"]}
        for key in cells[0]:
            if key == "bytes":
                continue
            got = [c[key] for c in cells if c.get(key)]
            row[key] = min(got, key=lambda v: v["median_s"]) if got else None
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["memcpy", "inline", "shm", "ucx", "raw_ucxx"]
    head = "| size | " + " | ".join(f"{c} GB/s" for c in cols) + " | inline p50 | shm p50 | UCX p50 |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for row in rows:
        cells = [f"{row[c]['gbps']:.2f}" if row[c] else "—" for c in cols]
        lat = [f"{row[c]['median_s'] * 1e3:.2f} ms" if row[c] else "—" for c in ("inline", "shm", "ucx")]
        lines.append(f"| {fmt_size(row['bytes'])} | " + " | ".join(cells + lat) + " |")
    return "\n".join(lines)


def start_nats() -> tuple[subprocess.Popen, str]:
    """A throwaway nats-server on a free port (waits for its readiness line)."""
    import shutil

    exe = shutil.which("nats-server") or os.path.join(os.path.dirname(sys.executable), "nats-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(port)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    for line in proc.stderr:
        if "Server is ready" in line:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("nats-server did not start")
    return proc, f"nats://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list (default {DEFAULT_SIZES})")
    ap.add_argument("--budget-s", type=float, default=0.5, help="time per cell after warm-up (reps ≥ 3)")
    ap.add_argument("--max-reps", type=int, default=100)
    ap.add_argument("--sweeps", type=int, default=1,
                    help="repeat the whole sweep; each cell reports its best median (shared machines)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--via-nats", action="store_true",
                    help="carry the messages through a real nats-server (started here) instead of a Unix socket")
    ap.add_argument("--consumer-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--nats-url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.consumer_fd is not None:
        asyncio.run(consumer_main(args.consumer_fd, args.nats_url))
        return
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    server = start_nats() if args.via_nats else None
    try:
        sweeps = [asyncio.run(run(sizes, args.budget_s, args.max_reps, server[1] if server else None)) for _ in range(args.sweeps)]
        rows = best_of(sweeps)
    finally:
        if server:
            server[0].terminate()
            server[0].wait(10)
    via = "NATS (nats-server, default 1 MB max payload)" if server else "a Unix socket"
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}; messages via {via}; UCX env {UCX_ENV}\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
