"""What a request is, on both sides of the request plane: `Request` (as an operator sees it),
`Response`, the task-local current request and client, and `Caller`, what a client must offer.

Its own module because the operator API (operator.py), the client (planes/request.py) and the
serving side (serve.py) all need these types, and none of them may import another for them:
operator.py would need planes/request.py for the client's type, and planes/request.py needs
operator.py for Response, which made a ring.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol


@dataclass
class Response:
    """One response of a request: partial (`final=False`) or the last one."""

    request_id: str
    outputs: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    final: bool = False
    worker: str | None = None  # instance name that produced it


SendFn = Callable[[Response], Awaitable[None]]


class Caller(Protocol):
    """What RemoteOperator and the built-in operators use of a request client (RequestClient)."""

    def infer(
        self,
        operator: str,
        *,
        inputs: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        instance: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Response]:
        """Send one request; yield its responses (partials, then the final). Errors raise typed."""


class Request:
    """A request as an operator sees it."""

    def __init__(
        self,
        *,
        id: str,
        operator: str,
        inputs: dict[str, Any],
        parameters: dict[str, Any],
        deadline: float,
        send: SendFn,
        worker: str | None = None,
        attempt: int = 1,
    ) -> None:
        self.id = id
        self.operator = operator
        self.inputs = inputs
        self.parameters = parameters
        self.deadline = deadline  # absolute, time.time() seconds
        self.worker = worker
        self.attempt = attempt
        self._send = send
        self.final_sent = False

    @property
    def time_left_s(self) -> float:
        return self.deadline - time.time()

    async def send(
        self,
        outputs: dict[str, Any] | None = None,
        *,
        parameters: dict[str, Any] | None = None,
        final: bool = False,
    ) -> None:
        """Send a partial (or, with final=True, the last) response. Nothing may follow a final."""
        if self.final_sent:
            raise RuntimeError(f"request {self.id}: a final response was already sent")
        if final:
            self.final_sent = True
        await self._send(
            Response(
                request_id=self.id,
                outputs=dict(outputs or {}),
                parameters=dict(parameters or {}),
                final=final,
                worker=self.worker,
            )
        )


#: The request being handled in this task; RemoteOperator calls inherit its deadline and id.
current_request: contextvars.ContextVar["Request | None"] = contextvars.ContextVar("tdist_current_request", default=None)
#: The request client of this process (set by the worker); RemoteOperator uses it by default.
current_client: contextvars.ContextVar["Caller | None"] = contextvars.ContextVar("tdist_current_client", default=None)
