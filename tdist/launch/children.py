"""Children of a supervisor: exit status without reaping, and group signals that never hit a stranger.

Why apart: a child's pid (the id of the process group it leads) stays reserved until the child is
reaped; a group signalled after that could, in principle, be a new process's. So the supervisor
asks whether a child exited *without* reaping it (`exited`), signals what is left of its group,
and only then reaps it (`reap`).
"""

from __future__ import annotations

import os
import signal
import subprocess


def exited(proc: subprocess.Popen[bytes]) -> int | None:
    """The exit status of a child that has exited, WITHOUT reaping it (None: still running).

    Unreaped, its pid cannot be handed to another process, so its group can still be signalled
    safely; `reap` does that and then reaps.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll()
    if info is None or info.si_pid == 0:
        return None
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


def reap(proc: subprocess.Popen[bytes]) -> int | None:
    """None while `proc` runs; once it has exited: SIGKILL what is left of its group (engine
    processes, a Triton server), then reap it and return its exit code (Popen's convention)."""
    if proc.returncode is not None:
        return proc.returncode
    if exited(proc) is None:
        return None
    kill_group(proc.pid, signal.SIGKILL)
    return proc.wait()


def kill_group(pid: int, sig: int) -> None:
    """Signal the process group of a child we started (and have not reaped: the pid is still ours)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
