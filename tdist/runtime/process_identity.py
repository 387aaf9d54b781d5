"""Process identity: a pid plus its start time names one process for good.

A pid alone is not an identity: once a process exits, the kernel hands its pid to the next one,
so "kill the recorded pid" can hit a stranger. The start time (clock ticks since boot, field 22
of /proc/<pid>/stat) differs for a recycled pid. Used by the data plane (who owns a shared
segment) and by launch/ (which processes a deployment may signal); kept in the runtime because
the runtime never imports launch/.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

_cached_pid = [0]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name ("S", ppid, ...); None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split() if ")" in text else None


def process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (/proc/<pid>/stat field 22); None if gone.

    With the pid it names one process for good: a recycled pid has another start time."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, start: int | None) -> bool:
    """Is the process (pid, start) still running? `start=None`: any process with that pid.

    A zombie (exited, not reaped yet) is not alive. Where /proc is unreadable, the pid is trusted.
    """
    if not pid:
        return False
    fields = _stat_fields(pid)
    if fields is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return start is None  # alive but /proc unreadable: trust the pid
    if fields[0] == "Z":
        return False
    try:
        return start is None or int(fields[19]) == start
    except (IndexError, ValueError):
        return start is None


@functools.lru_cache(maxsize=1)
def _self_start() -> int | None:
    return process_start(os.getpid())


def self_identity() -> tuple[int, int | None]:
    """(pid, start) of this process; recomputed after fork."""
    pid = os.getpid()
    if _cached_pid[0] != pid:
        _self_start.cache_clear()
        _cached_pid[0] = pid
    return pid, _self_start()


# ---- owners: a process dies with the process that started it ------------------------------------
#
# Every process tdist starts is bound to an owner (the supervisor; in the foreground, the CLI; for
# an MPI rank, mpirun): when the owner dies, by any signal, SIGKILL included, the process goes too,
# within seconds, and takes its own children (engine processes, a Triton server) with it. Two
# mechanisms, because each has a gap the other closes:
#   * the kernel's parent-death signal (prctl PR_SET_PDEATHSIG), set between fork and exec
#     (`owner_preexec`): nothing in the child has to run, so it works for nats-server and etcd
#     too. It fires when the *thread* that forked the child exits, so it is only set from the
#     main thread (whose end is the process's end);
#   * a watch inside the worker (`watch_owner`) on its parent *process* (a pidfd, else polling
#     getppid): thread-agnostic, works for ranks that mpirun/srun started (no preexec of ours
#     there), and ends the worker's whole process group, grandchildren included.

PR_SET_PDEATHSIG = 1
#: How often `watch_owner` looks at its parent where pidfds are unavailable.
OWNER_POLL_S = 0.25


@functools.lru_cache(maxsize=1)
def _prctl() -> "Callable[..., int] | None":
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).prctl
        fn.restype = ctypes.c_int
        return fn  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux
        return None


def owner_preexec(sig: int) -> "Callable[[], None] | None":
    """A `preexec_fn` that binds the child to this process: `sig` reaches it when we die.

    None where that cannot be done safely: no prctl (not Linux), or not the main thread (the
    signal would fire when this thread ends, not when the process does). The child also checks
    that we did not die between fork and prctl (it would then have missed the signal).
    """
    import threading

    prctl = _prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    owner = os.getpid()
    sig_c = int(sig)

    def bind() -> None:  # between fork and exec: only async-signal-safe work
        prctl(PR_SET_PDEATHSIG, sig_c, 0, 0, 0)
        if os.getppid() != owner:
            os.kill(os.getpid(), sig_c)

    return bind


def watch_owner(on_gone: "Callable[[int], None]") -> "object | None":
    """Call `on_gone(owner_pid)` from a daemon thread once this process's parent has exited.

    The parent at call time is the owner. Returns the thread; None when the parent is already
    init (nothing to watch: the owner is gone, and `on_gone` runs at once).
    """
    import threading

    owner = os.getppid()
    if owner <= 1:
        on_gone(owner)
        return None

    def wait_pidfd() -> bool:
        import select

        try:
            fd = os.pidfd_open(owner)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            return False
        try:
            if os.getppid() == owner:  # opened the right process (not one that took its pid)
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                while not poller.poll(None):
                    pass
        finally:
            os.close(fd)
        return True

    def run() -> None:
        if not wait_pidfd():
            import time

            while os.getppid() == owner:
                time.sleep(OWNER_POLL_S)
        on_gone(owner)

    thread = threading.Thread(target=run, name="tdist-owner-watch", daemon=True)
    thread.start()
    return thread


def end_own_group() -> None:
    """SIGKILL this process's group (this process and the children it started), or this
    process alone when it does not lead a group (its group is someone else's)."""
    import signal

    try:
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)
