"""Disaggregated serving: prefill on a context worker, decode on a generation worker, the KV
cache moved between them by vLLM's NixlConnector.

Two halves live here:

* **Engine side** (`connector_settings`, `side_channel_env`): what a `role: context` or
  `role: generation` vLLM engine adds to its engine args — a `kv_transfer_config` for
  NixlConnector (producer / consumer, CPU buffers where there is no GPU, a KV lease long enough
  for the pull, and on the generation side `kv_load_failure_policy: recompute`, so a KV handle
  that is lost or expired is prefilled locally, never answered wrongly) and its NIXL side channel
  (host, a port of its own). Graph `engine_args.kv_transfer_config` keys win.

* **Router side** (`DisaggFlow`): a router whose targets are `[context, generation]` runs
  each request as (1) a prefill-only request (`max_tokens: 1`,
  `kv_transfer_params.do_remote_decode: true`) on a context worker chosen by the router's
  policy (`kv` routes by cached prefix), whose final response carries the KV handle; then
  (2) the user's request plus that handle on the least-loaded generation worker, which pulls
  the KV and streams the tokens back. Conditional disaggregation: a prompt shorter than
  `disagg_min_prompt_tokens` is prefilled on the generation worker itself. Failures: a context
  worker that is gone, fails, times out (`context_timeout_s`) or returns no handle → the next
  context worker (`context_retries`), then local prefill on the generation worker. Every choice
  is counted (`stats()["disagg"]`, Prometheus `tdist_router_disagg_requests{decision}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from tdist.errors import NoWorkerError, OperatorLoadError, RequestError, RequestTimeout, WorkerLost
from tdist.runtime.ports import free_port

if TYPE_CHECKING:  # pragma: no cover
    from tdist.operators.routing.router import RouterOperator
    from tdist.runtime.operator import Request

# ---------------------------------------------------------------------------------------------
# engine side

#: Measured on CPU: the default 30 s lease can expire before the decode side pulls under load.
DEFAULT_KV_LEASE_S = 120
NIXL_ROLES = {"context": "kv_producer", "generation": "kv_consumer"}


def connector_settings(role: str, *, cpu: bool, lease_s: int = DEFAULT_KV_LEASE_S,
                       given: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The kv_transfer_config for an engine of `role`; None for a monolithic (`both`) engine
    unless the graph gave one. Keys in `given` (graph engine_args) win."""
    if role not in NIXL_ROLES:
        return dict(given) if given else None
    cfg: dict[str, Any] = {
        "kv_connector": "NixlConnector",
        "kv_role": NIXL_ROLES[role],
        "kv_connector_extra_config": {"kv_lease_duration": int(lease_s)},
    }
    if cpu:
        cfg["kv_buffer_device"] = "cpu"
        # NIXL's UCX backend starts 4 worker threads by default, which poll; one is enough for
        # CPU buffers on a small machine (each idle poller costs CPU the engines need)
        cfg["kv_connector_extra_config"]["num_threads"] = 1
        # AMX CPUs need a permission vLLM's decode kernel assumes, and NIXL's progress thread is
        # set per operator: tdist/operators/llm/nixl_cpu.py (settings: nixl_env)
        cfg["kv_connector_module_path"] = "tdist.operators.llm.nixl_cpu"
    if role == "generation":
        cfg["kv_load_failure_policy"] = "recompute"
    for k, v in (given or {}).items():
        if k == "kv_connector_extra_config" and isinstance(v, dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def nixl_env(parameters: dict[str, Any], role: str = "context") -> dict[str, str]:
    """TDIST_NIXL_PROGRESS for tdist/operators/llm/nixl_cpu.py from the operator's parameters:
    `nixl_progress` (busy | off; `nixl_progress_thread: true/false` means busy/off).

    Default by role: a context engine is the passive side of every KV READ and, idle, makes no
    progress calls of its own, so it needs NIXL's progress thread (`busy`); a generation engine
    starts the READs and polls their state every engine step, which progresses its UCX worker,
    so it runs without one (`off`): one busy-polling core per deployment, not one per engine."""
    mode = parameters.get("nixl_progress")
    if mode is None and parameters.get("nixl_progress_thread") is not None:
        mode = "busy" if parameters["nixl_progress_thread"] else "off"
    mode = str(mode or ("off" if role == "generation" else "busy")).lower()
    if mode not in ("busy", "off"):
        raise OperatorLoadError(f"parameters.nixl_progress must be busy or off (found {mode!r})")
    return {"TDIST_NIXL_PROGRESS": mode}


def side_channel_env(parameters: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """VLLM_NIXL_SIDE_CHANNEL_HOST/PORT for this engine: `parameters.kv_side_channel_host/port`,
    else the environment, else 127.0.0.1 (TDIST_HOST_ADDRESS on multi-node) and a free port."""
    env = os.environ if env is None else env
    host = parameters.get("kv_side_channel_host") or env.get("VLLM_NIXL_SIDE_CHANNEL_HOST") \
        or env.get("TDIST_HOST_ADDRESS") or "127.0.0.1"
    port = parameters.get("kv_side_channel_port") or env.get("VLLM_NIXL_SIDE_CHANNEL_PORT") or free_port(
        "0.0.0.0" if host not in ("127.0.0.1", "localhost") else "127.0.0.1")
    return {"VLLM_NIXL_SIDE_CHANNEL_HOST": str(host), "VLLM_NIXL_SIDE_CHANNEL_PORT": str(int(port))}


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

    def __init__(self, router: "RouterOperator", context: str, generation: str, parameters: dict[str, Any]) -> None:
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

    async def execute(self, request: "Request", key: Any, prompt_tokens: int) -> None:
        reason = decide(prompt_tokens, self.threshold, request.parameters.get("disagg"))
        handle = None
        if reason is None:
            handle, reason = await self._prefill(request, key)
        self._count(reason or "remote_prefill")
        await self._decode(request, handle, routed_note=reason or "remote_prefill")

    async def _prefill(self, request: "Request", key: Any) -> tuple[dict[str, Any] | None, str | None]:
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

    async def _run_prefill(self, instance: str, request: "Request", params: dict[str, Any], budget: float) -> dict[str, Any]:
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

    async def _decode(self, request: "Request", handle: dict[str, Any] | None, routed_note: str) -> None:
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


def router_metric_families(stats: dict[str, Any], worker: str, operator: str) -> list[Any]:
    """Prometheus families of a router's stats(): requests per instance, disaggregation decisions."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    out: list[Any] = []
    routed = CounterMetricFamily("tdist_router_routed", "Requests sent to each instance", labels=["worker", "operator", "instance"])
    for inst, n in sorted((stats.get("routed") or {}).items()):
        routed.add_metric([worker, operator, inst], float(n))
    out.append(routed)
    dis = stats.get("disagg")
    if isinstance(dis, dict):
        fam = CounterMetricFamily("tdist_router_disagg_requests", "Disaggregated routing decisions (remote_prefill or why local)",
                                  labels=["worker", "operator", "decision"])
        for d, n in sorted(dis.get("decisions", {}).items()):
            fam.add_metric([worker, operator, d], float(n))
        out.append(fam)
    if "kv_expected_hit_rate" in stats:
        g = GaugeMetricFamily("tdist_router_kv_expected_hit_rate", "Share of prompt blocks routed to an instance expected to hold them",
                              labels=["worker", "operator"])
        g.add_metric([worker, operator], float(stats["kv_expected_hit_rate"]))
        out.append(g)
    return out


def check_handle(kvp: Any) -> str | None:
    """What is wrong with a KV handle a generation engine is asked to pull (None: fine, or no pull).

    vLLM's NIXL worker trusts the handle's shape; a malformed one raises inside the engine and
    kills it, so the operator checks it first."""
    if kvp is None:
        return None
    if not isinstance(kvp, dict):
        return f"must be an object, got {type(kvp).__name__}"
    if not kvp.get("do_remote_prefill"):
        return None
    ids = kvp.get("remote_block_ids")
    if not isinstance(ids, list) or not all(isinstance(g, list) and all(isinstance(i, int) for i in g) for g in ids):
        return "remote_block_ids must be a list of lists of block ids (one per KV-cache group)"
    for k, kind in (("remote_engine_id", str), ("remote_request_id", str), ("remote_host", str), ("remote_port", int)):
        if not isinstance(kvp.get(k), kind) or isinstance(kvp.get(k), bool):
            return f"{k} must be a {kind.__name__}, got {kvp.get(k)!r}"
    return None
