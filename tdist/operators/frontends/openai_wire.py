"""OpenAI's wire shapes, apart from the HTTP server (openai.py): which request fields pass through
as sampling parameters, finish reasons, the JSON error object and the status each typed tdist
error maps to, server-sent events and usage counts. Pure, so they are unit-tested on their own.
"""

from __future__ import annotations

import json
from typing import Any

from tdist.errors import (
    BadRequest,
    NoWorkerError,
    Overloaded,
    PayloadTooLarge,
    RequestCancelled,
    RequestError,
    RequestPlaneDown,
    RequestTimeout,
)
from tdist.operators.frontends.guards import is_internal, loads

#: OpenAI request fields → tdist parameter names (those passed through unchanged).
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
FINISH = {"stop": "stop", "length": "length", "abort": "stop", "error": "stop"}


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


#: `code` of client errors the guards raise, by status
CLIENT_ERROR_CODES = {400: "bad_request", 401: "invalid_api_key", 404: "not_found", 413: "request_too_large",
                      415: "invalid_content_type", 429: "rate_limit_exceeded"}


def parse_body(raw: bytes | bytearray) -> dict[str, Any]:
    """A request body → its JSON object: strict JSON (no NaN/Infinity, bounded nesting), an
    object, and none of the deployment's internal fields (e.g. kv_transfer_params)."""
    try:
        body = loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"the request body must be a JSON object ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    internal = [k for k in body if is_internal(k)]
    if internal:
        raise ApiError(400, f"'{internal[0]}' is internal to the deployment; clients cannot set it", param=internal[0])
    return body


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """`stream` and `stream_options.include_usage` are booleans: the string "false" is a 400,
    not a truthy value."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options")
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    usage = opts.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false", param="stream_options")
    return bool(stream), bool(usage)


def api_error_of(exc: BaseException) -> ApiError:
    """Map tdist's typed request errors to HTTP statuses."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BadRequest):
        return ApiError(400, exc.message, param=exc.detail.get("param"), code="bad_request")
    if isinstance(exc, PayloadTooLarge):
        return ApiError(413, f"the request is too large for the deployment's request plane: {exc.message}",
                        code="request_too_large")
    if isinstance(exc, NoWorkerError):
        return ApiError(503, exc.message, type="service_unavailable", code="no_worker")
    if isinstance(exc, Overloaded):  # the work queue is full: the client retries after Retry-After
        return ApiError(429, exc.message, type="rate_limit_error", code="overloaded")
    if isinstance(exc, RequestPlaneDown):  # never stored, so never run: safe to retry
        return ApiError(503, exc.message, type="service_unavailable", code="request_plane_down")
    if isinstance(exc, RequestTimeout):
        return ApiError(504, exc.message, type="timeout", code="timeout")
    if isinstance(exc, RequestCancelled):
        return ApiError(499, exc.message, type="cancelled", code="cancelled")
    if isinstance(exc, RequestError):
        return ApiError(500, exc.render(), type="server_error", code=exc.kind)
    return ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="internal_error")


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def usage_of(usage: dict[str, Any]) -> dict[str, int]:
    p = int(usage.get("prompt_tokens", 0) or 0)
    c = int(usage.get("completion_tokens", 0) or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
