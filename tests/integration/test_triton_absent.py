"""With no Triton, `tdist deploy` of a Triton graph fails with an error naming what to install.

Simulated by pointing the binary lookup at nothing (TDIST_TRITONSERVER=/nonexistent); runs on
machines with or without Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_deploy_without_triton_names_the_install(tdist_home: Path) -> None:
    env = dict(os.environ, TDIST_HOME=str(tdist_home), COLUMNS="200", TDIST_TRITONSERVER="/nonexistent/tritonserver")
    env.pop("NATS_SERVER", None)
    graph = REPO / "graphs" / "hello_world.yaml"
    try:
        dep = subprocess.run(
            [sys.executable, "-m", "tdist", "deploy", str(graph), "--detach", "--name", "hwt-absent"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=180,
        )
        assert dep.returncode != 0
        assert "pip install 'tdist[triton]'" in dep.stderr and "nvidia-pytriton" in dep.stderr, dep.stderr
        assert "failed to start" in dep.stderr and "Traceback" not in dep.stderr
    finally:
        subprocess.run([sys.executable, "-m", "tdist", "stop"], env=env, cwd=REPO, capture_output=True, timeout=120)
