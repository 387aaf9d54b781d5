"""What every HTTP frontend checks before it trusts a client: body size, Content-Type, JSON,
request parameters, deadlines and CORS.

Shared by the OpenAI and KServe frontends so both refuse hostile input the same way and
early: a body over the limit is refused from its Content-Length before a byte of it is read,
and a chunked one as soon as the limit is passed (never buffered whole); JSON `Infinity`/`NaN`
and nesting deep enough to exhaust the parser's recursion are client errors, not crashes;
parameters the deployment uses internally (the router's and engines' own fields) never come
from a client. Pure where it can be, so the fuzz tests drive it directly. Settings come from
the frontend's parameters (tdist/spec/operators.py: FrontendParameters); docs/security.md lists
them.
"""

from __future__ import annotations

import hmac
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

MiB = 1 << 20
DEFAULT_MAX_BODY_BYTES = {"kserve": 64 * MiB, "openai": 4 * MiB}

#: Request parameters the deployment sets for itself: the disaggregated flow's KV handle and
#: decision, the router's notes. A client never sets them (deadlines come through max_deadline_s).
INTERNAL_PARAMETERS = frozenset({"kv_transfer_params", "disagg", "tdist_context_worker", "routed_to"})
INTERNAL_PREFIXES = ("tdist_", "_")


def is_internal(name: str) -> bool:
    return name in INTERNAL_PARAMETERS or name.startswith(INTERNAL_PREFIXES)


class ClientError(Exception):
    """A client mistake: HTTP status (400, 404, 413, 415), message, the offending parameter."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def too_large(size: int | None, limit: int) -> ClientError:
    got = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return ClientError(413, f"request body is {got}; this frontend accepts at most {limit} bytes (max_body_bytes)")


@dataclass(frozen=True)
class FrontendLimits:
    """The guard settings of one frontend, read from its parameters dict."""

    max_body_bytes: int
    max_deadline_s: float
    allowed_parameters: frozenset[str] | None = None  # None: any name that is not internal
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    max_concurrent_requests: int | None = None  # None: no limit

    @classmethod
    def of(cls, parameters: dict[str, Any], protocol: str, *, request_timeout_s: float) -> "FrontendLimits":
        """Read and check the settings (a ValueError names the bad one)."""
        body = int(parameters.get("max_body_bytes") or DEFAULT_MAX_BODY_BYTES[protocol])
        if body < 1:
            raise ValueError(f"max_body_bytes must be positive (got {body})")
        deadline = float(parameters.get("max_deadline_s") or request_timeout_s)
        if not math.isfinite(deadline) or deadline <= 0:
            raise ValueError(f"max_deadline_s must be a positive number of seconds (got {deadline})")
        allowed = parameters.get("allowed_parameters")
        if allowed is not None:
            names = [str(a) for a in allowed]
            internal = sorted(n for n in names if is_internal(n))
            if internal:
                raise ValueError(f"allowed_parameters names internal parameters {internal}: clients cannot set those")
            allowed = frozenset(names)
        origins = tuple(str(o) for o in parameters.get("cors_origins") or ())
        concurrent = parameters.get("max_concurrent_requests")
        if concurrent is not None and int(concurrent) < 1:
            raise ValueError(f"max_concurrent_requests must be at least 1 (got {concurrent})")
        return cls(body, deadline, allowed, origins, int(concurrent) if concurrent is not None else None)

    def check_parameters(self, params: dict[str, Any], *, where: str = "parameters") -> dict[str, Any]:
        """The client's parameters, refused (400) when one is internal or not allowed here."""
        for name in params:
            if not isinstance(name, str) or is_internal(name):
                raise ClientError(400, f"{where}: {name!r} is internal to the deployment; clients cannot set it", param=str(name))
            if self.allowed_parameters is not None and name not in self.allowed_parameters:
                allowed = ", ".join(sorted(self.allowed_parameters)) or "none"
                raise ClientError(400, f"{where}: {name!r} is not allowed by this frontend (allowed: {allowed})", param=name)
        return dict(params)

    def deadline(self, requested_s: Any, default_s: float, *, param: str = "timeout") -> float:
        """A client's deadline in seconds: a finite positive number, capped by max_deadline_s."""
        if requested_s is None:
            return min(default_s, self.max_deadline_s)
        if isinstance(requested_s, bool) or not isinstance(requested_s, (int, float)):
            raise ClientError(400, f"{param!r} must be a number", param=param)
        try:
            value = float(requested_s)
        except OverflowError:  # an integer beyond any float: as long as a deadline gets, or negative
            value = self.max_deadline_s if requested_s > 0 else -1.0
        if not math.isfinite(value) or value <= 0:
            raise ClientError(400, f"{param!r} must be a positive, finite number (got {requested_s!r})", param=param)
        return min(value, self.max_deadline_s)


class Admission:
    """At most max_concurrent_requests requests at once; one more is a 429 (with Retry-After)
    at once, rather than a queue that grows with whatever a client sends."""

    RETRY_AFTER_S = 1

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.inflight = 0

    def __enter__(self) -> "Admission":
        if self.limit is not None and self.inflight >= self.limit:
            raise ClientError(429, f"this frontend is serving its maximum of {self.limit} requests at once; "
                                   f"retry after {self.RETRY_AFTER_S} s (max_concurrent_requests)")
        self.inflight += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self.inflight -= 1


def api_key_of(parameters: dict[str, Any]) -> str | None:
    """The API key a frontend requires, from the environment variable `api_key_env` names (a
    secret travels by name, never by value in the graph or the plan); None: no key required."""
    name = parameters.get("api_key_env")
    if not name:
        return None
    key = os.environ.get(str(name))
    if not key:
        raise ValueError(f"api_key_env names {name!r}, which is not set (or empty) in the worker's environment")
    return key


def check_api_key(request: Any, key: str | None) -> None:
    """401 unless `Authorization: Bearer <key>` (compared in constant time)."""
    if key is None:
        return
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ClientError(401, "no or wrong API key: send Authorization: Bearer <key>")


# ---------------------------------------------------------------- bodies


async def read_body(request: Any, limit: int) -> bytearray:
    """The body of an aiohttp request, at most `limit` bytes (413 otherwise).

    A declared Content-Length over the limit is refused before any of the body is read; a
    chunked (or compressed) body is read piece by piece and refused as soon as it passes the
    limit, so memory stays bounded by the limit whatever the client sends.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(declared, limit)
    body = bytearray()
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return body
        if len(body) + len(chunk) > limit:
            raise too_large(None, limit)
        body += chunk


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes | bytearray | str) -> Any:
    """Strict JSON: no Infinity/NaN (Python's json accepts them), nesting too deep is a ValueError."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None


def media_type(request: Any) -> str | None:
    """The request's media type, lower case, without parameters; None when the header is absent."""
    raw = request.headers.get("Content-Type")
    if raw is None:
        return None
    return raw.split(";", 1)[0].strip().lower()


def is_json_type(mime: str | None) -> bool:
    return mime is not None and (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json")))


# ---------------------------------------------------------------- CORS


def cors_middleware(origins: Iterable[str]) -> Any:
    """aiohttp middleware: no CORS headers at all unless origins are configured; then the
    allowed ones (or "*") get Access-Control-Allow-Origin and preflight answers."""
    from aiohttp import web

    allowed = tuple(origins)

    def allow(origin: str | None) -> str | None:
        if not origin or not allowed:
            return None
        if "*" in allowed:
            return "*"
        return origin if origin in allowed else None

    @web.middleware
    async def cors(request: Any, handler: Any) -> Any:
        origin = allow(request.headers.get("Origin"))
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            if origin is None:
                raise web.HTTPForbidden(reason="CORS origin not allowed")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "Content-Type"),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
        resp = await handler(request)
        if origin is not None:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"
        return resp

    return cors
