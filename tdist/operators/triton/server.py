"""A real `tritonserver` process per worker, driven through tritonclient's asyncio gRPC client.

Started on loopback with free ports (HTTP, gRPC, metrics) in explicit model-control mode:
each TritonCoreOperator of the worker writes its model into the worker's overlay repository
and loads it. Readiness is Triton's own `ServerReady` over gRPC under a timeout (never a
sleep); an early exit raises with the last lines of Triton's log. The process gets its own
process group and PR_SET_PDEATHSIG, so it dies with its worker even on SIGKILL.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from tdist.errors import BadRequest, LaunchError, OperatorError
from tdist.operators.triton.install import TritonInstall
from tdist.runtime.ports import free_ports

log = logging.getLogger("tdist.triton")

READY_TIMEOUT_S = 120.0


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def shape_list(shape: Any) -> list[int]:
    return [int(s) for s in shape]


class TritonProcessEngine:
    """One tritonserver process + an asyncio gRPC client to it."""

    mode = "process"

    def __init__(self, install: TritonInstall, workdir: Path, log_path: Path, host: str = "127.0.0.1") -> None:
        self.install = install
        self.workdir = Path(workdir)
        self.repository = self.workdir / "models"
        self.backend_dir = self.workdir / "backends"
        self.log_path = Path(log_path)
        self.host = host
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Any = None
        self._log_file: Any = None

    @property
    def metrics_url(self) -> str | None:
        return f"http://{self.host}:{self.ports['metrics']}/metrics" if "metrics" in self.ports else None

    def argv(self) -> list[str]:
        p = self.ports
        return [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.backend_dir}",
            "--model-control-mode=explicit",
            f"--http-address={self.host}",
            f"--http-port={p['http']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={p['grpc']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={p['metrics']}",
            "--allow-cpu-metrics=true",
            "--exit-timeout-secs=10",
            "--strict-readiness=false",
        ]

    async def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.repository.mkdir(parents=True, exist_ok=True)
        self.install.make_backend_dir(self.backend_dir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(("http", "grpc", "metrics"), free_ports(3, self.host)))
        self._log_file = open(self.log_path, "ab")
        argv = self.argv()
        log.info("starting Triton server process: %s (log %s)", " ".join(argv), self.log_path)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.install.environment(),
            cwd=str(self.workdir),
            preexec_fn=_child_setup,
        )
        self.client = grpcclient.InferenceServerClient(f"{self.host}:{self.ports['grpc']}")
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                await self.stop()
                raise LaunchError(
                    f"tritonserver exited with code {code} before it was ready",
                    log_tail=log_tail(self.log_path),
                    log_path=str(self.log_path),
                )
            try:
                if await self.client.is_server_ready(client_timeout=1.0):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                await self.stop()
                raise LaunchError(
                    f"tritonserver not ready within {timeout_s:g} s",
                    log_tail=log_tail(self.log_path),
                    log_path=str(self.log_path),
                )
            await asyncio.sleep(0.05)
        log.info("Triton server process ready: pid %s, ports %s", self.proc.pid, self.ports)

    async def load(self, name: str) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            await self.client.load_model(name)
        except InferenceServerException as exc:
            raise LaunchError(
                f"Triton failed to load model {name!r}: {exc.message()}",
                log_tail=log_tail(self.log_path),
                log_path=str(self.log_path),
            ) from None

    async def unload(self, name: str) -> None:
        try:
            await self.client.unload_model(name)
        except Exception as exc:  # the server may already be going away
            log.debug("unload %s: %s", name, exc)

    async def config(self, name: str) -> dict[str, Any]:
        return dict((await self.client.get_model_config(name, as_json=True))["config"])

    async def metadata(self, name: str) -> dict[str, Any]:
        md = await self.client.get_model_metadata(name, as_json=True)
        for io in list(md.get("inputs", [])) + list(md.get("outputs", [])):
            io["shape"] = shape_list(io.get("shape", []))
        return dict(md)

    async def is_ready(self, name: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(name))
        except Exception:
            return False

    async def infer(
        self, name: str, inputs: dict[str, np.ndarray], datatypes: dict[str, str], outputs: list[str], timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        infer_inputs = []
        for key, arr in inputs.items():
            ii = grpcclient.InferInput(key, list(arr.shape), datatypes[key])
            ii.set_data_from_numpy(arr)
            infer_inputs.append(ii)
        requested = [grpcclient.InferRequestedOutput(o) for o in outputs]
        try:
            result = await self.client.infer(
                name,
                infer_inputs,
                outputs=requested,
                client_timeout=max(timeout_s, 0.001) if timeout_s is not None else None,
            )
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if "INVALID_ARG" in status:
                raise BadRequest(exc.message() or str(exc), operator=name) from None
            raise OperatorError(
                f"Triton inference failed: {exc.message() or exc}", operator=name, detail={"triton_status": status}
            ) from None
        return {o: result.as_numpy(o) for o in outputs}

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "pid": self.proc.pid if self.proc else None,
            "ports": dict(self.ports),
            "log": str(self.log_path),
            "binary": str(self.install.binary),
        }

    async def stop(self, timeout_s: float = 15.0) -> None:
        if self.client is not None:
            try:
                await self.client.close()
            except Exception:
                pass
            self.client = None
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                log.warning("tritonserver pid %s did not exit in %g s; killing it", proc.pid, timeout_s)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await asyncio.to_thread(proc.wait)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
