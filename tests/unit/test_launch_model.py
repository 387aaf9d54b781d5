"""The Launcher interface and the run record, without starting anything: options are typed and
filled from the plan (`--no-restart` reaches every launcher), the record round-trips through
state.json, a recorded process is recognised by pid + start time (a recycled pid is not it), and
each launcher's dry run is exactly what `tdist plan --format script` prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tdist.launch.launchers import launcher_for, open_launcher
from tdist.launch.rundir import LaunchOptions, ProcessRecord, RunRecord, write_plan
from tdist.plan import build_plan, emit_script
from tdist.runtime.process_identity import process_alive, process_start
from tdist.spec import load_graph

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ("local", "mpirun", "srun", "sbatch")


def _plan(launcher: str, run_dir: Path):  # noqa: ANN202
    return build_plan(load_graph(ROOT / "graphs" / "hello_world_python.yaml"), launcher=launcher, run_dir=str(run_dir))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_no_restart_and_timeouts_reach_every_launcher(launcher: str, tmp_path: Path) -> None:
    plan = _plan(launcher, tmp_path)
    default = LaunchOptions.for_plan(plan)
    assert default.restart is plan.restart_on_crash and default.startup_timeout_s == plan.startup_timeout_s
    opts = LaunchOptions.for_plan(plan, no_restart=True, startup_timeout_s=7, detach=True, nats_url="nats://h:1")
    chosen = launcher_for(plan, opts)
    assert chosen.kind == launcher and chosen.options.restart is False
    assert (chosen.options.startup_timeout_s, chosen.options.detach, chosen.options.nats_url) == (7, True, "nats://h:1")
    with pytest.raises(ValidationError):
        opts.restart = True  # type: ignore[misc]  # frozen: what deploy was told stays what it was told


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_dry_run_is_plan_script(launcher: str, tmp_path: Path) -> None:
    plan = _plan(launcher, tmp_path)
    text = launcher_for(plan, LaunchOptions.for_plan(plan)).dry_run()
    assert text == emit_script(plan, str(tmp_path / "plan.json"))
    assert f"-m tdist.runtime.worker --plan {tmp_path / 'plan.json'}" in text or '--plan "$PLAN"' in text
    assert "--config" not in text


def test_run_record_round_trips_and_reopens_its_launcher(tmp_path: Path) -> None:
    plan = _plan("mpirun", tmp_path)
    write_plan(plan)
    opts = LaunchOptions.for_plan(plan, no_restart=True)
    rec = RunRecord.for_plan(plan, opts, graph="g.yaml")
    assert [w.rank for w in rec.workers.values()] == list(range(len(plan.workers)))
    rec.supervisor = ProcessRecord.of(os.getpid())
    rec.state = "degraded"
    rec.save()
    back = RunRecord.load(tmp_path / "state.json")
    assert back == rec and back.options.restart is False and back.supervisor_alive()
    with pytest.raises(ValidationError):
        back.state = "running"  # type: ignore[assignment]  # not one of the ARCHITECTURE's words
    reopened = open_launcher(back)
    assert reopened.kind == "mpirun" and reopened.plan == plan and reopened.logs() == {
        name: w.log for name, w in rec.workers.items()}


def test_a_recycled_pid_is_not_the_recorded_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        rec = ProcessRecord.of(child.pid)
        assert rec.start == process_start(child.pid) and rec.alive()
        stranger = rec.model_copy(update={"start": (rec.start or 0) + 1})  # same pid, another process
        assert not stranger.alive() and not stranger.signal_group()
        elsewhere = rec.model_copy(update={"host": "some-other-node"})
        assert not elsewhere.alive()  # never judged (or signalled) by a local pid
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(10)
    assert not rec.alive() and not process_alive(child.pid, rec.start)


@pytest.mark.parametrize("launcher", ("local", "mpirun", "srun"))
def test_the_supervisor_of_every_supervised_launcher_gets_no_restart(launcher: str, tmp_path: Path) -> None:
    from tdist.launch.supervisor import make_supervisor

    plan = _plan(launcher, tmp_path)
    write_plan(plan)
    for no_restart in (False, True):
        rec = RunRecord.for_plan(plan, LaunchOptions.for_plan(plan, no_restart=no_restart, startup_timeout_s=9))
        sup = make_supervisor(rec)
        assert sup.restart is (not no_restart) and sup.startup_timeout_s == 9
        assert sup.state is rec and sup.plan_path == str(tmp_path / "plan.json")
        assert type(sup).__name__ == ("LocalSupervisor" if launcher == "local" else "WorldSupervisor")
