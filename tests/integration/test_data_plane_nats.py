"""A 64 MiB tensor round-trips client → NATS → echo worker → NATS → client by reference.

The shape of a pipeline hop before the request plane wires it: the NATS message carries only
the data plane's wire dict (a reference above the inline threshold); the worker decodes in its
own process, re-encodes what it returns, and the client decodes the answer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from typing import Any

import msgpack
import numpy as np
import pytest

from tdist.runtime.config import DataPlaneConfig
from tdist.runtime.planes.data import make_data_plane

pytestmark = pytest.mark.timeout(120)

UCX_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}

ECHO = r"""
import asyncio, sys, msgpack, nats
from tdist.runtime.config import DataPlaneConfig
from tdist.runtime.planes.data import make_data_plane

async def main(url, subject, cfg):
    plane = make_data_plane(DataPlaneConfig.model_validate_json(cfg))
    await plane.start()
    nc = await nats.connect(url)
    done = asyncio.Event()

    async def on_msg(msg):
        if msg.data == b"stop":
            await msg.respond(b"bye")
            done.set()
            return
        arr = await plane.decode(msgpack.unpackb(msg.data, raw=False))
        out = await plane.encode(arr * 1)  # an operator's new output tensor
        del arr
        await msg.respond(msgpack.packb(out, use_bin_type=True))

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    print("ready", flush=True)
    await done.wait()
    await nc.drain()
    await plane.close()

asyncio.run(main(*sys.argv[1:4]))
"""


@pytest.mark.parametrize("kind", ["auto", "shm", "ucx"])
async def test_64mib_round_trip_through_nats(nats_server: Any, kind: str) -> None:
    if kind != "shm":
        pytest.importorskip("ucxx")
    if kind == "shm" and shutil.disk_usage("/dev/shm").free < 512 << 20:
        pytest.skip("/dev/shm too small for 64 MiB tensors (docker: --shm-size)")
    import nats

    subject = f"dp.echo.{uuid.uuid4().hex[:8]}"
    cfg = DataPlaneConfig(kind=kind, ucx_env=UCX_ENV)  # the default inline threshold
    worker = subprocess.Popen([sys.executable, "-c", ECHO, nats_server.url, subject, cfg.model_dump_json()],
                              stdout=subprocess.PIPE, env=dict(os.environ, **UCX_ENV))
    plane = make_data_plane(cfg)
    await plane.start()
    nc = await nats.connect(nats_server.url)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 30)
        assert line.strip() == b"ready"
        x = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)  # 64 MiB
        wire = await plane.encode(x)
        assert "ref" in wire and len(msgpack.packb(wire, use_bin_type=True)) < 1024
        reply = await nc.request(subject, msgpack.packb(wire, use_bin_type=True), timeout=60)
        back = msgpack.unpackb(reply.data, raw=False)
        assert "ref" in back
        y = await plane.decode(back)
        assert y.shape == x.shape and y.dtype == x.dtype and np.array_equal(x, y)
        # many in flight, small and large mixed
        xs = [np.full((1 << 18,), i, dtype=np.int32) if i % 2 else np.full((8,), i, dtype=np.int32) for i in range(16)]
        wires = [await plane.encode(a) for a in xs]
        replies = await asyncio.gather(*(nc.request(subject, msgpack.packb(w, use_bin_type=True), timeout=60) for w in wires))
        for a, r in zip(xs, replies):
            assert np.array_equal(await plane.decode(msgpack.unpackb(r.data, raw=False)), a)
        await nc.request(subject, b"stop", timeout=10)
        assert worker.wait(30) == 0
    finally:
        await nc.close()
        await plane.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
