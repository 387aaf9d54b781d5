"""`kind: router` — forwards LLM requests to the workers of its target operator and streams back.

It lists the target's live instances from discovery (entries carry per-worker in-flight counts),
picks one by policy and sends a *directed* request (`instance=`):

* `round_robin` — each instance in turn;
* `least_loaded` — fewest requests in flight: the larger of what the router itself has
  outstanding there (exact, fresh) and what the worker last reported (covers other routers);
* `prefix` — affinity: requests whose prompt shares its first `prefix_chars` characters go to
  the same worker while it is alive and healthy (rendezvous hashing, so a second router picks
  the same one), which is where the engine's prefix cache already holds that prefix;
* `kv` — KV-aware: the worker that already holds the most leading prompt blocks, unless it is
  far busier than the rest (tdist/operators/routing/kv_routing.py).

With two targets `[context, generation]` the router serves disaggregated: prefill on a context
worker (chosen by the policy), decode on a generation worker (tdist/operators/routing/disagg.py).

A worker that fails before it sent anything (gone, no responders, lost) is put in a cool-down
(`failure_cooldown_s`) and the request is retried on another (`retries`); once tokens have
streamed, a failure is the caller's (a stream cannot be replayed). Policies are pure classes
(`select(key, candidates)`) so disaggregated serving (issue 9) can add a `kv` policy and pick
among `role` context / generation instances without touching the forwarding loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

from tdist.errors import NoWorkerError, OperatorLoadError, RequestError, RequestTimeout, WorkerLost
from tdist.operators.llm.convention import parse_prompt
from tdist.operators.llm.llm_common import register_collector
from tdist.operators.routing.disagg import DisaggFlow
from tdist.operators.routing.kv_routing import DEFAULT_BLOCK_SIZE, KvAware, PromptTokenizer, block_hashes, estimate_tokens, text_block_hashes
from tdist.operators.routing.policies import Candidate, Health, RouteKey, make_policy
from tdist.runtime.operator import Operator, OperatorContext, Request, current_client
from tdist.runtime.planes.discovery_entry import WorkerEntry

#: Errors that mean "this instance could not serve it" (retry elsewhere if nothing streamed yet).
RETRYABLE = (NoWorkerError, WorkerLost)


class RouterOperator(Operator):
    """`kind: router`. Parameters: policy (round_robin | least_loaded | prefix | kv), prefix_chars (64),
    retries (2), failure_cooldown_s (5), discovery_max_age_s (0.5), discovery_wait_s (1: how long
    to look again when discovery lists no instance), role (instances of this role
    only; default: any); kv: load_weight (1), max_load_gap (4), kv_index_blocks (20000),
    kv_block_size (default: the engine's), tokenizer (default: the engine's model_path).
    `targets:` names the LLM operator; two targets `[context, generation]` serve disaggregated
    (disagg_min_prompt_tokens, context_timeout_s, context_retries: see disagg.py)."""

    def __init__(self, context: OperatorContext) -> None:
        super().__init__(context)
        targets = list(context.config.targets) or ([self.parameters["target"]] if self.parameters.get("target") else [])
        if not targets:
            raise OperatorLoadError(f"router {self.name!r} needs targets: [<llm operator>] (the operator it forwards to)")
        self.target = str(targets[0])
        self.disagg: DisaggFlow | None = None
        if len(targets) >= 2:
            ctx = str(self.parameters.get("context_target", targets[0]))
            gen = str(self.parameters.get("generation_target", targets[1]))
            self.disagg = DisaggFlow(self, ctx, gen, self.parameters)
            self.target = ctx
        self.tokenizer = PromptTokenizer(self.parameters.get("tokenizer"))
        self._block_size = int(self.parameters["kv_block_size"]) if self.parameters.get("kv_block_size") else None
        self._tiebreak_counter = itertools.count()
        register_collector(context.metrics_registry, lambda: router_metric_families(self.stats(), context.worker.name, self.name))
        self.policy_name = str(self.parameters.get("policy", "round_robin"))
        self.policy = make_policy(self.policy_name, self.parameters)
        self.retries = int(self.parameters.get("retries", 2))
        self.discovery_max_age_s = float(self.parameters.get("discovery_max_age_s", 0.5))
        self.discovery_wait_s = float(self.parameters.get("discovery_wait_s", 1.0))
        self.role_filter: str | None = self.parameters.get("role")
        self.health = Health(float(self.parameters.get("failure_cooldown_s", 5.0)))
        self._local: dict[str, int] = {}
        self.routed: dict[str, int] = {}
        self.retried = 0

    async def start(self) -> None:
        self._preload_task: asyncio.Task[None] | None = None
        if isinstance(self.policy, KvAware) or self.disagg is not None:
            self._preload_task = asyncio.create_task(self._preload())

    async def stop(self) -> None:
        if getattr(self, "_preload_task", None) is not None:
            self._preload_task.cancel()  # type: ignore[union-attr]

    async def _preload(self) -> None:
        """Load the engines' tokenizer before the first request (importing transformers and loading
        it takes seconds, measured 4 s on the first `kv` request otherwise); retried until an
        engine has published its model_path."""
        while self.tokenizer.tokenizer is None and not self.tokenizer.failed:
            try:
                await self.route_key("")
            except Exception:  # no client or no engine yet
                pass
            if self.tokenizer.tokenizer is None:
                await asyncio.sleep(1.0)

    # -- discovery ------------------------------------------------------------------------------

    def _client(self) -> Any:
        client = self.context.client or current_client.get()
        if client is None:
            raise NoWorkerError("router has no request client (not running inside a worker?)", operator=self.target)
        return client

    async def candidates(self, exclude: set[str] = frozenset(), target: str | None = None) -> list[Candidate]:  # type: ignore[assignment]
        """Live, healthy instances of the target (minus `exclude`)."""
        target = target or self.target
        entries: dict[str, WorkerEntry] = await self._client().instances(target, max_age_s=self.discovery_max_age_s)
        out = []
        for name in self.health.healthy(entries):
            if name in exclude:
                continue
            entry = WorkerEntry.read(entries[name]) or WorkerEntry()
            role = entry.role_of(target)
            if self.role_filter and role not in (self.role_filter, "both"):
                continue
            out.append(
                Candidate(
                    name=name,
                    reported_inflight=entry.inflight_of(target),
                    local_inflight=self._local.get(name, 0),
                    role=role,
                    stats=entry.stats_of(target),
                )
            )
        if not out and not exclude and entries:
            # every instance is cooling down: better to try one than to fail outright
            out = [Candidate(name=n, local_inflight=self._local.get(n, 0)) for n in sorted(entries)]
        return out

    async def wait_for_candidates(self, request: Request, target: str | None = None) -> list[Candidate]:
        """Discovery said "nobody": look again, fresh, a few times within ~1 s (and the deadline).

        A worker that just started, or a discovery read that failed under load, should not turn
        into a NoWorkerError at once.
        """
        delay = 0.05
        waited = 0.0
        while waited < self.discovery_wait_s and request.time_left_s > delay:
            await asyncio.sleep(delay)
            waited += delay
            entries = await self._client().instances(target or self.target, max_age_s=0.0)
            if entries:
                return await self.candidates(target=target)
            delay = min(delay * 2, 0.4)
        return []

    # -- forwarding -----------------------------------------------------------------------------

    async def route_key(self, text: str, token_ids: Any = None) -> RouteKey:
        """The RouteKey; tokens and prefix blocks only when the kv policy or disaggregation needs them."""
        if not isinstance(self.policy, KvAware) and self.disagg is None:
            return RouteKey(text)
        block = self._block_size
        if block is None or not self.tokenizer.tokenizer:
            stats = next((c.stats for c in await self.candidates() if c.stats), {})
            block = block or int(stats.get("kv_block_size") or 0) or None
            if token_ids is None and stats.get("model_path"):
                await asyncio.to_thread(self.tokenizer.load, str(stats["model_path"]))
            elif token_ids is None and self.tokenizer.path:
                await asyncio.to_thread(self.tokenizer.load, None)
            if block:
                self._block_size = block
        block = block or DEFAULT_BLOCK_SIZE
        tokens = list(token_ids) if token_ids is not None else self.tokenizer.tokens(text)
        if tokens is None:
            return RouteKey(text, estimate_tokens(text), text_block_hashes(text, block))
        return RouteKey(text, len(tokens), block_hashes(tokens, block))

    def count_routed(self, instance: str) -> None:
        self.routed[instance] = self.routed.get(instance, 0) + 1

    def next_tiebreak(self, name: str) -> int:
        return next(self._tiebreak_counter)

    async def execute(self, request: Request) -> None:
        prompt = parse_prompt(request.parameters, request.inputs)  # BadRequest before any routing
        key = await self.route_key(prompt.routing_key(), prompt.token_ids)
        if self.disagg is not None:
            await self.disagg.execute(request, key, key.tokens)
            return
        tried: set[str] = set()
        last_error: RequestError | None = None
        for attempt in range(self.retries + 1):
            if request.time_left_s <= 0:
                raise RequestTimeout("deadline passed while routing", operator=self.name, request_id=request.id)
            cands = await self.candidates(exclude=tried)
            if not cands and not tried:
                cands = await self.wait_for_candidates(request)
            if not cands:
                if last_error is not None:
                    raise last_error
                raise NoWorkerError(f"no live instance of {self.target!r} to route to", operator=self.target)
            chosen = self.policy.select(key, cands).name
            tried.add(chosen)
            streamed = await self._forward(request, chosen)
            if streamed is None:
                return
            last_error = streamed
            self.retried += 1
            self.logger.warning("router %s: %s failed before streaming (%s); retrying elsewhere", self.name, chosen, last_error)
        assert last_error is not None
        raise last_error

    async def _forward(self, request: Request, instance: str, *, target: str | None = None,
                       parameters: dict[str, Any] | None = None, extra_final: dict[str, Any] | None = None) -> RequestError | None:
        """Stream one attempt. Returns a retryable error if it failed before the first response."""
        self._local[instance] = self._local.get(instance, 0) + 1
        self.routed[instance] = self.routed.get(instance, 0) + 1
        sent = 0
        target = target or self.target
        remote = self.context.remote(target)
        try:
            stream = remote.async_infer(
                inputs=request.inputs,
                parameters=request.parameters if parameters is None else parameters,
                timeout_s=max(0.001, request.time_left_s),
                instance=instance,
            )
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for resp in stream:
                    params = dict(resp.parameters)
                    if resp.final:
                        params["routed_to"] = resp.worker or instance
                        params.update(extra_final or {})
                        await request.send(resp.outputs, parameters=params, final=True)
                        self.health.ok(instance)
                        return None
                    await request.send(resp.outputs, parameters=params)
                    sent += 1
            raise WorkerLost(f"{instance} ended the stream without a final response", operator=target)
        except RETRYABLE as exc:
            self.health.fail(instance)
            forget = getattr(self.policy, "forget", None)
            if forget is not None:
                forget(instance)
            if sent:
                raise
            return exc
        finally:
            self._local[instance] -= 1
            if self._local[instance] <= 0:
                del self._local[instance]

    def stats(self) -> dict[str, Any]:
        return {
            "policy": self.policy_name,
            "target": self.target,
            "routed": dict(self.routed),
            "outstanding": dict(self._local),
            "retried": self.retried,
            "failures": dict(self.health.failures),
            **(self.policy.stats() if isinstance(self.policy, KvAware) else {}),
            **({"disagg": self.disagg.stats()} if self.disagg is not None else {}),
        }

    forward = _forward


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


async def wait_for_instances(client: Any, operator: str, count: int, timeout_s: float = 60.0) -> list[str]:
    """Poll discovery until `count` ready instances of `operator` exist (tests, benchmarks)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sorted(await client.instances(operator, max_age_s=0.0))
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise NoWorkerError(f"only {len(found)} of {count} instances of {operator!r} ready after {timeout_s:g} s", operator=operator)
        await asyncio.sleep(0.1)
