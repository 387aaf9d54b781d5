"""The operator API: what a user (or a built-in) implements, and how one operator calls another.

An operator is a class with `async execute(request)`. It reads `request.inputs` (name → numpy
array) and `request.parameters` (JSON-able dict), and answers with any number of
`await request.send(outputs, parameters=...)` partial responses and exactly one final
(`final=True`). Returning without a final sends an empty final; raising sends a typed
`OperatorError` to the caller. Cancellation (deadline passed, caller cancelled) arrives as
`asyncio.CancelledError` inside `execute`, and fans out to every `RemoteOperator` call it made.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np

from tdist.runtime.calls import Caller, Request, Response, SendFn, current_client, current_request
from tdist.runtime.config import OperatorConfig, WorkerConfig

__all__ = [
    "Caller", "Operator", "OperatorContext", "RemoteOperator", "Request", "Response", "SendFn",
    "current_client", "current_request",
]


@dataclass
class OperatorContext:
    """What an operator gets at construction: its config, its worker, a logger, and a way to call others."""

    config: OperatorConfig
    worker: WorkerConfig
    logger: logging.Logger
    client: "Caller | None" = None
    #: The worker's Prometheus registry (served on its metrics port): operators add their metrics here.
    metrics_registry: Any = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def parameters(self) -> dict[str, Any]:
        return self.config.parameters

    def remote(self, name: str, *, instance: str | None = None) -> "RemoteOperator":
        return RemoteOperator(name, instance=instance, client=self.client)


class Operator:
    """Base class of every operator. Override `execute`; `start`/`stop` are optional hooks."""

    def __init__(self, context: OperatorContext) -> None:
        self.context = context
        self.name = context.name
        self.parameters = context.parameters
        self.logger = context.logger

    async def start(self) -> None:
        """Load models, start engines. The worker reports ready only after every start returned."""

    async def execute(self, request: Request) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def stop(self) -> None:
        """Release what start() took. Called on drain, after in-flight requests finished."""

    def stats(self) -> dict[str, Any]:
        """Extra figures for this operator's discovery entry and `tdist status` (e.g. KV-cache use)."""
        return {}


class RemoteOperator:
    """Call an operator of the deployment, from anywhere (inside an operator or a plain script).

    Inside an operator, calls inherit the current request's deadline and are cancelled with it.
    """

    def __init__(self, name: str, *, instance: str | None = None, client: "Caller | None" = None) -> None:
        self.name = name
        self.instance = instance
        self._client = client

    def _resolve_client(self) -> Caller:
        client = self._client or current_client.get()
        if client is None:
            raise RuntimeError(
                "RemoteOperator has no request client: pass client=RequestClient(...) or call it inside a worker"
            )
        return client

    def async_infer(
        self,
        inputs: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        instance: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Response]:
        """Send one request; iterate its responses (partials, then the final). Errors raise typed."""
        inputs = {k: (v if not isinstance(v, (list, tuple, int, float)) else np.asarray(v)) for k, v in (inputs or {}).items()}
        return self._resolve_client().infer(
            self.name,
            inputs=inputs,
            parameters=dict(parameters or {}),
            timeout_s=timeout_s,
            instance=instance or self.instance,
            request_id=request_id,
        )

    async def infer(self, inputs: dict[str, Any] | None = None, parameters: dict[str, Any] | None = None, **kw: Any) -> Response:
        """Convenience: the final response only (partials are dropped)."""
        last: Response | None = None
        async for r in self.async_infer(inputs, parameters, **kw):
            last = r
        assert last is not None and last.final
        return last
