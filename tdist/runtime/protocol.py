"""The request-plane wire protocol, apart from I/O: subjects, headers, message encoding.

Pure functions only (unit-tested without a server). Messages are msgpack maps; tensors inside
them are whatever the data plane produced (inline {"dtype","shape","data"} or {"ref": ...}).

Subjects of a deployment `dep` (every name is one NATS token: [A-Za-z0-9_-]):
  tdist.<dep>.req.<op>                       load-balanced requests (JetStream work queue)
  tdist.<dep>.direct.<op>.<instance>         requests for one instance (core NATS)
  tdist.<dep>.cancel                         cancellations (core NATS, every worker listens)
  _INBOX.tdist.<client>.<request-token>      responses (core NATS, one subscription per client)
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from tdist.errors import BadRequest, RequestError

PROTOCOL_VERSION = 1
_TOKEN_RE = re.compile(r"[^A-Za-z0-9_-]")

HDR_REPLY = "Tdist-Reply"
HDR_ID = "Tdist-Id"
HDR_DEADLINE = "Tdist-Deadline"
HDR_MSG_ID = "Nats-Msg-Id"  # JetStream's deduplication header (set on acknowledged publishes)

#: "NATS/1.0\r\n" before the header lines and "\r\n" after them (nats-py's HPUB encoding).
_HEADER_FRAME = len(b"NATS/1.0\r\n") + len(b"\r\n")


def token(name: str) -> str:
    """A name as one NATS subject token. Instance names `comp.3` become `comp-3` (injective for
    names made of [A-Za-z0-9_-] plus a numeric replica suffix, which the spec enforces)."""
    if not name:
        raise ValueError("empty name")
    return _TOKEN_RE.sub("-", name)


def stream_name(deployment: str) -> str:
    return "TDIST_" + token(deployment)


def request_subject(deployment: str, operator: str) -> str:
    return f"tdist.{token(deployment)}.req.{token(operator)}"


def stream_subjects(deployment: str) -> list[str]:
    return [f"tdist.{token(deployment)}.req.*"]


def direct_subject(deployment: str, operator: str, instance: str) -> str:
    return f"tdist.{token(deployment)}.direct.{token(operator)}.{token(instance)}"


def cancel_subject(deployment: str) -> str:
    return f"tdist.{token(deployment)}.cancel"


def consumer_name(operator: str) -> str:
    return "op_" + token(operator)


def request_headers(msg: "RequestMessage", *, msg_id: bool = False) -> dict[str, str]:
    """The NATS headers a request travels with (`msg_id`: plus JetStream's Nats-Msg-Id)."""
    headers = {HDR_REPLY: msg.reply, HDR_ID: msg.id, HDR_DEADLINE: repr(msg.deadline)}
    if msg_id:
        headers[HDR_MSG_ID] = msg.id
    return headers


def headers_size(headers: dict[str, str] | None) -> int:
    """Bytes the headers add to a NATS message, as nats-py encodes them (HPUB).

    nats-server checks max_payload against headers + payload, while nats-py checks the payload
    alone; a message that passes nats-py's check but not the server's makes the server close the
    whole connection. Counting the headers here keeps that from ever happening.
    """
    if headers is None:
        return 0
    return _HEADER_FRAME + sum(len(k.strip().encode()) + 2 + len(str(v).strip().encode()) + 2 for k, v in headers.items())


def new_request_id() -> str:
    """Unguessable, subject-safe request id."""
    return secrets.token_hex(12)


@dataclass
class RequestMessage:
    id: str
    operator: str
    inputs: dict[str, Any]  # name -> wire tensor (inline or ref)
    parameters: dict[str, Any]
    deadline: float
    reply: str
    parent: str | None = None
    instance: str | None = None
    version: int = PROTOCOL_VERSION

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.deadline


@dataclass
class ResponseMessage:
    id: str
    seq: int
    final: bool
    worker: str | None = None
    attempt: int = 1
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> wire tensor
    parameters: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # RequestError.to_wire()


def _pack(obj: dict[str, Any]) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int beyond 64 bits
        raise BadRequest(f"message cannot be encoded: {exc} (parameters must be JSON-like: str, int, float, bool, list, dict)") from None


def _unpack(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise BadRequest(f"malformed {what}: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"malformed {what}: not a map")
    return obj


def encode_request(msg: RequestMessage) -> bytes:
    return _pack(
        {
            "v": msg.version,
            "id": msg.id,
            "op": msg.operator,
            "in": msg.inputs,
            "p": msg.parameters,
            "dl": msg.deadline,
            "r": msg.reply,
            "par": msg.parent,
            "inst": msg.instance,
        }
    )


def decode_request(data: bytes) -> RequestMessage:
    obj = _unpack(data, "request")
    try:
        return RequestMessage(
            id=str(obj["id"]),
            operator=str(obj["op"]),
            inputs=dict(obj.get("in") or {}),
            parameters=dict(obj.get("p") or {}),
            deadline=float(obj["dl"]),
            reply=str(obj["r"]),
            parent=obj.get("par"),
            instance=obj.get("inst"),
            version=int(obj.get("v", PROTOCOL_VERSION)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"malformed request: missing or bad field {exc}") from None


def encode_response(msg: ResponseMessage) -> bytes:
    return _pack(
        {
            "id": msg.id,
            "s": msg.seq,
            "f": msg.final,
            "w": msg.worker,
            "a": msg.attempt,
            "out": msg.outputs,
            "p": msg.parameters,
            "err": msg.error,
        }
    )


def decode_response(data: bytes) -> ResponseMessage:
    obj = _unpack(data, "response")
    try:
        return ResponseMessage(
            id=str(obj["id"]),
            seq=int(obj["s"]),
            final=bool(obj["f"]),
            worker=obj.get("w"),
            attempt=int(obj.get("a", 1)),
            outputs=dict(obj.get("out") or {}),
            parameters=dict(obj.get("p") or {}),
            error=obj.get("err"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"malformed response: missing or bad field {exc}") from None


def error_response(request_id: str, seq: int, err: RequestError, *, worker: str | None, attempt: int = 1) -> ResponseMessage:
    """The final response that carries a typed error."""
    return ResponseMessage(id=request_id, seq=seq, final=True, worker=worker, attempt=attempt, error=err.to_wire())


def encode_cancel(request_id: str) -> bytes:
    return _pack({"id": request_id})


def decode_cancel(data: bytes) -> str:
    return str(_unpack(data, "cancel")["id"])
