"""The engine's own processes as seen from the worker: finding them (/proc), and setting their
CPU affinity and niceness; plus the core binding vLLM's CPU backend is given.

vLLM starts its EngineCore and model workers as child processes of the worker; on a CPU-only
machine the worker renices and pins them after the engine started (see VllmEngine.start). Apart
from vllm.py because these are plain Linux process helpers, tested without vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

#: Niceness given to the engine's own processes (EngineCore, workers) on a CPU-only machine.
#: vLLM's CPU backend busy-polls (its shared-memory queues spin for 1 s after each read), so
#: during generation the engine processes keep every core busy; at equal priority the message
#: bus (nats-server), this worker's event loop, the router and the frontend then get the CPU
#: late and streamed tokens arrive in bursts (measured: inter-token gaps of 0.01 ms after a
#: 150 ms stall). The engine yields to them at niceness 10; the worker process itself is untouched.
CPU_ENGINE_NICE = 10


def parse_cpu_list(text: str) -> set[int]:
    """"0-3,6" → {0, 1, 2, 3, 6} (the VLLM_CPU_OMP_THREADS_BIND / taskset syntax; "|" separates ranks)."""
    cpus: set[int] = set()
    for part in str(text).replace("|", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _each_thread(root: int | None, apply: Callable[[int], None]) -> list[int]:
    """Call `apply(tid)` for every thread of every descendant of `root` (default: this process);
    threads and processes that vanish meanwhile are skipped. Returns the descendants' pids."""
    pids = descendants(root)
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                apply(int(tid))
            except OSError:
                pass
    return pids


def pin_children(cpus: set[int], root: int | None = None) -> list[int]:
    """Restrict every thread of every descendant of `root` (default: this process) to `cpus`."""
    return _each_thread(root, lambda tid: os.sched_setaffinity(tid, cpus))


def descendants(root: int | None = None) -> list[int]:
    """Pids of every process below `root` (default: this process), from /proc."""
    parent: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            parent[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    mine, frontier = [], [root or os.getpid()]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        mine += kids
        frontier += kids
    return sorted(mine)


def renice_children(nice: int, root: int | None = None) -> list[int]:
    """Set the niceness of every thread of every descendant process of `root` (default: this one)."""
    return _each_thread(root, lambda tid: os.setpriority(os.PRIO_PROCESS, tid, nice))


def cpu_bind_of(param: Any, cpu_ids: list[int], replica: int) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for this engine: parameters.cpu_bind ("replica": core
    replica % cores; or a list like "0-3"), else the worker's cpu_ids, else None (vLLM's auto)."""
    if param == "replica":
        return str(replica % (os.cpu_count() or 1))
    if param not in (None, "", "auto"):
        return str(param)
    if cpu_ids:
        # the plan's cores (cluster.cpus_per_node) that this process may use; a graph written for a
        # bigger machine than this one falls back to vLLM's own binding rather than failing
        try:
            allowed = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # pragma: no cover - no affinity API
            allowed = set(cpu_ids)
        usable = [c for c in cpu_ids if c in allowed]
        if usable:
            return ",".join(str(c) for c in usable)
    return None
