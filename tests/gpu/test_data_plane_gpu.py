"""GPU tensors through the data plane (skipped without torch + CUDA).

A producer subprocess encodes a CUDA tensor; this process decodes it: CUDA IPC on one host
(kind auto/shm), host staging over UCX when the consumer looks like another host.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import msgpack
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # pragma: no cover - the conftest marks these skipped too
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tdist.runtime.config import DataPlaneConfig  # noqa: E402
from tdist.runtime.planes.data import make_data_plane  # noqa: E402

UCX_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}

PRODUCER = r"""
import asyncio, base64, json, sys, msgpack, torch
from tdist.runtime.config import DataPlaneConfig
from tdist.runtime.planes.data import make_data_plane
async def main():
    plane = make_data_plane(DataPlaneConfig.model_validate_json(sys.argv[1])); await plane.start()
    n = int(sys.argv[2])
    t = torch.arange(n, dtype=torch.float32, device="cuda").reshape(-1, 1024)
    b = torch.full((7, 5), 1.5, dtype=torch.bfloat16, device="cuda")
    wires = [await plane.encode(t), await plane.encode(b)]
    print(json.dumps({"wires": base64.b64encode(msgpack.packb(wires, use_bin_type=True)).decode()}), flush=True)
    sys.stdin.readline()  # keep serving until told
    await plane.close()
asyncio.run(main())
"""


def _start(kind: str, n: int):
    cfg = DataPlaneConfig(kind=kind, inline_threshold_bytes=-1, ucx_env=UCX_ENV)
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, cfg.model_dump_json(), str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ, **UCX_ENV))
    line = proc.stdout.readline()
    assert line, "producer died"
    return proc, msgpack.unpackb(base64.b64decode(json.loads(line)["wires"]), raw=False)


def _stop(proc) -> None:
    try:
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("kind", ["auto", "shm"])
async def test_cuda_ipc_same_host(kind: str) -> None:
    n = 16 << 20  # 64 MiB of float32
    proc, (big, small) = _start(kind, n)
    plane = make_data_plane(DataPlaneConfig(kind=kind, ucx_env=UCX_ENV))
    await plane.start()
    try:
        assert big["ref"]["memory"] == "cuda" and big["ref"].get("cuda_ipc")
        t0 = time.perf_counter()
        got = await plane.decode(big)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"\nCUDA IPC 64 MiB decode: {dt * 1e3:.2f} ms ({n * 4 / dt / 1e9:.1f} GB/s)")
        assert got.is_cuda and torch.equal(got.reshape(-1), torch.arange(n, dtype=torch.float32, device="cuda"))
        b = await plane.decode(small)
        assert b.is_cuda and b.dtype == torch.bfloat16 and torch.equal(b, torch.full((7, 5), 1.5, dtype=torch.bfloat16, device="cuda"))
    finally:
        await plane.close()
        _stop(proc)


async def test_cuda_over_ucx_to_another_host(monkeypatch) -> None:
    from tdist.runtime.planes.data import plane as plane_mod

    proc, (big, small) = _start("auto", 1 << 20)
    monkeypatch.setattr(plane_mod, "host_id", lambda: "elsewhere")
    plane = make_data_plane(DataPlaneConfig(kind="auto", ucx_env=UCX_ENV))
    await plane.start()
    try:
        got = await plane.decode(big)
        assert got.is_cuda and torch.equal(got.reshape(-1), torch.arange(1 << 20, dtype=torch.float32, device="cuda"))
        b = await plane.decode(small)
        assert b.dtype == torch.bfloat16 and b.is_cuda
    finally:
        await plane.close()
        _stop(proc)
