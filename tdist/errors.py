"""Typed errors for every layer of tdist.

Imports nothing of tdist, so any module may raise these. The CLI is the only place that turns
them into text and exit codes; everywhere else they travel as data (a request error even
crosses the wire: see `RequestError.to_wire` / `RequestError.from_wire`).
"""

from __future__ import annotations

from typing import Any


class TdistError(Exception):
    """Base of all errors tdist raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def render(self) -> str:
        """The text a person reads (the CLI prints it; no traceback unless --debug)."""
        return str(self)


class SpecError(TdistError):
    """The graph YAML is wrong: where (`workers[1].operator`), what was found, the rule, the fix."""

    exit_code = 2

    def __init__(
        self,
        yaml_path: str,
        got: Any,
        rule: str,
        hint: str | None = None,
        *,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.yaml_path = yaml_path
        self.got = got
        self.rule = rule
        self.hint = hint
        self.file = file
        self.line = line
        self.column = column
        super().__init__(self.render())

    def render(self) -> str:
        where = self.file or "<graph>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: {self.yaml_path or '<root>'}: {self.rule} (got {self.got!r})"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class SpecErrors(TdistError):
    """Several SpecErrors found in one pass, reported together so the user fixes them at once."""

    exit_code = 2

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = list(errors)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(e.render() for e in self.errors)


class PlanError(TdistError):
    """The spec is valid but cannot be turned into a plan (e.g. a launcher lacks what it needs)."""

    exit_code = 2


class InvalidName(TdistError):
    """A name given on the command line (`--name`) breaks the name rule; says what to use instead."""

    exit_code = 2

    def __init__(self, where: str, got: str, rule: str, hint: str) -> None:
        self.where, self.got, self.rule, self.hint = where, got, rule, hint
        super().__init__(self.render())

    def render(self) -> str:
        return f"{self.where}: {self.rule} (got {self.got!r})\n  fix: {self.hint}"


class LaunchError(TdistError):
    """Starting processes failed. `log_tail` carries the last lines of what failed."""

    exit_code = 3

    def __init__(self, message: str, *, log_tail: str | None = None, log_path: str | None = None) -> None:
        self.message = message
        self.log_tail = log_tail
        self.log_path = log_path
        super().__init__(self.render())

    def render(self) -> str:
        text = self.message
        if self.log_path:
            text += f"\n  log: {self.log_path}"
        if self.log_tail:
            text += "\n  last lines:\n" + "\n".join("    " + ln for ln in self.log_tail.splitlines())
        return text


class OperatorLoadError(TdistError):
    """An operator's implementation could not be imported or constructed; says what to fix."""

    exit_code = 2


class DeploymentNotFound(TdistError):
    """`status`/`infer`/`stop` found no running deployment."""

    exit_code = 4


class RequestError(TdistError):
    """A request ended in error. Travels over the wire as {kind, message, operator, request_id, detail}.

    Subclasses are picked by `kind`, so a caller can `except RequestTimeout:` whatever hop failed.
    """

    kind = "request_error"
    exit_code = 5

    def __init__(
        self,
        message: str,
        *,
        operator: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.message = message
        self.operator = operator
        self.request_id = request_id
        self.detail = dict(detail or {})
        super().__init__(self.render())

    def render(self) -> str:
        where = f" [{self.operator}]" if self.operator else ""
        return f"{self.kind}{where}: {self.message}"

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "operator": self.operator,
            "request_id": self.request_id,
            "detail": self.detail,
        }

    @staticmethod
    def from_wire(data: dict[str, Any]) -> "RequestError":
        cls = _REQUEST_ERRORS.get(str(data.get("kind")), RequestError)
        return cls(
            str(data.get("message", "")),
            operator=data.get("operator"),
            request_id=data.get("request_id"),
            detail=data.get("detail") or {},
        )


class OperatorError(RequestError):
    """The operator raised while handling the request (detail carries the exception type)."""

    kind = "operator_error"


class NoWorkerError(RequestError):
    """No ready worker hosts the operator (or the directed instance)."""

    kind = "no_worker"


class RequestTimeout(RequestError):
    """The request's deadline passed before its final response."""

    kind = "timeout"


class RequestCancelled(RequestError):
    """The request was cancelled by its caller (or its parent request)."""

    kind = "cancelled"


class PayloadTooLarge(RequestError):
    """A message exceeded the request plane's max payload."""

    kind = "payload_too_large"


class WorkerLost(RequestError):
    """The worker died after streaming part of the answer; it cannot be replayed safely."""

    kind = "worker_lost"


class BadRequest(RequestError):
    """The request itself is malformed (missing input, wrong dtype, bad parameter)."""

    kind = "bad_request"


class DataPlaneError(RequestError):
    """A tensor reference could not be resolved: unknown, released, expired, or producer gone."""

    kind = "data_plane"


class Overloaded(RequestError):
    """The deployment's work queue is full (its stream refused the request): retry later."""

    kind = "overloaded"


class RequestPlaneDown(RequestError):
    """The request plane cannot take the request: NATS unreachable, or the deployment's stream is
    missing, so nothing stored it. Never accepted, so never run: safe to retry."""

    kind = "request_plane_down"


_REQUEST_ERRORS: dict[str, type[RequestError]] = {
    c.kind: c
    for c in (
        RequestError,
        OperatorError,
        NoWorkerError,
        RequestTimeout,
        RequestCancelled,
        PayloadTooLarge,
        WorkerLost,
        BadRequest,
        DataPlaneError,
        Overloaded,
        RequestPlaneDown,
    )
}
