"""The request plane's transport, as an interface: what RequestClient (the caller side) and
OperatorHost (the serving side) need to move encoded requests, responses and cancellations.

Everything above the transport — deadlines, typed errors, attempts, streaming, cancellation fan-out,
backpressure windows — lives in RequestClient and OperatorHost once, for every transport. Two
implementations: NATS (planes/request_nats.py: a JetStream work queue per deployment, core NATS
for the rest) and in memory (planes/request_memory.py: the same semantics in one process, for
unit tests of the layers above without a nats-server).

Semantics every implementation keeps:
- `submit` of a request without `instance` puts it in the operator's work queue; hosts take from
  it only while their window (free runner slots) is positive, so a busy host takes nothing more
  and the rest waits for other replicas. With `instance`, it goes to that instance only; if that
  instance does not listen, its inbox gets "no responders" (`deliver(token, None)`).
- A queued request is settled once: ack (done), term (never run it), nak (hand it back for
  another host); `in_progress` keeps a long one from being redelivered.
- Cancellations reach every listener of the deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from tdist.runtime.protocol import RequestMessage


class Settle(Protocol):
    """How a host settles a queued request (a JetStream message has exactly these)."""

    async def ack(self) -> None: ...

    async def term(self) -> None: ...

    async def nak(self) -> None: ...

    async def in_progress(self) -> None: ...


@dataclass
class Delivery:
    """One request handed to a host: the encoded message, its delivery attempt (2+ after a
    redelivery), the subject to answer on, and how to settle it (None for a directed request,
    which is not queued and so has nothing to settle)."""

    data: bytes
    attempt: int
    reply: str | None
    settle: Settle | None


class Intake(Protocol):
    """A host's subscription to its operator's requests."""

    def wake(self) -> None:
        """The host's window grew (a request finished): it may take more now."""

    async def close(self) -> None:
        """Take nothing more (drain). What was delivered stays the host's to settle."""


class Listener(Protocol):
    async def close(self) -> None: ...


class RequestPlane(Protocol):
    """Transport of one deployment's request plane (see the module doc for the semantics)."""

    deployment: str

    @property
    def max_payload(self) -> int:
        """The largest message, in bytes; a bigger request or response is a PayloadTooLarge."""

    # -- caller side
    async def listen(self, inbox: str, deliver: Callable[[str, bytes | None], None]) -> Listener:
        """Receive what is sent to `<inbox>.<token>` as deliver(token, payload); payload None means
        a directed request sent with that reply subject reached no listener."""

    async def submit(self, msg: RequestMessage, payload: bytes) -> None:
        """Queue `payload` for msg.operator, or send it to msg.instance. Raises NoWorkerError when
        the deployment has no queue, RequestTimeout when the transport did not accept it in time."""

    async def cancel(self, request_id: str) -> None:
        """Tell every worker of the deployment to stop `request_id` (best effort)."""

    # -- serving side
    async def serve(self, operator: str, instance: str, *, max_inflight: int, window: Callable[[], int],
                    deliver: Callable[[Delivery], None]) -> Intake:
        """Start taking `operator`'s requests for this `instance`: queued ones while window() > 0
        (window() is the host's free slots of `max_inflight`), and every request directed to the
        instance. Each one is handed to deliver(), synchronously."""

    async def reply(self, subject: str, payload: bytes) -> None:
        """Send an encoded response to a caller's reply subject."""

    async def on_cancel(self, callback: Callable[[str], Any]) -> Listener:
        """Call callback(request_id) for every cancellation of the deployment."""

    async def flush(self) -> None:
        """Return once subscriptions made so far are in effect (before a worker says ready)."""

    async def close(self) -> None:
        """Release the connection (if this plane owns one)."""
