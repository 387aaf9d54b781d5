"""Data plane between separate processes: a producer subprocess encodes, this process decodes.

Real ucxx over TCP loopback (UCX_TLS=tcp,self, UCX_NET_DEVICES=lo) and real /dev/shm segments.
Every dtype and shape (0-d, empty, small, non-contiguous, large), release, lease expiry,
unknown references, and a producer killed mid-lease: always a typed DataPlaneError, never a hang.
Run as a script, this file is the producer (`python test_data_plane_xproc.py producer CONFIG_JSON`).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import msgpack
import numpy as np
import pytest

from tdist.errors import DataPlaneError
from tdist.runtime.config import DataPlaneConfig
from tdist.runtime.planes.data import make_data_plane

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "bfloat16"]
SHAPES = ["scalar", "empty", "small", "noncontig", "large"]
UCX_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}


def make_array(case: str) -> np.ndarray:
    """Deterministic test tensors, built the same way in producer and consumer."""
    dtype_name, shape_kind = case.split(":")
    rng = np.random.default_rng(sum(map(ord, case)))
    shape = {"scalar": (), "empty": (0, 3), "small": (5, 7), "noncontig": (16, 24), "large": (1024, 1024), "huge": (4096, 4096)}[shape_kind]
    if dtype_name == "bytes":
        n = int(np.prod(shape)) if shape else 1
        arr = np.array([bytes(rng.integers(0, 256, rng.integers(0, 40), dtype=np.uint8)) for _ in range(n)], dtype=object)
        arr = arr.reshape(shape)
    elif dtype_name == "bool":
        arr = rng.random(shape) > 0.5
    elif dtype_name == "bfloat16":
        import ml_dtypes

        arr = np.asarray(rng.standard_normal(shape), dtype=np.float32).astype(ml_dtypes.bfloat16)
    elif dtype_name.startswith(("int", "uint")):
        info = np.iinfo(dtype_name)
        arr = rng.integers(info.min, info.max, size=shape, dtype=dtype_name, endpoint=True)
    else:
        arr = np.asarray(rng.standard_normal(shape) * 1000).astype(dtype_name)
    arr = np.asarray(arr)
    if shape_kind == "noncontig":
        arr = arr.T[::2, ::-1]  # transposed, strided, reversed: not C-contiguous
        assert not arr.flags.c_contiguous
    return arr


# ---------------------------------------------------------------- producer (subprocess side)
async def _producer_main(config_json: str) -> None:
    plane = make_data_plane(DataPlaneConfig.model_validate_json(config_json))
    await plane.start()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        out: dict[str, Any] = {}
        if cmd["cmd"] == "encode":
            wires = [await plane.encode(make_array(c)) for c in cmd["cases"]]
            out["wires"] = base64.b64encode(msgpack.packb(wires, use_bin_type=True)).decode()
        elif cmd["cmd"] == "decode":  # act as a consumer: decode concurrently, compare
            wires = msgpack.unpackb(base64.b64decode(cmd["wires"]), raw=False)
            got = await asyncio.gather(*(plane.decode(w) for w in wires), return_exceptions=True)
            out["ok"] = [not isinstance(g, BaseException) and _equal(g, make_array(c)) for g, c in zip(got, cmd["cases"])]
            out["errors"] = [repr(g) for g in got if isinstance(g, BaseException)][:3]
            del got
        elif cmd["cmd"] == "stored":
            gc.collect()
            plane.reap()
            out["stored"] = plane.stored
            out["segments"] = plane._pool.segment_names if plane._pool is not None else []
        elif cmd["cmd"] == "exit":
            break
        print(json.dumps(out), flush=True)
    await plane.close()
    print(json.dumps({"closed": True}), flush=True)


# ---------------------------------------------------------------- consumer (test side)
class Producer:
    """A producer process driven over stdin/stdout with bounded waits; always stopped."""

    def __init__(self, config: DataPlaneConfig, tmp_path: Any) -> None:
        self.log = open(tmp_path / f"producer-{time.monotonic_ns()}.log", "w+")
        env = dict(os.environ, **UCX_ENV)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "producer", config.model_dump_json()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
        )
        self._buf = b""
        hello = self._read(30.0)
        assert hello.get("ready"), hello
        self.pid = int(hello["pid"])

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
                self.log.seek(0)
                raise AssertionError(f"producer silent or dead (rc={self.proc.poll()}): {self.log.read()[-3000:]}")
            if select.select([fd], [], [], min(left, 0.5))[0]:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    continue
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, cmd: str, **kw: Any) -> None:
        self.proc.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
        self.proc.stdin.flush()

    def call(self, cmd: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        self.send(cmd, **kw)
        return self._read(timeout)

    def encode(self, *cases: str) -> list[dict[str, Any]]:
        return msgpack.unpackb(base64.b64decode(self.call("encode", cases=list(cases))["wires"]), raw=False)

    def stored(self) -> dict[str, Any]:
        return self.call("stored")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit", timeout=20.0)
                self.proc.wait(20)
            except Exception:
                self.kill()
        self.log.close()


def _config(kind: str, **kw: Any) -> DataPlaneConfig:
    kw.setdefault("inline_threshold_bytes", -1)  # everything by reference
    return DataPlaneConfig(kind=kind, ucx_env=UCX_ENV, **kw)


def _segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith("tdist-dp-") and f"-{pid}-" in n]


KINDS = ["ucx", "shm", "auto"]

try:
    import ucxx  # noqa: F401

    HAVE_UCXX = True
except Exception:  # the shm tests still run
    HAVE_UCXX = False


def _need(kind: str) -> None:
    if kind != "shm" and not HAVE_UCXX:
        pytest.skip("needs ucxx (pip install 'tdist[ucx]'; CI: scripts/setup.d/20-ucx.sh)")


@pytest.fixture(scope="module", params=KINDS)
def producer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    _need(request.param)
    p = Producer(_config(request.param), tmp_path_factory.mktemp("dp"))
    p.kind = request.param
    yield p
    p.stop()
    assert _segments_of(p.pid) == [], "producer left shared memory behind"


@pytest.fixture
async def consumer(producer: Producer):
    plane = make_data_plane(_config(producer.kind))
    await plane.start()
    yield plane
    await plane.close()


def _equal(got: Any, want: np.ndarray) -> bool:
    try:
        _assert_same(got, want)
        return True
    except AssertionError:
        return False


def _assert_same(got: Any, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object and list(got.reshape(-1)) == list(want.reshape(-1))
        return
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("dtype", DTYPES + ["bytes"])
async def test_every_shape_round_trips(producer: Producer, consumer, dtype: str) -> None:
    cases = [f"{dtype}:{s}" for s in SHAPES if not (dtype == "bytes" and s == "large")]
    wires = producer.encode(*cases)
    for case, wire in zip(cases, wires):
        ref = wire["ref"]
        assert ref["uri"].startswith("ucp://" if producer.kind != "shm" else "shm://")
        got = await consumer.decode(wire)
        _assert_same(got, make_array(case))
        got.reshape(-1)[:0] = 0  # writable
        del got
    gc.collect()
    assert await _eventually(lambda: producer.stored()["stored"] == 0), producer.stored()


async def test_64mib_and_concurrent_consumers(producer: Producer, consumer) -> None:
    if producer.kind == "shm" and shutil.disk_usage("/dev/shm").free < 512 << 20:
        pytest.skip("/dev/shm too small for 64 MiB tensors (docker: --shm-size)")
    big = producer.encode("float32:huge")[0]
    assert big["ref"]["nbytes"] == 64 << 20
    n = 24
    wires = producer.encode(*(["uint8:large", "float64:small", "bfloat16:noncontig"] * (n // 3)))
    second = make_data_plane(_config(producer.kind))
    await second.start()
    try:
        planes = [consumer, second]
        results = await asyncio.gather(*(planes[i % 2].decode(w) for i, w in enumerate(wires)), consumer.decode(big))
        for i, got in enumerate(results[:-1]):
            _assert_same(got, make_array(["uint8:large", "float64:small", "bfloat16:noncontig"][i % 3]))
        _assert_same(results[-1], make_array("float32:huge"))
    finally:
        await second.close()
    del results, got
    gc.collect()
    assert await _eventually(lambda: producer.stored()["stored"] == 0)


def test_several_consumer_processes_at_once(producer: Producer, tmp_path: Any) -> None:
    """Two consumer processes pull 40 tensors each from one producer, concurrently."""
    cases = ["uint8:large", "float32:small", "int64:noncontig", "bfloat16:large", "bool:scalar"] * 8
    consumers = [Producer(_config(producer.kind), tmp_path) for _ in range(2)]
    try:
        batches = [producer.encode(*cases) for _ in consumers]
        for c, wires in zip(consumers, batches):
            c.send("decode", cases=cases, wires=base64.b64encode(msgpack.packb(wires, use_bin_type=True)).decode())
        for c in consumers:
            out = c._read(120.0)
            assert all(out["ok"]) and len(out["ok"]) == len(cases), out
    finally:
        for c in consumers:
            c.stop()
    assert asyncio.run(_eventually(lambda: producer.stored()["stored"] == 0))


async def test_auto_serves_over_ucx_when_shared_memory_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from tdist.runtime.planes.data import segments

    _need("auto")

    def full(seg, src):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments.SegmentPool, "fill", staticmethod(full))
    prod, cons = make_data_plane(_config("auto")), make_data_plane(_config("auto"))
    await prod.start()
    await cons.start()
    try:
        wire = await prod.encode(make_array("float32:large"))
        assert "shm" not in wire["ref"] and wire["ref"]["uri"].startswith("ucp://")
        _assert_same(await cons.decode(wire), make_array("float32:large"))
    finally:
        await cons.close()
        await prod.close()


async def test_ucx_reference_decoded_by_its_own_plane() -> None:
    _need("ucx")
    plane = make_data_plane(_config("ucx"))
    await plane.start()
    try:
        wire = await plane.encode(make_array("int16:large"))
        assert wire["ref"]["uri"].startswith("ucp://")
        _assert_same(await plane.decode(wire), make_array("int16:large"))
        assert plane.stored == 0
        with pytest.raises(DataPlaneError):
            await plane.decode(wire)
    finally:
        await plane.close()


def test_ucx_runtime_survives_an_unclosed_plane_on_a_closed_loop() -> None:
    """Tests run one event loop each; a plane left open on a finished loop must not wedge UCX."""
    _need("ucx")

    async def leave_open() -> None:
        plane = make_data_plane(_config("ucx"))
        await plane.start()  # listener up, never closed

    async def use() -> None:
        prod, cons = make_data_plane(_config("ucx")), make_data_plane(_config("ucx"))
        await prod.start()
        await cons.start()
        try:
            wire = await prod.encode(make_array("float32:small"))
            _assert_same(await cons.decode(wire), make_array("float32:small"))
        finally:
            await cons.close()
            await prod.close()

    asyncio.run(leave_open())
    asyncio.run(use())


async def test_read_twice_is_a_typed_error(producer: Producer, consumer) -> None:
    (wire,) = producer.encode("int32:small")
    got = await consumer.decode(wire)
    with pytest.raises(DataPlaneError):
        await consumer.decode(wire)
    del got


async def test_release_frees_at_the_producer(producer: Producer, consumer) -> None:
    wires = producer.encode("float32:large", "int8:small")
    base = producer.stored()["stored"]
    for w in wires:
        await consumer.release(w)
    assert await _eventually(lambda: producer.stored()["stored"] == base - 2)
    for w in wires:
        with pytest.raises(DataPlaneError):
            await consumer.decode(w)
    await consumer.release(wires[0])  # idempotent
    await consumer.release({"dtype": "int8", "shape": [], "data": b"\x01"})  # inline: no-op


async def test_unknown_reference_is_a_typed_error(producer: Producer, consumer) -> None:
    (wire,) = producer.encode("float32:small")
    forged = {"ref": dict(wire["ref"])}
    forged["ref"]["id"] = "x" * 32
    forged["ref"]["uri"] = forged["ref"]["uri"].rsplit("/", 1)[0] + "/" + "x" * 32 if forged["ref"]["uri"].startswith("ucp") else forged["ref"]["uri"]
    if "shm" in forged["ref"]:
        forged["ref"]["shm_token"] = b"\0" * 16
    t0 = time.monotonic()
    with pytest.raises(DataPlaneError):
        await consumer.decode(forged)
    assert time.monotonic() - t0 < 5
    with pytest.raises(DataPlaneError):
        await consumer.decode({"ref": {"id": "nope"}})
    await consumer.release(wire)


@pytest.mark.parametrize("kind", KINDS)
async def test_lease_expiry(kind: str, tmp_path: Any) -> None:
    _need(kind)
    p = Producer(_config(kind, lease_s=0.3), tmp_path)
    plane = make_data_plane(_config(kind))
    await plane.start()
    try:
        wires = p.encode("float32:large", "uint16:small")
        assert p.stored()["stored"] == 2
        await asyncio.sleep(0.8)
        assert await _eventually(lambda: p.stored()["stored"] == 0)  # the reaper freed them unread
        for w in wires:
            with pytest.raises(DataPlaneError, match="expired|released|unknown"):
                await plane.decode(w)
    finally:
        await plane.close()
        p.stop()
    assert _segments_of(p.pid) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_producer_death_is_a_typed_error_not_a_hang(kind: str, tmp_path: Any) -> None:
    _need(kind)
    p = Producer(_config(kind), tmp_path)
    plane = make_data_plane(_config(kind))
    await plane.start()
    try:
        first, second = p.encode("float32:large", "float32:large")
        _assert_same(await plane.decode(first), make_array("float32:large"))  # pools an endpoint
        p.kill()
        t0 = time.monotonic()
        with pytest.raises(DataPlaneError, match="gone|unreachable|released|producer"):
            await plane.decode(second)
        assert time.monotonic() - t0 < 15
        assert _segments_of(p.pid) == [], "a dead producer's segments are swept"
    finally:
        await plane.close()
        p.stop()


async def test_auto_crosses_hosts_over_ucx(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer on "another host" (different host_id) pulls an auto reference over UCX."""
    from tdist.runtime.planes.data import plane as plane_mod

    _need("auto")
    p = Producer(_config("auto"), tmp_path)
    monkeypatch.setattr(plane_mod, "host_id", lambda: "elsewhere")
    plane = make_data_plane(_config("auto"))
    await plane.start()
    try:
        wires = p.encode("float64:large", "bytes:small", "bool:scalar")
        for w, case in zip(wires, ["float64:large", "bytes:small", "bool:scalar"]):
            _assert_same(await plane.decode(w), make_array(case))
        assert await _eventually(lambda: p.stored()["stored"] == 0)
    finally:
        await plane.close()
        p.stop()


async def test_shm_reference_from_another_host_is_a_typed_error(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tdist.runtime.planes.data import plane as plane_mod

    p = Producer(_config("shm"), tmp_path)
    monkeypatch.setattr(plane_mod, "host_id", lambda: "elsewhere")
    plane = make_data_plane(_config("auto"))
    await plane.start()
    try:
        (w,) = p.encode("int64:small")
        with pytest.raises(DataPlaneError, match="another host"):
            await plane.decode(w)
    finally:
        await plane.close()
        p.stop()


async def _eventually(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return bool(pred())


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "producer":
    asyncio.run(_producer_main(sys.argv[2]))
