"""Owner binding and safe group signals, on tiny real processes: the parent-death signal is only
bound from the main thread (it fires when the forking *thread* ends), a child's exit is seen
without reaping it (so its group id cannot be recycled before the group is signalled), and a child
started with `owner_preexec` carries the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from tdist.launch.children import exited, reap
from tdist.runtime.process_identity import owner_preexec


def test_owner_preexec_is_bound_only_from_the_main_thread() -> None:
    assert callable(owner_preexec(signal.SIGTERM))
    seen: list[object] = []
    t = threading.Thread(target=lambda: seen.append(owner_preexec(signal.SIGTERM)))
    t.start()
    t.join()
    assert seen == [None]


def test_a_bound_child_carries_the_parent_death_signal() -> None:
    code = "import ctypes, signal; s = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(s)); print(s.value)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=owner_preexec(signal.SIGTERM), check=True).stdout  # PR_GET_PDEATHSIG
    assert int(out) == signal.SIGTERM
    unbound = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(unbound) == 0


def test_exit_is_seen_without_reaping_then_reaped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"], start_new_session=True)
    deadline = time.monotonic() + 30
    while exited(proc) is None:
        assert time.monotonic() < deadline, "child did not exit"
        time.sleep(0.01)
    assert exited(proc) == 7
    assert os.path.exists(f"/proc/{proc.pid}")  # a zombie: its pid (and group id) still ours
    assert reap(proc) == 7 and proc.returncode == 7


def test_a_killed_child_reads_as_popen_does() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"], start_new_session=True)
    assert exited(proc) is None and reap(proc) is None
    proc.kill()
    deadline = time.monotonic() + 30
    while exited(proc) is None:
        assert time.monotonic() < deadline, "child did not die"
        time.sleep(0.01)
    assert exited(proc) == -signal.SIGKILL and reap(proc) == -signal.SIGKILL
