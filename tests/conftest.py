"""Shared fixtures: a real nats-server, and deployments run by the real local supervisor.

Everything binds to 127.0.0.1 on free ports, lives in tmp dirs, and is stopped afterwards.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

pytest_plugins = ["pytester", "tests.ci_skips"]

REPO = Path(__file__).resolve().parent.parent
HELLO_OPS = REPO / "examples" / "hello_world" / "operators"
TEST_OPS = Path(__file__).resolve().parent / "integration"


def _has_gpu() -> bool:
    try:
        import torch  # type: ignore

        return bool(torch.cuda.is_available())
    except Exception:
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """Keep each phase's report on the item (rep_setup / rep_call) so fixtures can react to a failure."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


#: Log lines that say nothing about a failure (vLLM's per-weight dtype notes, progress bars).
_NOISE = ("Attempted to load weight", "Loading safetensors checkpoint", "NUMA binding")


def print_log_tails(log_dir: Path, lines: int = 150) -> None:
    """The last lines of every log under log_dir (a failed test's deployment), to the captured output."""
    for log in sorted(Path(log_dir).rglob("*.log")):
        try:
            text = log.read_text(errors="replace").splitlines()
            tail = [ln for ln in text if ln.strip() and not any(n in ln for n in _NOISE)][-lines:]
        except OSError:
            continue
        print(f"===== {log} (last {len(tail)} lines) =====")
        print("\n".join(tail))


def print_logs_if_failed(request: Any, fixture: str) -> None:
    """After a test: if it failed and uses `fixture` (a deployment dict with "home"), print the
    log tails of that deployment."""
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and fixture in request.fixturenames:
        try:  # a module-scoped deployment is still up here; a function-scoped one is gone
            home = request.getfixturevalue(fixture)["home"]
        except Exception as exc:
            print(f"(no deployment logs: {exc})")
            return
        print_log_tails(home)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real nats-server (JetStream) for the session; tests isolate by deployment name."""
    from tdist.launch.nats import start_nats

    server = start_nats(work_dir=str(tmp_path_factory.mktemp("nats")))
    yield server
    server.stop()


@pytest.fixture
def tdist_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private TDIST_HOME so run directories of tests never mix with a user's."""
    home = tmp_path / "tdist-home"
    monkeypatch.setenv("TDIST_HOME", str(home))
    return home


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def worker_config(deployment: str, component: str, operators: list[dict[str, Any]], *, replica: int = 0,
                  request_plane: dict[str, Any] | None = None, data_plane: dict[str, Any] | None = None,
                  discovery: dict[str, Any] | None = None) -> Any:
    """A WorkerConfig for tests (PYTHONPATH covers the hello-world and test operators)."""
    from tdist.runtime.config import WorkerConfig

    return WorkerConfig.model_validate({
        "name": f"{component}.{replica}",
        "component": component,
        "replica": replica,
        "deployment": deployment,
        "operators": operators,
        "request_plane": request_plane or {},
        "data_plane": data_plane or {"kind": "inline"},
        "discovery": discovery or {},
        "env": {"PYTHONPATH": os.pathsep.join([str(HELLO_OPS), str(TEST_OPS)])},
        "metrics_port": 0,
    })


class Deployment:
    """A running LocalSupervisor plus a connected RequestClient."""

    def __init__(self, sup: Any, client: Any, task: Any) -> None:
        self.sup = sup
        self.client = client
        self._task = task

    @property
    def name(self) -> str:
        return self.sup.deployment

    def pid_of(self, worker: str) -> int:
        return self.sup.state.workers[worker].pid


@pytest.fixture
async def deploy(nats_server: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """`dep = await deploy(workers, name=...)`: start workers under the real supervisor; all stopped after."""
    import asyncio

    from tdist.launch.local import LocalSupervisor
    from tdist.runtime.planes.request import RequestClient

    running: list[tuple[Any, Any, asyncio.Event, Any]] = []

    async def start(workers: list[Any], *, name: str | None = None, nats_url: str | None = None, **kw: Any) -> Deployment:
        dep_name = name or workers[0].deployment
        sup = LocalSupervisor(deployment=dep_name, workers=workers, run_dir=tmp_path / dep_name,
                              nats_url=nats_url or nats_server.url, startup_timeout_s=60, **kw)
        await sup.start()
        stop = asyncio.Event()
        task = asyncio.create_task(sup.supervise(stop))
        client = await RequestClient.connect(sup.nats_url, dep_name, discovery=workers[0].discovery,
                                             data_plane=workers[0].data_plane)
        running.append((sup, client, stop, task))
        return Deployment(sup, client, task)

    yield start
    for sup, client, stop, task in reversed(running):
        await client.close()
        stop.set()
        await task
        await sup.stop()
