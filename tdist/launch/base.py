"""The `Launcher` interface: a Plan plus typed launch options → a running deployment.

Every way of running a plan (local processes, one mpirun world, one srun step, an sbatch job)
is a `Launcher` with the same four verbs: `start` (prepare the run directory, start, wait until
ready), `status` (the run record, freshly read), `logs` (each worker's log file) and `stop`. The
CLI only parses arguments and renders what the launcher reports through `LaunchEvents`; it
starts no process and writes nothing into the run directory itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from tdist.errors import LaunchError
from tdist.launch.rundir import LaunchOptions, RunRecord, alive_in_run, prepare_run_dir, write_plan

if TYPE_CHECKING:
    from tdist.plan.model import Plan

__all__ = ["LaunchEvents", "LaunchOptions", "Launcher"]


class LaunchEvents:
    """What a launcher reports while it works; the CLI renders it. The default shows nothing."""

    def note(self, text: str) -> None:
        """A line worth showing (a job id, where the previous run went)."""

    def warn(self, text: str) -> None:
        """Something the user should act on, though the verb goes on (a previous run's processes still alive)."""

    def phase(self, text: str) -> None:
        """A longer step begins ("starting X", "stopping X"); progress() refines it."""

    def progress(self, ready: int, total: int, waiting: str) -> None:
        """During start-up: `ready` of `total` workers ready; `waiting` names the others."""

    def ready(self, record: RunRecord) -> None:
        """Every worker is ready (foreground: serving starts now)."""

    def done(self, text: str) -> None:
        """The last word of a verb ("stopped X")."""


class Launcher(ABC):
    """Starts a plan one way, and manages what it started through the run record."""

    kind: ClassVar[str]

    def __init__(self, plan: "Plan", options: LaunchOptions, record: RunRecord | None = None) -> None:
        if plan.launcher != self.kind:
            raise LaunchError(f"a plan for --launcher {plan.launcher} given to the {self.kind} launcher")
        self.plan = plan
        self.options = options
        self.record = record

    @property
    def plan_path(self) -> str:
        return f"{self.plan.run_dir}/plan.json"

    def dry_run(self) -> str:
        """Exactly what `start` would run: the text `tdist plan --format script` prints."""
        from tdist.plan.emit import emit_script

        return emit_script(self.plan, self.plan_path, nats_url=self.options.nats_url)

    def start(self, events: LaunchEvents | None = None, *, graph: str | None = None) -> RunRecord:
        """Prepare the run directory (plan.json, the run record), start, return the record once ready.

        In the foreground (`options.detach` False) local and world launchers serve until SIGINT /
        SIGTERM and return the final record.
        """
        events = events or LaunchEvents()
        run_dir, previous = prepare_run_dir(self.plan.deployment)
        if str(run_dir) != self.plan.run_dir:
            raise LaunchError(f"the plan's run directory {self.plan.run_dir} is not the deployment's {run_dir}")
        if previous is not None:
            events.note(f"previous run of {self.plan.deployment} kept in {previous}")
            alive = alive_in_run(previous)
            if alive:
                events.warn(f"{len(alive)} process(es) of the previous run of {self.plan.deployment} are still "
                            f"alive: {', '.join(alive)}; they were not stopped (its run record: {previous}/state.json)")
        write_plan(self.plan)
        self.record = RunRecord.for_plan(self.plan, self.options, graph=graph)
        self.record.save()
        return self._start(self.record, events)

    @abstractmethod
    def _start(self, record: RunRecord, events: LaunchEvents) -> RunRecord: ...

    def status(self) -> RunRecord:
        """The run record as last written by whoever runs the deployment."""
        assert self.record is not None
        self.record = self.record.reload()
        return self.record

    def logs(self) -> dict[str, str]:
        """worker name → its log file."""
        assert self.record is not None
        return {name: w.log for name, w in self.record.workers.items() if w.log}

    @abstractmethod
    def stop(self, *, timeout_s: float = 60.0, events: LaunchEvents | None = None) -> list[str]:
        """Stop everything the deployment runs; returns what had to be forced (empty: a clean stop)."""
