"""Lifecycle figures for docs/reliability.md, on real processes (hello_world_python), 3 runs each.

Not a test (no assertions on time): how long orphans live after their owner is SIGKILLed, how
long a Ctrl-C during start-up takes, how long an etcd restart takes. Usage, from the repository:
    PYTHONPATH=. python tests/integration/measure_lifecycle.py
"""
import json, os, signal, subprocess, sys, tempfile, time
from pathlib import Path
from tests.integration.test_lifecycle import slow_graph, recorded, load
from tests.integration.test_mpirun_deploy import make_graph, TDIST, REPO
from tdist.launch.rundir import RunRecord, ProcessRecord

def gone_after(procs, t0, limit=30):
    while time.monotonic() - t0 < limit:
        if not any(p.alive() for p in procs):
            return time.monotonic() - t0
        time.sleep(0.005)
    return float("nan")

def run(args, env, **kw):
    return subprocess.run(TDIST + args, env=env, cwd=REPO, capture_output=True, text=True, **kw)

tmp = Path(tempfile.mkdtemp())
env = dict(os.environ, TDIST_HOME=str(tmp / "home")); env.pop("NATS_SERVER", None)
res = {"supervisor_kill": [], "cli_kill": [], "sigint_startup": [], "etcd_restart": []}
for i in range(3):
    g = make_graph(tmp, f"m-sup{i}")
    assert run(["deploy", str(g), "--detach"], env).returncode == 0
    rec = RunRecord.load(tmp / "home/runs" / f"m-sup{i}/state.json"); owned = recorded(rec)
    t0 = time.monotonic(); os.kill(rec.supervisor.pid, signal.SIGKILL)
    res["supervisor_kill"].append(gone_after(owned, t0)); run(["stop", "--name", f"m-sup{i}"], env)

    g = make_graph(tmp, f"m-fg{i}")
    cli = subprocess.Popen(TDIST + ["deploy", str(g)], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sf = tmp / "home/runs" / f"m-fg{i}/state.json"
    while not ((r := load(sf)) and r.state == "ready"): time.sleep(0.02)
    owned = recorded(r); t0 = time.monotonic(); cli.kill(); cli.wait()
    res["cli_kill"].append(gone_after(owned, t0))

    g, started = slow_graph(tmp, f"m-int{i}")
    cli = subprocess.Popen(TDIST + ["deploy", str(g)], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sf = tmp / "home/runs" / f"m-int{i}/state.json"
    while not (started.exists() and started.read_text() and (r := load(sf)) and all(w.process for w in r.workers.values())): time.sleep(0.02)
    owned = recorded(r) + [ProcessRecord.of(int(started.read_text()))]
    t0 = time.monotonic(); cli.send_signal(signal.SIGINT); cli.wait()
    res["sigint_startup"].append((round(time.monotonic() - t0, 3), round(gone_after(owned, t0), 3)))

    g = make_graph(tmp, f"m-etcd{i}", discovery={"kind": "etcd", "etcd_endpoints": "embedded", "ttl_s": 3})
    assert run(["deploy", str(g), "--detach"], env).returncode == 0
    sf = tmp / "home/runs" / f"m-etcd{i}/state.json"; r = load(sf)
    t0 = time.monotonic(); os.kill(r.etcd.process.pid, signal.SIGKILL)
    while not ((r := load(sf)) and r.etcd.restarts == 1): time.sleep(0.01)
    t1 = time.monotonic() - t0
    ok = run(["infer", "--component", "encoder_decoder", "--input", "input=[1,2,3]"], env).returncode == 0
    res["etcd_restart"].append((round(t1, 3), ok)); run(["stop", "--name", f"m-etcd{i}"], env)
print(json.dumps({k: [round(x, 3) if isinstance(x, float) else x for x in v] for k, v in res.items()}, indent=1))
