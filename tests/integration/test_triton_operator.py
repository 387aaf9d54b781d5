"""TritonCoreOperator against a real tritonserver process (nvidia-pytriton's binary).

The operator is driven directly (no NATS): construct, start (server + model load), execute,
stop. Skipped when Triton is not installed (see scripts/setup.d/30-triton.sh).
"""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tdist.errors import BadRequest
from tdist.runtime.config import OperatorConfig, WorkerConfig
from tdist.runtime.operator import OperatorContext, Request, Response

REPO = Path(__file__).resolve().parents[2] / "examples" / "hello_world" / "operators" / "triton_core_models"

try:
    from tdist.operators.triton.install import TritonNotAvailable, locate_triton

    locate_triton()
    _missing = None
except Exception as exc:  # pragma: no cover - depends on the machine
    _missing = str(exc)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing is not None, reason=f"Triton unavailable: {_missing}")]


def make_context(tmp_path: Path, *ops: OperatorConfig, registry=None) -> list[OperatorContext]:
    worker = WorkerConfig(
        name="triton.0", component="triton", deployment="t", operators=list(ops), log_path=str(tmp_path / "triton.0.log")
    )
    out = []
    for oc in ops:
        ctx = OperatorContext(config=oc, worker=worker, logger=logging.getLogger(f"test.{oc.name}"))
        if registry is not None:
            ctx.metrics_registry = registry  # type: ignore[attr-defined]
        out.append(ctx)
    return out


async def run(op, inputs, parameters=None) -> Response:
    got: list[Response] = []

    async def send(r: Response) -> None:
        got.append(r)

    import time

    req = Request(id="r1", operator=op.name, inputs=inputs, parameters=parameters or {}, deadline=time.time() + 30, send=send)
    await op.execute(req)
    assert got and got[-1].final
    return got[-1]


async def test_encoder_decoder_round_trip_with_overrides(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from tdist.operators.triton import TritonCoreOperator

    registry = CollectorRegistry()
    enc_cfg = OperatorConfig(
        name="encoder",
        kind="triton",
        repository=str(REPO),
        triton_config={"instance_group": [{"count": 2, "kind": "KIND_CPU"}], "parameters": {"input_copies": 3}},
    )
    dec_cfg = OperatorConfig(
        name="decoder", kind="triton", repository=str(REPO), parameters={"input_copies": 3}
    )
    enc_ctx, dec_ctx = make_context(tmp_path, enc_cfg, dec_cfg, registry=registry)
    enc, dec = TritonCoreOperator(enc_ctx), TritonCoreOperator(dec_ctx)
    await enc.start()
    try:
        await dec.start()
        try:
            x = np.array([1, 2, 3], dtype=np.int64)
            encoded = (await run(enc, {"input": x})).outputs["output"]
            assert encoded.tolist() == np.invert(np.tile(x, 3)).tolist()
            decoded = (await run(dec, {"input": encoded})).outputs["output"]
            assert decoded.tolist() == [1, 2, 3]

            # the YAML's instance_group count is what Triton reports in the model's config
            s = enc.stats()
            assert s["instances"] == 2
            assert [g["count"] for g in enc.model_config["instance_group"]] == [2]
            assert enc.model_config["parameters"]["input_copies"]["string_value"] == "3"
            assert dec.model_config["parameters"]["input_copies"]["string_value"] == "3"
            assert s["triton"]["mode"] == "process" and s["served"] == 1

            # one server per worker process, its log beside the worker's
            assert enc.engine is dec.engine
            assert (tmp_path / "triton.0.triton.log").is_file()

            # Triton's metrics reachable through the worker's registry
            text = generate_latest(registry).decode()
            assert 'nv_inference_request_success{model="encoder",version="1"} 1.0' in text

            # typed errors for wrong names / dtypes / shapes
            with pytest.raises(BadRequest, match="no input 'inp'"):
                await run(enc, {"inp": x})
            with pytest.raises(BadRequest, match="must be INT64"):
                await run(enc, {"input": x.astype(np.float32)})
            with pytest.raises(BadRequest, match="shape"):
                await run(enc, {"input": x.reshape(1, 3)})
            with pytest.raises(BadRequest, match="missing input"):
                await run(enc, {})
        finally:
            await dec.stop()
    finally:
        pid = enc.engine.proc.pid
        await enc.stop()
    assert _gone(pid)


CHILD = r"""
import asyncio, logging, sys
from tdist.operators.triton import TritonCoreOperator
from tdist.runtime.config import OperatorConfig, WorkerConfig
from tdist.runtime.operator import OperatorContext

async def main():
    oc = OperatorConfig(name="encoder", kind="triton", repository=sys.argv[1])
    wc = WorkerConfig(name="w.0", component="w", deployment="t", operators=[oc], log_path=sys.argv[2])
    op = TritonCoreOperator(OperatorContext(config=oc, worker=wc, logger=logging.getLogger("child")))
    await op.start()
    print(op.stats()["triton"]["pid"], flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_triton_dies_with_a_killed_worker(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(REPO), str(tmp_path / "w.0.log")], stdout=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline()  # the child prints Triton's pid once the model is loaded
        triton_pid = int(line)
        assert os.path.exists(f"/proc/{triton_pid}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    deadline = time.monotonic() + 30
    while not _gone(triton_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(triton_pid), "tritonserver outlived its SIGKILLed worker"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read().lower()
    except OSError:
        return True
