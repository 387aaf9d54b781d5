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
