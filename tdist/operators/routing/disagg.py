"""Disaggregated serving, the router's side: prefill on a context worker, decode on a generation
worker, the KV cache moved between them by vLLM's NixlConnector (the engines' side of it, their
connector settings, is tdist/operators/llm/kv_transfer.py).

A router whose targets are `[context, generation]` runs each request as (1) a prefill-only
request (`max_tokens: 1`, `kv_transfer_params.do_remote_decode: true`) on a context worker chosen
by the router's policy (`kv` routes by cached prefix), whose final response carries the KV handle;
then (2) the user's request plus that handle on the least-loaded generation worker, which pulls
the KV and streams the tokens back. Conditional disaggregation: a prompt shorter than
`disagg_min_prompt_tokens` is prefilled on the generation worker itself. Failures: a context
worker that is gone, fails, times out (`context_timeout_s`) or returns no handle → the next
context worker (`context_retries`), then local prefill on the generation worker. Every choice is
counted (`stats()["disagg"]`, Prometheus `tdist_router_disagg_requests{decision}`).

The flow needs a few things of its router (candidates, policy, health, forwarding): they are the
`RouterSide` protocol below, which `RouterOperator` satisfies, so this module does not import
router.py (router.py imports this one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from tdist.errors import NoWorkerError, RequestError, RequestTimeout, WorkerLost
from tdist.operators.routing.policies import Candidate, Health, Policy, RouteKey
from tdist.runtime.operator import OperatorContext, Request


class RouterSide(Protocol):
    """What the flow uses of the router that runs it (RouterOperator)."""

    name: str
    logger: logging.Logger
    context: OperatorContext
    policy: Policy
    health: Health
    retries: int

    async def candidates(self, exclude: set[str] = ..., target: str | None = None) -> list[Candidate]: ...

    async def wait_for_candidates(self, request: Request, target: str | None = None) -> list[Candidate]: ...

    async def forward(self, request: Request, instance: str, *, target: str | None = None,
                      parameters: dict[str, Any] | None = None,
                      extra_final: dict[str, Any] | None = None) -> RequestError | None: ...

    def count_routed(self, instance: str) -> None: ...

    def next_tiebreak(self, name: str) -> int: ...

# ---------------------------------------------------------------------------------------------
# router side (pure helpers)

HANDLE_KEYS = ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port")


def prefill_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The context worker's request: same prompt and sampling, one token, keep the KV for a pull."""
    p = {k: v for k, v in parameters.items() if k not in ("kv_transfer_params", "stream", "min_tokens", "disagg")}
    p["max_tokens"] = 1
    p["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                               "remote_block_ids": None, "remote_host": None, "remote_port": None}
    return p


def valid_handle(kvp: Any) -> bool:
    """A handle the generation engine can pull from (else: prefill locally)."""
    return isinstance(kvp, dict) and bool(kvp.get("do_remote_prefill")) and all(kvp.get(k) is not None for k in HANDLE_KEYS)


def decode_parameters(parameters: dict[str, Any], handle: dict[str, Any] | None) -> dict[str, Any]:
    p = {k: v for k, v in parameters.items() if k not in ("kv_transfer_params", "disagg")}
    if handle is not None:
        p["kv_transfer_params"] = handle
    return p


DECISIONS = ("remote_prefill", "local_short_prompt", "local_no_context", "local_after_context_failure",
             "local_requested", "context_retry", "generation_retry")


def decide(prompt_tokens: int, threshold: int, requested: Any) -> str | None:
    """None → disaggregate; else the reason the generation worker prefills locally."""
    if requested is False:
        return "local_requested"
    if prompt_tokens < threshold:
        return "local_short_prompt"
    return None


# ---------------------------------------------------------------------------------------------
# router side (the flow)


class DisaggFlow:
    """Prefill on the context tier, decode on the generation tier (see the module doc)."""

    def __init__(self, router: RouterSide, context: str, generation: str, parameters: dict[str, Any]) -> None:
        self.router = router
        self.context = context
        self.generation = generation
        self.threshold = int(parameters.get("disagg_min_prompt_tokens", 0))
        self.context_timeout_s = float(parameters.get("context_timeout_s", 30.0))
        self.context_retries = int(parameters.get("context_retries", 1))
        self.counts: dict[str, int] = {d: 0 for d in DECISIONS}
        self.prefill_s_total = 0.0

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def execute(self, request: Request, key: RouteKey, prompt_tokens: int) -> None:
        reason = decide(prompt_tokens, self.threshold, request.parameters.get("disagg"))
        handle = None
        if reason is None:
            handle, reason = await self._prefill(request, key)
        self._count(reason or "remote_prefill")
        await self._decode(request, handle, routed_note=reason or "remote_prefill")

    async def _prefill(self, request: Request, key: RouteKey) -> tuple[dict[str, Any] | None, str | None]:
        """(handle, None) on success, else (None, why the generation worker prefills locally)."""
        r = self.router
        tried: set[str] = set()
        params = prefill_parameters(request.parameters)
        for attempt in range(self.context_retries + 1):
            cands = await r.candidates(exclude=tried, target=self.context)
            if not cands:
                return None, ("local_no_context" if not tried else "local_after_context_failure")
            chosen = r.policy.select(key, cands).name
            tried.add(chosen)
            if attempt:
                self._count("context_retry")
            budget = min(self.context_timeout_s, request.time_left_s * 0.5)
            t0 = time.monotonic()
            try:
                final = await asyncio.wait_for(self._run_prefill(chosen, request, params, budget), timeout=budget + 1.0)
            except (RequestError, asyncio.TimeoutError) as exc:
                r.health.fail(chosen)
                forget = getattr(r.policy, "forget", None)
                if forget is not None:
                    forget(chosen)
                r.logger.warning("router %s: prefill on %s failed (%s: %s)", r.name, chosen, type(exc).__name__, exc)
                if request.time_left_s <= 0:
                    raise RequestTimeout("deadline passed during prefill", operator=r.name, request_id=request.id) from None
                continue
            self.prefill_s_total += time.monotonic() - t0
            handle = final.get("kv_transfer_params")
            if valid_handle(handle):
                r.health.ok(chosen)
                return dict(handle, tdist_context_worker=chosen), None
            r.logger.warning("router %s: %s returned no usable KV handle (%r)", r.name, chosen, handle)
        return None, "local_after_context_failure"

    async def _run_prefill(self, instance: str, request: Request, params: dict[str, Any], budget: float) -> dict[str, Any]:
        r = self.router
        r.count_routed(instance)
        remote = r.context.remote(self.context)
        stream = remote.async_infer(inputs=request.inputs, parameters=params, timeout_s=max(0.001, budget), instance=instance)
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for resp in stream:
                if resp.final:
                    if resp.parameters.get("finish_reason") == "error":
                        raise WorkerLost(f"{instance} prefill ended in error", operator=self.context)
                    return dict(resp.parameters)
        raise WorkerLost(f"{instance} ended the prefill stream without a final response", operator=self.context)

    async def _decode(self, request: Request, handle: dict[str, Any] | None, routed_note: str) -> None:
        r = self.router
        tried: set[str] = set()
        last: RequestError | None = None
        ctx_worker = handle.pop("tdist_context_worker", None) if handle else None
        for attempt in range(r.retries + 1):
            cands = await r.candidates(exclude=tried, target=self.generation)
            if not cands and not tried:
                cands = await r.wait_for_candidates(request, target=self.generation)
            if not cands:
                raise last or NoWorkerError(f"no live instance of {self.generation!r} to route to", operator=self.generation)
            chosen = min(cands, key=lambda c: (c.load, r.next_tiebreak(c.name))).name
            tried.add(chosen)
            if attempt:
                self._count("generation_retry")
                handle = None  # the KV may have been half pulled: prefill locally from here on
            params = decode_parameters(request.parameters, handle)
            extra: dict[str, Any] = {"disagg": routed_note if not attempt else "local_after_generation_failure"}
            if ctx_worker:
                extra["prefilled_on"] = ctx_worker
            err = await r.forward(request, chosen, target=self.generation, parameters=params, extra_final=extra)
            if err is None:
                return
            last = err
        assert last is not None
        raise last

    def stats(self) -> dict[str, Any]:
        return {"context": self.context, "generation": self.generation, "min_prompt_tokens": self.threshold,
                "decisions": dict(self.counts), "prefill_s_total": round(self.prefill_s_total, 3)}
