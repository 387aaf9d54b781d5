"""The consumer's side of shared-memory segments: claim a FILLED segment as a zero-copy view,
release it when the view is garbage collected, release one unread, sweep dead producers' files.

Mappings are cached per segment (segments are pooled and reused by their producer, so a kept
mapping, page tables included, makes the next tensor in it cost no faults) and dropped once
their producer unlinks the file (the plane's reaper calls evict_unlinked every pass).
See segments.py for the header layout and the locking rules.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from tdist.errors import DataPlaneError

from tdist.runtime.process_identity import process_alive

from .refs import SHM_DIR, SHM_PREFIX
from .segments import FILLED, HEADER, RELEASED, TAKEN, pidns, read_state, shm_path, try_lock, unlock, write_state


@dataclass(eq=False)
class _Mapped:
    """A consumer's cached mapping of a producer's segment. Segments are pooled and reused, so
    keeping the mapping (page tables included) makes the next tensor in it cost no faults."""

    name: str
    fd: int
    mm: mmap.mmap
    size: int
    held: bool = False  # a live view of ours owns the segment (and its lock)
    taking: int = 0  # take() calls in progress (they may wait for the lock)
    doomed: bool = False  # unlinked or evicted while in use: close when the last user goes
    last_used: float = 0.0


MAX_MAPPINGS = 128
_MAPS: dict[str, _Mapped] = {}
_MAPS_LOCK = threading.Lock()


def _gone(name: str) -> DataPlaneError:
    return DataPlaneError(
        "tensor reference is unknown, released or expired (its shared-memory segment is gone)", detail={"shm": name}
    )


def _close_mapping(m: _Mapped) -> None:
    """Forget a mapping; its pages go when the last view over them does."""
    with _MAPS_LOCK:
        if _MAPS.get(m.name) is m:
            del _MAPS[m.name]
    if m.held or m.taking:
        m.doomed = True
        return
    if m.fd >= 0:
        try:
            os.close(m.fd)
        except OSError:
            pass
        m.fd = -1


def _mapping(name: str) -> _Mapped:
    with _MAPS_LOCK:
        m = _MAPS.get(name)
    if m is not None:
        return m
    try:
        fd = os.open(shm_path(name), os.O_RDWR)
    except FileNotFoundError:
        raise _gone(name) from None
    try:
        size = os.fstat(fd).st_size
        if size < HEADER:
            raise _gone(name)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    m = _Mapped(name=name, fd=fd, mm=mm, size=size)
    with _MAPS_LOCK:
        existing = _MAPS.setdefault(name, m)
        crowded = len(_MAPS) > MAX_MAPPINGS
    if existing is not m:
        os.close(fd)
        return existing
    if crowded:
        with _MAPS_LOCK:
            idle = sorted((x for x in _MAPS.values() if not x.held and x is not m), key=lambda x: x.last_used)
        for x in idle[: max(1, len(idle) // 4)]:
            _close_mapping(x)
    return m


def evict_unlinked() -> int:
    """Drop cached mappings of segments their producer unlinked (pool trim, close, sweep), so
    their memory can go. The plane's reaper calls this every pass."""
    with _MAPS_LOCK:
        maps = list(_MAPS.values())
    dropped = 0
    for m in maps:
        try:
            unlinked = os.fstat(m.fd).st_nlink == 0
        except OSError:
            unlinked = True
        if unlinked:
            _close_mapping(m)
            dropped += 1
    return dropped


def _release_view(m: _Mapped, token: bytes) -> None:
    try:
        got, state, nbytes = read_state(m.fd)
        if got == token and state == TAKEN:
            write_state(m.fd, token, RELEASED, nbytes)
    except OSError:
        pass
    finally:
        unlock(m.fd)
        m.held = False
        _close_if_doomed(m)


def _close_if_doomed(m: _Mapped) -> None:
    if m.doomed and not m.held and not m.taking:
        m.doomed = False
        _close_mapping(m)


async def take(name: str, token: bytes, nbytes: int, *, timeout_s: float = 5.0, lease_only: bool = False) -> np.ndarray:
    """Own a FILLED segment: a zero-copy uint8 view of its payload. The segment goes back to
    its producer when the view (and every array made from it) is garbage collected.
    lease_only: the segment is only a lease (CUDA IPC); the view is one header byte that
    holds it until dropped."""
    m = _mapping(name)
    m.taking += 1
    try:
        return await _take(m, name, token, nbytes, timeout_s, lease_only)
    finally:
        m.taking -= 1
        _close_if_doomed(m)


async def _take(m: _Mapped, name: str, token: bytes, nbytes: int, timeout_s: float, lease_only: bool) -> np.ndarray:
    import asyncio

    try:
        if os.fstat(m.fd).st_nlink == 0:
            raise OSError("unlinked")
    except OSError:
        _close_mapping(m)
        raise _gone(name) from None
    deadline = time.monotonic() + timeout_s
    while True:
        if m.held:  # a live view of ours owns it (flock is per open file: never touch that lock)
            got, state, _ = read_state(m.fd)
            why = "was already read by another consumer" if got == token and state == TAKEN else "is released or expired"
            raise DataPlaneError(f"tensor reference {why}", detail={"shm": name})
        if m.fd < 0:
            raise _gone(name)
        locked = try_lock(m.fd)
        try:
            got, state, size = read_state(m.fd)
            if got != token or state not in (FILLED, TAKEN):
                raise DataPlaneError("tensor reference is released or expired", detail={"shm": name})
            if state == TAKEN:
                raise DataPlaneError("tensor reference was already read by another consumer", detail={"shm": name})
            if size != nbytes or HEADER + nbytes > m.size:
                raise DataPlaneError(f"shared-memory segment holds {size} bytes, the reference says {nbytes}")
        except BaseException:
            if locked:
                unlock(m.fd)
            raise
        if locked:
            break
        if time.monotonic() > deadline:  # FILLED but locked: its producer is serving it over UCX
            raise DataPlaneError("shared-memory segment stayed locked", detail={"shm": name})
        await asyncio.sleep(0.001)
    write_state(m.fd, token, TAKEN, nbytes)
    m.held = True
    m.last_used = time.monotonic()
    if lease_only:
        view = np.frombuffer(m.mm, dtype=np.uint8, count=1, offset=0)
    elif nbytes == 0:
        _release_view(m, token)
        return np.empty(0, dtype=np.uint8)
    else:
        view = np.frombuffer(m.mm, dtype=np.uint8, count=nbytes, offset=HEADER)
    weakref.finalize(view, _release_view, m, token)
    return view


def release_unclaimed(name: str, token: bytes) -> bool:
    """Release a FILLED segment without reading it (a consumer that does not need the tensor)."""
    try:
        fd = os.open(shm_path(name), os.O_RDWR)
    except OSError:
        return False
    try:
        if not try_lock(fd):
            return False
        got, state, nbytes = read_state(fd)
        if got == token and state == FILLED:
            write_state(fd, token, RELEASED, nbytes)
            return True
        return False
    finally:
        unlock(fd)
        os.close(fd)


def sweep_dead(directory: str = SHM_DIR) -> list[str]:
    """Unlink segments whose producer (same pid namespace) is dead. Cheap: one listdir."""
    ns = pidns()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    prefix = f"{SHM_PREFIX}{ns}-"
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            pid_s, start_s, _ = name[len(prefix):].split("-", 2)
            pid, start = int(pid_s), int(start_s)
        except ValueError:
            continue
        if not process_alive(pid, start or None):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    continue
    return removed
