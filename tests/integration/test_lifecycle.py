"""Nothing outlives its owner; deployments are always found; restarts tell the truth.

On real processes (the CLI, the supervisor, nats-server, workers, an engine child): kill an owner
and check, by recorded identity (pid + start time), that what it owned is gone within a generous
bound; stop signals work during start-up. Every wait polls a signal under a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tdist.launch.rundir import ProcessRecord, RunRecord
from tests.integration.test_mpirun_deploy import TDIST, REPO, env, make_graph, tdist  # noqa: F401

pytestmark = pytest.mark.timeout(120)

OPS = str(Path(__file__).resolve().parent)
#: Generous liveness bound: an orphan must be gone this soon after its owner died (goal: 5 s).
GONE_WITHIN_S = 15.0


def wait_for(check, timeout_s: float = 60.0, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll `check()` until it returns something truthy (returned) or the deadline passes (fail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def still_alive(procs: list[ProcessRecord], timeout_s: float = GONE_WITHIN_S) -> list[ProcessRecord]:
    """The processes (by identity) still alive once `timeout_s` has passed or all are gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in procs if p.alive()]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in procs if p.alive()]


def recorded(rec: RunRecord) -> list[ProcessRecord]:
    """Every process a run record names (workers, servers, world), the supervisor excepted."""
    procs = [w.process for w in rec.workers.values()] + [rec.nats.process, rec.etcd.process, rec.world]
    return [p for p in procs if p is not None]


def state_file(env: dict[str, str], name: str) -> Path:  # noqa: F811
    return Path(env["TDIST_HOME"]) / "runs" / name / "state.json"


def load(path: Path) -> RunRecord | None:
    try:
        return RunRecord.load(path)
    except (OSError, ValueError):
        return None


def slow_graph(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """hello world's encoder plus a worker whose engine never finishes loading; the file it writes
    its engine child's pid to."""
    started = tmp_path / f"{name}.engine-pid"
    data = yaml.safe_load(make_graph(tmp_path, name).read_text())
    data["python_path"].append(OPS)
    data["operators"] = [data["operators"][0], {
        "name": "slow", "kind": "python", "implementation": "lifecycle_ops:SlowStart",
        "parameters": {"started_file": str(started)}}]
    data["workers"] = [{"name": "encoder", "operators": ["encoder"]}, {"name": "slow", "operators": ["slow"]}]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, started


def popen_tdist(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.Popen[str]:  # noqa: F811
    out = open(tmp_path / "cli.out", "w")  # noqa: SIM115 - closed with the test's tmp dir
    return subprocess.Popen(TDIST + args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


# ---- 1. nothing outlives its owner ------------------------------------------------------------


def test_killed_detached_supervisor_takes_its_workers_and_nats_along(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    graph = make_graph(tmp_path, "lc-sup")
    dep = tdist(["deploy", str(graph), "--detach"], env)
    assert dep.returncode == 0, dep.stdout + dep.stderr
    rec = RunRecord.load(state_file(env, "lc-sup"))
    owned = recorded(rec)
    try:
        assert rec.supervisor is not None and len(owned) == 4 and all(p.alive() for p in owned)
        os.kill(rec.supervisor.pid, signal.SIGKILL)
        assert still_alive([rec.supervisor]) == []
        assert still_alive(owned) == [], "orphans of a killed supervisor still alive"
        # 2. found without --name, and said so
        st = tdist(["status"], env)
        assert st.returncode == 1 and f"supervisor pid {rec.supervisor.pid} died" in st.stderr, st.stdout + st.stderr
        st = json.loads(tdist(["status", "--json"], env).stdout)
        assert (st["deployment"], st["state"], st["alive"]) == ("lc-sup", "failed", [])
        assert st["supervisor"] == {"pid": rec.supervisor.pid, "alive": False} and "died" in st["orphaned"]
    finally:
        stop = tdist(["stop"], env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "died" in stop.stderr and "stopped lc-sup" in stop.stdout
    assert RunRecord.load(state_file(env, "lc-sup")).state == "stopped"
    assert still_alive(owned + [rec.supervisor], 1) == []
    gone = tdist(["status"], env)
    assert gone.returncode != 0 and "no running deployment" in gone.stderr


def test_killed_foreground_cli_leaves_nothing(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    graph = make_graph(tmp_path, "lc-fg")
    cli = popen_tdist(["deploy", str(graph)], env, tmp_path)
    try:
        rec = wait_for(lambda: (r := load(state_file(env, "lc-fg"))) is not None and r.state == "ready" and r,
                       what="the foreground deployment to be ready")
        owned = recorded(rec)
        assert len(owned) == 4 and all(p.alive() for p in owned)
        cli.kill()
        cli.wait(10)
        assert still_alive(owned) == [], "processes of a killed foreground CLI still alive"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["int", "term", "hup"])
def test_stop_signal_during_foreground_start_up_stops_everything(env: dict[str, str], tmp_path: Path,  # noqa: F811
                                                                 sig: signal.Signals) -> None:
    """Start-up never ends here (an engine still loading); the signal must not wait for it, and the
    engine child of the loading worker goes too."""
    graph, started = slow_graph(tmp_path, "lc-int")
    cli = popen_tdist(["deploy", str(graph)], env, tmp_path)
    try:
        engine_pid = int(wait_for(lambda: started.exists() and started.read_text(), what="the engine child to start"))
        engine = ProcessRecord.of(engine_pid)
        rec = wait_for(lambda: (r := load(state_file(env, "lc-int"))) is not None
                       and all(w.process for w in r.workers.values()) and r, what="workers to be recorded")
        assert rec.state == "starting"
        owned = recorded(rec) + [engine]
        assert all(p.alive() for p in owned)
        cli.send_signal(sig)
        code = cli.wait(30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
    output = (tmp_path / "cli.out").read_text()
    assert code == 130, output
    assert "interrupted during start-up" in output
    assert still_alive(owned, 5) == []
    final = RunRecord.load(state_file(env, "lc-int"))
    assert final.state == "stopped" and final.error == "start-up interrupted"


# ---- 2. deployments are always found ------------------------------------------------------------


def test_orphans_are_found_and_stopped_by_identity_only(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """A record whose supervisor died with a worker still alive: status and stop find it without
    --name; stop ends the live worker, and leaves alone a process that only shares a recorded pid
    (another start time: a recycled pid)."""
    from tdist.launch.rundir import LaunchOptions, WorkerRecord, write_plan
    from tdist.plan import build_plan
    from tdist.spec import load_graph

    pause = [os.sys.executable, "-c", "import signal; signal.pause()"]
    orphan = subprocess.Popen(pause, start_new_session=True)
    stranger = subprocess.Popen(pause, start_new_session=True)
    dead = subprocess.Popen([os.sys.executable, "-c", "pass"])
    dead.wait()
    try:
        home = Path(env["TDIST_HOME"])
        run_dir = home / "runs" / "lc-orphan"
        (run_dir / "logs").mkdir(parents=True)
        write_plan(build_plan(load_graph(make_graph(tmp_path, "lc-orphan")), launcher="local", run_dir=str(run_dir)))
        orphan_rec = ProcessRecord.of(orphan.pid)
        stranger_rec = ProcessRecord.of(stranger.pid).model_copy(update={"start": ProcessRecord.of(stranger.pid).start - 1})
        rec = RunRecord(deployment="lc-orphan", run_dir=str(run_dir), plan_path=str(run_dir / "plan.json"),
                        options=LaunchOptions(), state="ready", supervisor=ProcessRecord(pid=dead.pid, start=1),
                        components=["w"], workers={
                            "w.0": WorkerRecord(name="w.0", component="w", process=orphan_rec, state="ready"),
                            "w.1": WorkerRecord(name="w.1", component="w", process=stranger_rec, state="ready")})
        rec.save()
        st = tdist(["status", "--json"], env)
        data = json.loads(st.stdout)
        assert st.returncode == 1 and (data["state"], data["alive"]) == ("degraded", ["w.0"]), st.stdout + st.stderr
        assert "1 of its processes still run unsupervised (w.0)" in data["orphaned"]
        stop = tdist(["stop"], env)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert orphan.wait(10) is not None  # ended (by its recorded identity)
        assert stranger.poll() is None, "a process whose start time differs from the record was signalled"
        assert RunRecord.load(run_dir / "state.json").state == "stopped"
    finally:
        for p in (orphan, stranger):
            if p.poll() is None:
                p.kill()
                p.wait(10)


# ---- 3. restarts that tell the truth ------------------------------------------------------------


def test_a_worker_that_keeps_crashing_is_failed_and_status_shows_its_log(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """restart_max_crashes 3: the kill is crash 1, two restarts that crash at start are 2 and 3 →
    `failed` (restarts 2), the deployment `degraded`, status shows why and the log tail."""
    crash_file = tmp_path / "crash-now"
    data = yaml.safe_load(make_graph(tmp_path, "lc-crash").read_text())
    data["python_path"].append(OPS)
    data["operators"] = [data["operators"][0], {"name": "echo", "kind": "python", "implementation": "lifecycle_ops:CrashWhenMarked",
                              "parameters": {"crash_file": str(crash_file)}}]
    data["workers"] = [{"name": "encoder", "operators": ["encoder"]}, {"name": "echo", "operators": ["echo"]}]
    data["launch"]["local"].update({"restart_max_crashes": 3, "restart_window_s": 120})
    graph = tmp_path / "lc-crash.yaml"
    graph.write_text(yaml.safe_dump(data, sort_keys=False))
    path = state_file(env, "lc-crash")
    dep = tdist(["deploy", str(graph), "--detach"], env)
    rec = load(path)
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        assert rec is not None and rec.state == "ready"
        crash_file.write_text("")
        os.kill(rec.workers["echo.0"].pid, signal.SIGKILL)
        rec = wait_for(lambda: (r := load(path)) is not None and r.workers["echo.0"].state == "failed" and r,
                       timeout_s=60, what="echo.0 to be failed")
        w = rec.workers["echo.0"]
        assert (rec.state, w.restarts, w.last_exit) == ("degraded", 2, 2), rec.model_dump_json(indent=1)
        assert "crashed 3 times within 120 s" in (w.error or "")
        assert rec.workers["encoder.0"].state == "ready"
        st = tdist(["status"], env)
        assert st.returncode == 1, st.stdout + st.stderr
        assert "worker echo.0 failed" in st.stderr and "told to crash" in st.stderr, st.stderr
        data = json.loads(tdist(["status", "--json"], env).stdout)
        assert data["state"] == "degraded" and "told to crash" in data["failed"]["echo.0"]["log_tail"]
        assert [w["state"] for w in data["components"]["echo"]["workers"]] == ["failed"]
        assert not w.process.alive()
    finally:
        stop = tdist(["stop", "--name", "lc-crash"], env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    final = RunRecord.load(path)
    assert final.state == "stopped" and final.workers["echo.0"].state == "failed"
    assert still_alive(recorded(final) + [final.supervisor], 10) == []


# ---- 5. etcd supervised -------------------------------------------------------------------------


def test_embedded_etcd_killed_is_restarted_and_discovery_survives(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("aetcd")
    graph = make_graph(tmp_path, "lc-etcd", discovery={"kind": "etcd", "etcd_endpoints": "embedded", "ttl_s": 3})
    path = state_file(env, "lc-etcd")
    dep = tdist(["deploy", str(graph), "--detach"], env)
    rec = load(path)
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        assert rec is not None and rec.discovery == "etcd" and rec.etcd.process is not None
        first = rec.etcd.process
        endpoints = list(rec.etcd.endpoints)
        os.kill(first.pid, signal.SIGKILL)
        rec = wait_for(lambda: (r := load(path)) is not None and r.etcd.restarts == 1 and r.etcd.process is not None
                       and r.etcd.process.alive() and r, timeout_s=60, what="the embedded etcd to be restarted")
        assert not first.alive() and rec.etcd.process.pid != first.pid
        assert rec.etcd.endpoints == endpoints and rec.etcd.last_exit == -signal.SIGKILL

        def all_ready() -> dict | None:
            st = tdist(["status", "--json"], env)
            data = json.loads(st.stdout) if st.stdout.strip() else {}
            workers = [w for c in data.get("components", {}).values() for w in c["workers"]]
            ok = st.returncode == 0 and len(workers) == 3 and all(w["state"] == "ready" for w in workers)
            return data if ok and data["state"] == "ready" else None

        wait_for(all_ready, timeout_s=60, what="every worker discoverable and the deployment ready after the restart")
        for i in range(3):
            inf = tdist(["infer", "--component", "encoder_decoder", "--input", f"input=[{i},2,3]"], env)
            assert inf.returncode == 0 and f"output: [{i}, 2, 3]" in inf.stdout, inf.stdout + inf.stderr
    finally:
        stop = tdist(["stop", "--name", "lc-etcd"], env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    final = RunRecord.load(path)
    assert final.state == "stopped"
    assert still_alive(recorded(final) + [final.supervisor, first], 10) == []


# ---- 6. crashed runs kept -----------------------------------------------------------------------


def test_redeploy_keeps_the_crashed_run_and_warns_about_its_live_processes(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """The previous run's record names a process still alive (by identity) and one that is gone:
    the new deploy moves the run aside, warns about the live one only, and signals nothing."""
    from tdist.launch.rundir import LaunchOptions, WorkerRecord

    survivor = subprocess.Popen([os.sys.executable, "-c", "import signal; signal.pause()"], start_new_session=True)
    gone = subprocess.Popen([os.sys.executable, "-c", "pass"])
    gone.wait()
    graph = make_graph(tmp_path, "lc-again")
    data = yaml.safe_load(graph.read_text())
    data["workers"] = data["workers"][:1]
    data["operators"] = data["operators"][:1]
    graph.write_text(yaml.safe_dump(data, sort_keys=False))
    old_dir = Path(env["TDIST_HOME"]) / "runs" / "lc-again"
    (old_dir / "logs").mkdir(parents=True)
    (old_dir / "logs" / "encoder.0.log").write_text("the crashed run's log\n")
    RunRecord(deployment="lc-again", run_dir=str(old_dir), plan_path=str(old_dir / "plan.json"), options=LaunchOptions(),
              state="failed", components=["encoder"], workers={
                  "encoder.0": WorkerRecord(name="encoder.0", component="encoder", process=ProcessRecord.of(survivor.pid)),
                  "encoder.1": WorkerRecord(name="encoder.1", component="encoder",
                                            process=ProcessRecord(pid=gone.pid, start=1))}).save()
    try:
        dep = tdist(["deploy", str(graph), "--detach"], env)
        assert dep.returncode == 0, dep.stdout + dep.stderr
        kept = list((Path(env["TDIST_HOME"]) / "runs" / ".previous" / "lc-again").iterdir())
        assert len(kept) == 1 and (kept[0] / "logs" / "encoder.0.log").read_text() == "the crashed run's log\n"
        warning = " ".join(dep.stderr.split())
        assert f"warning: 1 process(es) of the previous run of lc-again are still alive: encoder.0 (pid {survivor.pid})" \
            in warning, dep.stderr
        assert f"pid {gone.pid}" not in warning
        assert survivor.poll() is None  # warned about, never signalled
    finally:
        stop = tdist(["stop", "--name", "lc-again"], env)
        survivor.kill()
        survivor.wait(10)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    final = RunRecord.load(state_file(env, "lc-again"))
    assert final.state == "stopped" and still_alive(recorded(final) + [final.supervisor], 10) == []
