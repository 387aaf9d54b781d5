"""`tdist deploy graphs/hello_world.yaml` → `tdist infer` → `status` → `stop`, through the CLI.

The graph is copied as is, except the KServe frontend's fixed ports (8000/8001) become 0 and
relative paths become absolute (the copy lives in a temp dir). Checks: encoder and decoder run as
real Triton models, the round trip, the YAML's instance_group count as Triton reports it (in
`tdist status`), Triton's metrics on the worker's metrics port, KServe on the bound ports, and
no tritonserver left after `tdist stop`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

try:
    from tdist.operators.triton.install import locate_triton

    locate_triton()
    _missing = None
except Exception as exc:  # pragma: no cover - depends on the machine
    _missing = str(exc)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing is not None, reason=f"Triton unavailable: {_missing}")]

TDIST = [sys.executable, "-m", "tdist"]
GRAPH = REPO / "graphs" / "hello_world.yaml"


def run(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(TDIST + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def graph_copy(tmp_path: Path) -> Path:
    spec = yaml.safe_load(GRAPH.read_text())
    base = GRAPH.parent
    spec["python_path"] = [str((base / p).resolve()) for p in spec.get("python_path", [])]
    for op in spec["operators"]:
        if op.get("repository"):
            op["repository"] = str((base / op["repository"]).resolve())
        if op["kind"] == "frontend":
            op["port"] = 0
            op.setdefault("parameters", {})["grpc_port"] = 0
    out = tmp_path / "hello_world.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def test_deploy_hello_world_triton_cli(tdist_home: Path, tmp_path: Path) -> None:
    env = dict(os.environ, TDIST_HOME=str(tdist_home), COLUMNS="200")
    env.pop("NATS_SERVER", None)
    dep = run(["deploy", str(graph_copy(tmp_path)), "--detach", "--name", "hwt-cli"], env)
    triton_pids: list[int] = []
    try:
        assert dep.returncode == 0, dep.stdout + dep.stderr

        inf = run(["infer", "--component", "encoder_decoder", "--input", "input=[1,2,3]"], env)
        assert inf.returncode == 0, inf.stderr
        assert "output: [1, 2, 3]" in inf.stdout
        enc = run(["infer", "--component", "encoder", "--input", "input=[1,2,3]"], env)
        assert enc.returncode == 0 and "output: [-2, -3, -4, -2, -3, -4]" in enc.stdout, enc.stdout + enc.stderr

        st = run(["status", "--json"], env)
        assert st.returncode == 0, st.stderr
        comps = json.loads(st.stdout)["components"]
        stats = {}
        for comp in ("encoder", "decoder"):
            w = comps[comp]["workers"][0]
            stats[comp] = w["operators"][comp]["stats"]
            assert stats[comp]["triton"]["mode"] == "process"
            triton_pids.append(stats[comp]["triton"]["pid"])
        # the YAML's instance_group counts (2 and 1), as Triton reports them in the model config
        assert [g["count"] for g in stats["encoder"]["model_config"]["instance_group"]] == [2]
        assert [g["count"] for g in stats["decoder"]["model_config"]["instance_group"]] == [1]
        assert stats["encoder"]["model_config"]["parameters"]["input_copies"]["string_value"] == "2"
        # Triton's log beside the worker's
        assert Path(stats["encoder"]["triton"]["log"]).name == "encoder.0.triton.log"

        # Triton's own metrics on the worker's metrics port
        port = comps["encoder"]["workers"][0]["metrics_port"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'nv_inference_request_success{model="encoder",version="1"}' in text
        assert "tdist_requests_total" in text

        # the KServe frontend, on the ports it bound (reported in status)
        fe = comps["kserve"]["workers"][0]["operators"]["kserve"]["stats"]
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        x = np.array([4, 5, 6, 7], dtype=np.int64)
        for client, mod in (
            (httpclient.InferenceServerClient(f"127.0.0.1:{fe['http_port']}"), httpclient),
            (grpcclient.InferenceServerClient(f"127.0.0.1:{fe['grpc_port']}"), grpcclient),
        ):
            inp = mod.InferInput("input", [4], "INT64")
            inp.set_data_from_numpy(x)
            assert client.infer("encoder_decoder", [inp]).as_numpy("output").tolist() == x.tolist()
    finally:
        stop = run(["stop"], env)
    assert stop.returncode == 0, stop.stderr
    assert triton_pids and not [p for p in triton_pids if alive(p)], "tritonserver left behind"
