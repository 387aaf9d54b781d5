"""The run record tells the truth about a running deployment (ARCHITECTURE's state words).

Under `--no-restart`, a worker killed with SIGKILL stays `failed` in the record and the deployment
becomes `degraded` (it was `ready`); `tdist status --json` reports the same state; `tdist stop`
still leaves nothing behind and the record ends `stopped`. Bounded waits on the record, no sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tdist.launch.rundir import RunRecord
from tests.integration.test_mpirun_deploy import env  # noqa: F401 - TDIST_HOME in tmp, no NATS_SERVER
from tests.integration.test_mpirun_deploy import make_graph, tdist, wait_dead

pytestmark = pytest.mark.timeout(180)


def wait_record(path: Path, ok, timeout_s: float = 30) -> RunRecord:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    rec = RunRecord.load(path)
    while not ok(rec) and time.monotonic() < deadline:
        time.sleep(0.05)
        rec = RunRecord.load(path)
    return rec


def test_a_worker_that_stays_dead_makes_the_deployment_degraded(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    graph = make_graph(tmp_path, "st-degraded")
    state_file = Path(env["TDIST_HOME"]) / "runs" / "st-degraded" / "state.json"
    dep = tdist(["deploy", str(graph), "--detach", "--no-restart"], env)
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr
        rec = RunRecord.load(state_file)
        assert rec.state == "ready" and rec.options.restart is False and rec.options.detach is True
        assert {w.state for w in rec.workers.values()} == {"ready"}
        victim = rec.workers["decoder.0"].process
        assert victim is not None and victim.alive()
        os.kill(victim.pid, signal.SIGKILL)
        rec = wait_record(state_file, lambda r: r.state == "degraded")
        assert rec.state == "degraded", rec.model_dump_json(indent=1)
        assert rec.workers["decoder.0"].state == "failed" and rec.workers["decoder.0"].last_exit == -signal.SIGKILL
        assert rec.workers["decoder.0"].restarts == 0
        assert {rec.workers[n].state for n in ("encoder.0", "encoder_decoder.0")} == {"ready"}
        st = tdist(["status", "--json"], env)
        assert json.loads(st.stdout)["state"] == "degraded"
    finally:
        stop = tdist(["stop"], env, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    final = RunRecord.load(state_file)
    assert final.state == "stopped"
    procs = [w.process for w in final.workers.values()] + [final.nats.process, final.supervisor]
    assert wait_dead([p.pid for p in procs if p is not None]) == []
