"""The in-process `tritonserver` Python API (NGC images: Python 3.12 + libtritonserver).

Same engine interface as TritonProcessEngine (server.py). Used only where `import tritonserver`
works and a server starts; on these development machines the PyPI wheel has no
libtritonserver and needs glibc ≥ 2.39, so this path is exercised in NGC containers only
(the unit tests cover the selection logic with a fake module).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tdist.errors import BadRequest, OperatorError

log = logging.getLogger("tdist.triton")


def import_tritonserver() -> Any:
    """The module, or raise ImportError/OSError (caller falls back to a server process)."""
    import tritonserver  # type: ignore[import-not-found]

    if not hasattr(tritonserver, "Server"):
        raise ImportError("tritonserver has no Server (not Triton's in-process API)")
    return tritonserver


class TritonInProcessEngine:
    mode = "in_process"

    def __init__(self, workdir: Path, log_path: Path, module: Any = None, backend_dir: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.repository = self.workdir / "models"
        self.log_path = Path(log_path)
        self._ts = module
        self._backend_dir = backend_dir
        self.server: Any = None
        self.models: dict[str, Any] = {}

    @property
    def metrics_url(self) -> str | None:
        return None

    def metrics_text(self) -> str | None:
        return self.server.metrics() if self.server is not None else None

    async def start(self, timeout_s: float = 120.0) -> None:
        ts = self._ts or import_tritonserver()
        self._ts = ts
        self.repository.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {
            "model_repository": str(self.repository),
            "model_control_mode": ts.ModelControlMode.EXPLICIT,
            "log_file": str(self.log_path),
            "log_info": True,
        }
        if self._backend_dir:
            kwargs["backend_directory"] = self._backend_dir
        self.server = ts.Server(**kwargs)
        await asyncio.wait_for(asyncio.to_thread(self.server.start, wait_until_ready=True), timeout_s)

    async def load(self, name: str) -> None:
        self.models[name] = await asyncio.to_thread(self.server.load, name)

    async def unload(self, name: str) -> None:
        self.models.pop(name, None)
        try:
            await asyncio.to_thread(self.server.unload, name)
        except Exception as exc:
            log.debug("unload %s: %s", name, exc)

    async def config(self, name: str) -> dict[str, Any]:
        return dict(self.models[name].config())

    async def metadata(self, name: str) -> dict[str, Any]:
        md = dict(self.models[name].metadata())
        for io in list(md.get("inputs", [])) + list(md.get("outputs", [])):
            io["shape"] = [int(s) for s in io.get("shape", [])]
        return md

    async def is_ready(self, name: str) -> bool:
        model = self.models.get(name)
        return bool(model is not None and model.ready())

    async def infer(
        self, name: str, inputs: dict[str, np.ndarray], datatypes: dict[str, str], outputs: list[str], timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        model = self.models[name]
        result: dict[str, np.ndarray] = {}
        try:
            timeout_us = int(max(timeout_s, 0.001) * 1e6) if timeout_s is not None else 0
            async for response in model.async_infer(inputs=inputs, timeout=timeout_us):
                if getattr(response, "error", None) is not None:
                    raise response.error
                for key, tensor in (response.outputs or {}).items():
                    if outputs and key not in outputs:
                        continue
                    if str(getattr(tensor, "data_type", "")).endswith("BYTES"):
                        result[key] = tensor.to_bytes_array()
                    else:
                        result[key] = np.from_dlpack(tensor)
        except (BadRequest, OperatorError):
            raise
        except Exception as exc:
            if type(exc).__name__ in ("InvalidArgumentError",):
                raise BadRequest(str(exc), operator=name) from None
            raise OperatorError(f"Triton inference failed: {type(exc).__name__}: {exc}", operator=name) from None
        return result

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "log": str(self.log_path)}

    async def stop(self, timeout_s: float = 15.0) -> None:
        server, self.server = self.server, None
        if server is not None:
            await asyncio.to_thread(server.stop)
