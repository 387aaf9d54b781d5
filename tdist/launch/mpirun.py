"""`--launcher mpirun` (and the srun step): mpirun itself, the world's environment, per-rank logs.

The supervisor of a world deployment (`python -m tdist.launch.world --run-dir DIR`) lives in
launch/world.py and imports this module, never the other way round. Each rank runs `python -m tdist.runtime.worker --plan plan.json` and picks
`workers[rank]` from OMPI_COMM_WORLD_RANK / SLURM_PROCID; NATS_SERVER and ETCD_ENDPOINTS reach
it through `-x` / `--export` (`world_env`).

Per-rank logs without touching the argv: Open MPI tags each output line with its rank when
OMPI_MCA_orte_tag_output=1 (`[1,R]<stdout>:`), srun when SLURM_LABELIO=1 (`R: `); the supervisor
reads the world's output and writes rank R's lines to that worker's log_path
(`<run>/logs/<worker>.log`), and every line to `<run>/logs/<launcher>.log` (`RankLogDemux`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tdist.errors import LaunchError
from tdist.runtime.process_identity import process_alive

log = logging.getLogger("tdist.launch.world")

_OMPI_TAG = re.compile(r"^\[\d+,(\d+)\]<(?:stdout|stderr)>:(.*)$", re.S)
_OMPI_INNER_TAG = re.compile(r"\[\d+,\d+\]<(?:stdout|stderr)>:")
_OMPI_INNER_TAG_RANK = re.compile(r"\[\d+,(\d+)\]<(?:stdout|stderr)>:")
_SRUN_TAG = re.compile(r"^\s*(\d+): (.*)$", re.S)


def find_mpirun() -> str:
    path = os.environ.get("TDIST_MPIRUN") or shutil.which("mpirun")
    if not path:
        raise LaunchError(
            "mpirun not found: install Open MPI (apt-get install openmpi-bin libopenmpi-dev; "
            "scripts/setup.d/10-mpi-slurm.sh does it) or set TDIST_MPIRUN"
        )
    return path


def mpirun_base_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment mpirun itself needs here: as root, Open MPI refuses to start unless told."""
    out = dict(os.environ if env is None else env)
    if os.geteuid() == 0:
        out.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        out.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return out


def stop_pid(pid: int | None, *, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> bool:
    """Signal `pid`, wait, SIGKILL it (and its group) after timeout_s. True if it is gone."""
    if not process_alive(pid, None):
        return True
    assert pid is not None
    _signal(pid, sig)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not process_alive(pid, None):
            return True
        time.sleep(0.05)
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    for _ in range(100):
        _reap(pid)
        if not process_alive(pid, None):
            return True
        time.sleep(0.05)
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def parse_rank_line(line: str, launcher: str) -> tuple[int | None, str]:
    """`[1,2]<stdout>:text` (mpirun) or `2: text` (srun --label) → (2, "text"); untagged → (None, line)."""
    m = (_OMPI_TAG if launcher == "mpirun" else _SRUN_TAG).match(line)
    if not m:
        return None, line
    body = m.group(2)
    if launcher == "mpirun":
        # Open MPI tags chunks, not lines: a line's end can arrive as its own tagged chunk
        # ("text[1,2]<stdout>:\n"). Drop the inner tags.
        body = _OMPI_INNER_TAG.sub("", body)
    return int(m.group(1)), body



def split_rank_chunks(line: str, launcher: str) -> list[tuple[int | None, str]]:
    """One line of the world's output → (rank, text) pieces, in order.

    Open MPI tags chunks, not lines, so one physical line can carry several ranks' pieces:
    `[1,0]<stdout>:armed 0[1,1]<stdout>:armed 1[1,0]<stdout>:\n` → (0, "armed 0"), (1, "armed 1"),
    (0, "\n"). A piece without a newline continues that rank's line. srun labels whole lines.
    """
    if launcher != "mpirun":
        rank, text = parse_rank_line(line, launcher)
        return [(rank, text)]
    tags = list(_OMPI_INNER_TAG_RANK.finditer(line))
    if not tags or tags[0].start() != 0:
        return [(None, line)]
    pieces = []
    for i, m in enumerate(tags):
        end = tags[i + 1].start() if i + 1 < len(tags) else len(line)
        pieces.append((int(m.group(1)), line[m.end():end]))
    return pieces


def world_env(
    launcher: str,
    *,
    base: dict[str, str] | None = None,
    nats_url: str | None = None,
    etcd_endpoints: list[str] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment of the mpirun/srun process: what the emitted argv forwards to the ranks
    (NATS_SERVER, ETCD_ENDPOINTS via -x / --export), this interpreter's bin dir first on PATH
    (the argv says `python`), root permission for Open MPI, and rank-tagged output."""
    env = mpirun_base_env(base) if launcher == "mpirun" else dict(os.environ if base is None else base)
    env.update(extra or {})
    bindir = os.path.dirname(sys.executable)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if nats_url:
        env["NATS_SERVER"] = nats_url
    if etcd_endpoints:
        env["ETCD_ENDPOINTS"] = ",".join(etcd_endpoints)
    if launcher == "mpirun":
        env["OMPI_MCA_orte_tag_output"] = "1"
    else:
        env["SLURM_LABELIO"] = "1"
    return env


class RankLogDemux:
    """Reads the world's merged output; writes each rank's lines to its own log file."""

    def __init__(self, stream, launcher: str, launcher_log: Path, rank_logs: dict[int, str]) -> None:  # noqa: ANN001
        self.stream = stream
        self.launcher = launcher
        self.launcher_log = launcher_log
        self.rank_logs = rank_logs
        self._files: dict[int, Any] = {}
        self.thread = threading.Thread(target=self._run, name="rank-log-demux", daemon=True)

    def start(self) -> "RankLogDemux":
        self.thread.start()
        return self

    def _file(self, rank: int) -> Any:
        if rank not in self._files:
            path = self.rank_logs.get(rank) or str(self.launcher_log.parent / f"rank-{rank}.log")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._files[rank] = open(path, "a", buffering=1)
        return self._files[rank]

    def _run(self) -> None:
        pending: dict[int, str] = {}  # rank → text of a line not finished yet
        with open(self.launcher_log, "a", buffering=1) as all_out:
            for raw in iter(self.stream.readline, b""):
                line = raw.decode(errors="replace")
                all_out.write(line)
                for rank, text in split_rank_chunks(line, self.launcher):
                    if rank is None:
                        continue
                    text = pending.pop(rank, "") + text
                    head, sep, rest = text.rpartition("\n")
                    if sep:
                        self._file(rank).write(head + "\n")
                    if rest:
                        pending[rank] = rest
        for rank, rest in pending.items():
            self._file(rank).write(rest + "\n")
        for f in self._files.values():
            f.close()

    def join(self, timeout_s: float = 10.0) -> None:
        self.thread.join(timeout_s)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
