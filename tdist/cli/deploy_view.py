"""How `deploy` and `stop` look: the launcher's events rendered with rich, and the ready table.

The launchers (tdist/launch) do the work and report through `LaunchEvents`; this module only
renders: a spinner with progress on stderr, the table of workers once the deployment is ready,
one line per note on stdout.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from tdist.launch.base import LaunchEvents


class CliEvents(LaunchEvents):
    """LaunchEvents for a terminal: phases and progress as a spinner, results as text and tables."""

    def __init__(self, out: Console, err: Console) -> None:
        self.out = out
        self.err = err
        self._status: Status | None = None
        self._phase = ""

    def _end_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def note(self, text: str) -> None:
        self.out.print(text) if text.startswith("submitted") else self.err.print(f"[dim]{text}[/]")

    def warn(self, text: str) -> None:
        self.err.print(f"[bold yellow]warning:[/] {escape(text)}")

    def phase(self, text: str) -> None:
        self._phase = text
        if self._status is None:
            self._status = self.err.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def progress(self, ready: int, total: int, waiting: str) -> None:
        if self._status is not None:
            self._status.update(f"{self._phase}: {ready}/{total} workers ready" + (f" (waiting: {waiting})" if waiting else ""))

    def ready(self, record: Any) -> None:
        self._end_status()
        print_deployed(self.out, record)
        if record.options.detach or record.launcher == "sbatch":
            how = f"supervisor pid {record.supervisor.pid}" if record.supervisor else f"job {record.slurm.job_id}"
            self.out.print(f"detached ({how}); run dir {record.run_dir}\n"
                           "  tdist status · tdist infer --component NAME ... · tdist stop")
        else:
            self.out.print("serving; Ctrl-C (or `tdist stop`) stops everything")

    def done(self, text: str) -> None:
        self._end_status()
        self.out.print(text)


def print_deployed(out: Console, record: Any) -> None:
    """The table `deploy` prints once every worker is ready (any launcher)."""
    launcher = f" ({record.launcher})" if record.launcher != "local" else ""
    t = Table(title=f"deployment {record.deployment} ready{launcher}", title_justify="left")
    for col in ("component", "worker", "pid", "log"):
        t.add_column(col)
    for w in record.workers.values():
        t.add_row(w.component, w.name, str(w.pid), w.log or "")
    out.print(t)
    out.print(f"request plane: {record.nats.url}" + (" (embedded)" if record.nats.embedded else ""))
    if record.slurm.job_id:
        out.print(f"job: {record.slurm.job_id}")
    elif record.world is not None:
        out.print(f"{record.launcher} pid: {record.world.pid}")
