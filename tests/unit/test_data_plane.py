"""Data plane, in one process: references, UCX settings, inline and shared-memory paths,
leases, pooled segments, sweeping, the in-memory plane. No ucxx needed (see
tests/integration/test_data_plane_xproc.py for producer ≠ consumer processes over UCX and shm)."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tdist.errors import DataPlaneError, RequestError
from tdist.runtime.config import DataPlaneConfig
from tdist.runtime.planes.data import InMemoryDataPlane, Ref, host_id, is_ref, make_data_plane
from tdist.runtime.planes.data import segments, views
from tdist.runtime.planes.data.refs import ucx_uri
from tdist.runtime.process_identity import process_alive, process_start
from tdist.runtime.planes.data.ucx import FRAME, _frame, _unframe
from tdist.runtime.planes.data.ucxenv import ucx_environment
from tdist.runtime.tensors import tensor_to_wire

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "bfloat16"]


def arr_of(dtype: str, shape=(3, 4), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype == "bfloat16":
        import ml_dtypes

        return rng.standard_normal(shape).astype(np.float32).astype(ml_dtypes.bfloat16)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def mine() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith("tdist-dp-") and f"-{os.getpid()}-" in n]


@pytest.fixture
async def planes():
    made = []

    async def make(kind: str = "shm", **kw):
        kw.setdefault("inline_threshold_bytes", -1)
        p = make_data_plane(DataPlaneConfig(kind=kind, **kw))
        await p.start()
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()
    gc.collect()
    assert mine() == []


# ---------------------------------------------------------------- references
def _ref(**kw) -> Ref:
    base = dict(id="abc", dtype="float32", shape=(2, 3), nbytes=24, memory="cpu", expires_at=1.5,
                uri="ucp://10.0.0.5:4000/abc", host_id="h", pid=12, pid_start=34,
                shm="tdist-dp-1-2-3-x", shm_token=b"t" * 16)
    base.update(kw)
    return Ref(**base)


def test_ref_round_trips_through_msgpack() -> None:
    ref = _ref()
    wire = msgpack.unpackb(msgpack.packb(ref.to_wire(), use_bin_type=True), raw=False)
    assert is_ref(wire) and Ref.from_wire(wire) == ref
    assert ref.ucx_address == ("10.0.0.5", 4000)
    assert _ref(uri="shm://tdist-dp-1").ucx_address is None
    assert Ref.from_wire(_ref(uri=ucx_uri("::1", 5, "abc")).to_wire()).ucx_address == ("::1", 5)


@pytest.mark.parametrize("bad", [{}, {"ref": {"id": "x"}}, {"ref": "nope"}, {"ref": {**_ref().to_wire()["ref"], "shape": "x"}}])
def test_malformed_ref_is_a_typed_error(bad) -> None:
    with pytest.raises(DataPlaneError):
        Ref.from_wire(bad)


def test_shm_name_cannot_escape_dev_shm() -> None:
    with pytest.raises(DataPlaneError):
        Ref.from_wire(_ref(shm="../etc/passwd").to_wire())
    with pytest.raises(DataPlaneError):
        Ref.from_wire(_ref(shm="tdist-dp-/../../x").to_wire())


def test_data_plane_error_crosses_the_wire() -> None:
    err = DataPlaneError("tensor reference expired", detail={"id": "abc"})
    back = RequestError.from_wire(msgpack.unpackb(msgpack.packb(err.to_wire()), raw=False))
    assert isinstance(back, DataPlaneError) and back.detail == {"id": "abc"}


def test_host_identity_and_liveness() -> None:
    assert len(host_id()) == 32 and host_id() == host_id()
    assert process_start(os.getpid()) is not None
    assert process_alive(os.getpid(), process_start(os.getpid()))
    assert not process_alive(os.getpid(), (process_start(os.getpid()) or 0) + 1)  # a recycled pid
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    assert not process_alive(proc.pid, None)


def test_control_frames() -> None:
    buf = _frame({"op": "get", "id": "x" * 40})
    assert buf.nbytes == FRAME and _unframe(buf) == {"op": "get", "id": "x" * 40}
    long = _unframe(_frame({"ok": False, "error": "e" * 1000}))
    assert long["ok"] is False and len(long["error"]) < FRAME


# ---------------------------------------------------------------- UCX settings
def test_ucx_environment_precedence() -> None:
    env = ucx_environment({}, "127.0.0.1", base={})
    assert env["UCX_TLS"] == "tcp,self" and env["UCX_NET_DEVICES"] == "lo" and env["UCX_WARN_UNUSED_ENV_VARS"] == "n"
    assert "UCX_NET_DEVICES" not in ucx_environment({}, "10.1.2.3", base={})
    assert "UCX_TLS" not in ucx_environment({}, "127.0.0.1", base={"UCX_TLS": "rc,sm"})  # the process env wins
    assert ucx_environment({"UCX_TLS": "rc"}, "127.0.0.1", base={"UCX_TLS": "tcp"})["UCX_TLS"] == "rc"  # the graph wins


# ---------------------------------------------------------------- inline
@pytest.mark.parametrize("dtype", DTYPES + ["bytes"])
async def test_small_tensors_travel_inline(planes, dtype: str) -> None:
    p = await planes("auto", inline_threshold_bytes=1 << 16)
    a = np.array([b"ab", b"", b"xyz"], dtype=object) if dtype == "bytes" else arr_of(dtype)
    wire = await p.encode(a)
    assert not is_ref(wire) and wire == tensor_to_wire(a)
    got = await p.decode(wire)
    assert list(got) == list(a) if dtype == "bytes" else same(got, a)
    await p.release(wire)  # no-op


async def test_kind_inline_never_makes_references(planes) -> None:
    p = await planes("inline", inline_threshold_bytes=0)
    wire = await p.encode(np.zeros(1 << 20, np.uint8))
    assert not is_ref(wire) and p.stored == 0


async def test_threshold_is_inclusive(planes) -> None:
    p = await planes("shm", inline_threshold_bytes=64)
    assert not is_ref(await p.encode(np.zeros(16, np.float32)))
    w = await p.encode(np.zeros(17, np.float32))
    assert is_ref(w)
    await p.release(w)


# ---------------------------------------------------------------- shared memory
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0, 3), (5, 7), "noncontig"])
async def test_shm_round_trip(planes, dtype: str, shape) -> None:
    prod, cons = await planes(), await planes()
    a = arr_of(dtype, (12, 10)).T[::2, ::-1] if shape == "noncontig" else arr_of(dtype, shape)
    wire = await prod.encode(a)
    ref = wire["ref"]
    assert ref["uri"].startswith("shm://") and ref["dtype"] == dtype and ref["shape"] == list(a.shape)
    got = await cons.decode(wire)
    assert same(got, a)
    got[...] = got  # writable
    del got


async def test_big_endian_and_bytes_by_reference(planes) -> None:
    prod, cons = await planes(), await planes()
    be = np.arange(1000, dtype=">i4").reshape(10, 100)
    got = await cons.decode(await prod.encode(be))
    assert got.dtype == np.dtype("int32") and (got == be).all()
    words = np.array([b"a" * i for i in range(50)], dtype=object).reshape(5, 10)
    got = await cons.decode(await prod.encode(words))
    assert got.shape == (5, 10) and list(got.reshape(-1)) == list(words.reshape(-1))


async def test_the_producer_keeps_a_snapshot(planes) -> None:
    prod, cons = await planes(), await planes()
    a = np.ones(1000, np.float64)
    wire = await prod.encode(a)
    a[:] = 7
    assert (await cons.decode(wire) == 1).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=hnp.arrays(dtype=st.sampled_from([np.int16, np.float32, np.uint64, np.bool_, np.float16]),
                    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)))
def test_shm_round_trip_property(a: np.ndarray) -> None:
    async def go():
        cfg = DataPlaneConfig(kind="shm", inline_threshold_bytes=-1)
        async with make_data_plane(cfg) as prod, make_data_plane(cfg) as cons:
            got = await cons.decode(await prod.encode(a))
            assert got.shape == a.shape and got.dtype == a.dtype and got.tobytes() == a.tobytes()

    asyncio.run(go())


async def test_segments_are_pooled_and_reused(planes) -> None:
    prod, cons = await planes(), await planes()
    a = np.arange(1 << 20, dtype=np.float32)
    names = set()
    for i in range(5):
        wire = await prod.encode(a + i)
        names.add(wire["ref"]["shm"])
        got = await cons.decode(wire)
        assert got[1] == 1 + i
        del got  # the view goes: the segment goes back to the producer
        gc.collect()
    assert len(names) == 1 and len(mine()) == 1
    prod.reap()
    assert prod.stored == 0


async def test_read_twice_is_a_typed_error(planes) -> None:
    prod, cons = await planes(), await planes()
    wire = await prod.encode(np.ones(100))
    got = await cons.decode(wire)
    with pytest.raises(DataPlaneError, match="already read"):
        await cons.decode(wire)
    del got
    gc.collect()
    with pytest.raises(DataPlaneError, match="released"):
        await cons.decode(wire)


async def test_lease_expiry_frees_unread_tensors(planes) -> None:
    prod, cons = await planes(lease_s=0.05), await planes()
    wire = await prod.encode(np.ones(1000))
    assert prod.stored == 1
    await asyncio.sleep(0.1)
    with pytest.raises(DataPlaneError, match="expired"):
        await cons.decode(wire)
    prod.reap()
    assert prod.stored == 0


async def test_a_held_view_outlives_the_lease(planes) -> None:
    """Expiry never recycles memory under a consumer's live array."""
    prod, cons = await planes(lease_s=0.05), await planes()
    wire = await prod.encode(np.full(1 << 16, 3.0))
    got = await cons.decode(wire)
    await asyncio.sleep(0.1)
    prod.reap()
    again = await prod.encode(np.full(1 << 16, 9.0))  # must not land in the held segment
    assert again["ref"]["shm"] != wire["ref"]["shm"]
    assert (got == 3.0).all()
    del got
    gc.collect()
    prod.reap()
    await prod.release(again)
    prod.reap()
    assert prod.stored == 0


async def test_release_unread_from_the_consumer(planes) -> None:
    prod, cons = await planes(), await planes()
    wire = await prod.encode(np.ones(1000))
    await cons.release(wire)
    await cons.release(wire)  # idempotent
    prod.reap()
    assert prod.stored == 0
    with pytest.raises(DataPlaneError):
        await cons.decode(wire)


async def test_release_at_the_producer(planes) -> None:
    prod = await planes()
    wire = await prod.encode(np.ones(1000))
    await prod.release(wire)
    assert prod.stored == 0


async def test_forged_or_unknown_references(planes) -> None:
    prod, cons = await planes(), await planes()
    wire = await prod.encode(np.ones(10))
    forged = {"ref": {**wire["ref"], "shm_token": b"\0" * 16}}
    with pytest.raises(DataPlaneError):
        await cons.decode(forged)
    gone = {"ref": {**wire["ref"], "shm": wire["ref"]["shm"] + "x"}}
    with pytest.raises(DataPlaneError, match="unknown, released or expired"):
        await cons.decode(gone)
    assert same(await cons.decode(wire), np.ones(10))  # the real one is untouched


async def test_close_unlinks_and_refuses(planes) -> None:
    prod = await planes()
    wire = await prod.encode(np.ones(1 << 16))
    assert len(mine()) == 1
    await prod.close()
    await prod.close()  # idempotent
    assert mine() == []
    cons = await planes()
    with pytest.raises(DataPlaneError):
        await cons.decode(wire)
    with pytest.raises(DataPlaneError):
        await prod.encode(np.ones(1 << 16))


async def test_many_in_flight(planes) -> None:
    prod, c1, c2 = await planes(), await planes(), await planes()
    arrays = [np.full((256, 64), i, np.int32) for i in range(64)]
    wires = await asyncio.gather(*(prod.encode(a) for a in arrays))
    got = await asyncio.gather(*((c1 if i % 2 else c2).decode(w) for i, w in enumerate(wires)))
    assert all(same(g, a) for g, a in zip(got, arrays))
    del got
    await asyncio.sleep(0)  # gather's finished tasks hold their results until the loop turns
    gc.collect()
    prod.reap()
    assert prod.stored == 0


def test_sweep_removes_dead_producers_segments(tmp_path) -> None:
    ns = segments.pidns()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    dead = tmp_path / f"tdist-dp-{ns}-{proc.pid}-1-abc"
    live = tmp_path / f"tdist-dp-{ns}-{os.getpid()}-{process_start(os.getpid())}-abc"
    other_ns = tmp_path / f"tdist-dp-1-{proc.pid}-1-abc"
    for f in (dead, live, other_ns):
        f.write_bytes(b"x")
    assert views.sweep_dead(str(tmp_path)) == [dead.name]
    assert live.exists() and other_ns.exists()


async def test_shm_reference_needs_the_same_host(planes, monkeypatch) -> None:
    from tdist.runtime.planes.data import plane as plane_mod

    prod, cons = await planes(), await planes()
    wire = await prod.encode(np.ones(100))
    monkeypatch.setattr(plane_mod, "host_id", lambda: "elsewhere")
    with pytest.raises(DataPlaneError, match="another host"):
        await cons.decode(wire)


async def test_dead_producer_same_host(planes) -> None:
    cons = await planes()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    wire = _ref(uri="shm://tdist-dp-1-2-3-x", host_id=host_id(), pid=proc.pid, pid_start=1, expires_at=time.time() + 60).to_wire()
    with pytest.raises(DataPlaneError, match="gone"):
        await cons.decode(wire)


# ---------------------------------------------------------------- in-memory plane
async def test_in_memory_plane() -> None:
    cfg = DataPlaneConfig(inline_threshold_bytes=16, lease_s=60)
    prod, cons = InMemoryDataPlane(cfg), InMemoryDataPlane(cfg)
    small = await prod.encode(np.ones(2, np.float32))
    assert not is_ref(small)
    wire = await prod.encode(np.arange(100))
    assert is_ref(wire) and prod.stored == 1
    assert (await cons.decode(wire) == np.arange(100)).all()
    with pytest.raises(DataPlaneError):
        await cons.decode(wire)
    w2 = await prod.encode(np.arange(100))
    await cons.release(w2)
    with pytest.raises(DataPlaneError):
        await cons.decode(w2)
    short = InMemoryDataPlane(DataPlaneConfig(inline_threshold_bytes=0, lease_s=0.01))
    w3 = await short.encode(np.arange(10))
    await asyncio.sleep(0.02)
    with pytest.raises(DataPlaneError, match="expired"):
        await cons.decode(w3)
    await prod.close()
    await short.close()


async def test_cpu_torch_tensors_arrive_as_numpy(planes) -> None:
    torch = pytest.importorskip("torch")
    prod, cons = await planes(), await planes()
    t = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    got = await cons.decode(await prod.encode(t))
    assert isinstance(got, np.ndarray) and (got == t.numpy()).all()


async def test_full_shared_memory_is_a_typed_error(planes, monkeypatch) -> None:
    import errno

    def full(seg, src):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments.SegmentPool, "fill", staticmethod(full))
    prod = await planes("shm")
    with pytest.raises(DataPlaneError, match="shared memory"):
        await prod.encode(np.ones(1000))
    assert prod.stored == 0


async def test_own_reference_in_the_same_plane(planes) -> None:
    """A worker sending to an operator in its own process: decode through the same plane."""
    p = await planes("shm")
    a = np.arange(5000, dtype=np.int64)
    got = await p.decode(await p.encode(a))
    assert same(got, a)
    del got


async def test_concurrent_decodes_of_one_reference(planes) -> None:
    """Misuse (one reference decoded twice at once in one process) stays safe: one wins, the
    other gets a typed error, and the winner's view keeps its segment."""
    prod, cons = await planes(lease_s=0.05), await planes()
    wire = await prod.encode(np.full(1 << 16, 5.0))
    got = await asyncio.gather(cons.decode(wire), cons.decode(wire), return_exceptions=True)
    wins = [g for g in got if isinstance(g, np.ndarray)]
    assert len(wins) == 1 and sum(isinstance(g, DataPlaneError) for g in got) == 1
    await asyncio.sleep(0.1)
    prod.reap()  # lease over, but the winner still holds the segment
    other = await prod.encode(np.full(1 << 16, 9.0))
    assert other["ref"]["shm"] != wire["ref"]["shm"] and (wins[0] == 5.0).all()
    del got, wins
    await prod.release(other)
