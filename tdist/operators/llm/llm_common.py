"""What every LLM engine operator shares: the engine interface, engine-args loading, the operator
loop that streams token deltas, and the engines' Prometheus families. The request convention
they all speak (prompt, sampling, response keys) is convention.py.

Engines (vLLM, TensorRT-LLM) implement `LLMEngine`; `LLMEngineOperator` turns requests into
`engine.generate(...)` calls and aborts the engine request when the tdist request is cancelled
or its deadline passes. Disaggregated serving (issue 9) adds to this without changing it:
`role` travels in the operator config, and `kv_transfer_params` pass through both ways.
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from tdist.errors import OperatorLoadError
from tdist.operators.llm.convention import LLMPrompt, SamplingOptions, parse_prompt, parse_sampling
from tdist.runtime.operator import Operator, OperatorContext, Request

# ---------------------------------------------------------------------------------------------
# engine interface


@dataclass
class Chunk:
    """One streamed piece of a generation: the delta since the previous chunk."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # running total of generated tokens
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache
    kv_transfer_params: dict[str, Any] | None = None  # disaggregated serving handle (issue 9)


class LLMEngine(abc.ABC):
    """What the operator needs from an engine. vLLM and TensorRT-LLM implement it."""

    name = "engine"

    @abc.abstractmethod
    async def start(self) -> None:
        """Build the engine (may take tens of seconds; must not block the event loop)."""

    @abc.abstractmethod
    def generate(
        self,
        prompt: LLMPrompt,
        sampling: SamplingOptions,
        request_id: str,
        *,
        extra: dict[str, Any] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Stream deltas; the last chunk has finished=True. Cancelling the iteration aborts."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop an engine request now (idempotent)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release the engine."""

    def num_unfinished_requests(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {}


# ---------------------------------------------------------------------------------------------
# engine args


def load_engine_args(engine_args: dict[str, Any], parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge engine args: a config file (configs/*.json|yaml) first, then the YAML's inline keys.

    The file is named by `engine_args.config` (or `parameters.engine_config`); relative paths
    are resolved against the working directory.
    """
    args = dict(engine_args or {})
    path = args.pop("config", None) or (parameters or {}).get("engine_config")
    merged: dict[str, Any] = {}
    if path:
        p = Path(str(path)).expanduser()
        if not p.exists():
            raise OperatorLoadError(f"engine config file {str(path)!r} not found (engine_args.config)")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                loaded = yaml.safe_load(text) or {}
            else:
                loaded = json.loads(text)
        except Exception as exc:
            raise OperatorLoadError(f"engine config file {str(path)!r} is not valid {p.suffix[1:] or 'json'}: {exc}") from None
        if not isinstance(loaded, dict):
            raise OperatorLoadError(f"engine config file {str(path)!r} must hold a mapping of engine args")
        merged.update(loaded)
    merged.update(args)
    return merged


# ---------------------------------------------------------------------------------------------
# the operator


def chunk_to_response(chunk: Chunk) -> tuple[dict[str, Any], dict[str, Any]]:
    """(outputs, parameters) of the tdist response that carries this chunk."""
    outputs = {"token_ids": np.asarray(chunk.token_ids, dtype=np.int64)}
    params: dict[str, Any] = {"text": chunk.text}
    if chunk.finished:
        params["finish_reason"] = chunk.finish_reason or "stop"
        params["usage"] = {
            "prompt_tokens": int(chunk.prompt_tokens or 0),
            "completion_tokens": int(chunk.completion_tokens or 0),
        }
        if chunk.cached_tokens is not None:
            params["usage"]["cached_tokens"] = int(chunk.cached_tokens)
        if chunk.kv_transfer_params is not None:
            params["kv_transfer_params"] = chunk.kv_transfer_params
    return outputs, params


class LLMEngineOperator(Operator):
    """Serves one LLM engine: each request becomes one streamed engine generation.

    Subclasses build the engine in `create_engine()`. Parameters (operator `parameters:`):
    `default_max_tokens` (16), `served_model_name` (reported in stats and usable by the
    frontend). The operator's `role` (both | context | generation) and `kv_transfer_params`
    in requests are passed to the engine for disaggregated serving.
    """

    engine_kind = "llm"

    def __init__(self, context: OperatorContext) -> None:
        super().__init__(context)
        self.role = context.config.role
        self.engine_args = load_engine_args(context.config.engine_args, self.parameters)
        self.default_max_tokens = int(self.parameters.get("default_max_tokens", 16))
        served = self.parameters.get("served_model_name") or self.engine_args.get("served_model_name")
        if isinstance(served, (list, tuple)):
            served = served[0] if served else None
        self.served_model_name = str(served or self.engine_args.get("model", self.name))
        self.engine: LLMEngine | None = None
        self._inflight = 0
        self._served = 0
        self._aborted = 0
        self._tokens_out = 0
        register_collector(context.metrics_registry, lambda: llm_metric_families(self.stats(), context.worker.name, self.name))

    @abc.abstractmethod
    def create_engine(self) -> LLMEngine:
        """The engine for this operator (not started)."""

    async def start(self) -> None:
        t0 = time.monotonic()
        self.engine = self.create_engine()
        await self.engine.start()
        self.logger.info(
            "%s engine ready for %s (role %s) in %.1f s",
            self.engine_kind,
            self.served_model_name,
            self.role,
            time.monotonic() - t0,
        )

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None

    def engine_request_id(self, request: Request) -> str:
        return f"{request.id}-{request.attempt}"

    async def execute(self, request: Request) -> None:
        if self.engine is None:
            raise RuntimeError(f"operator {self.name!r}: the engine is not started")
        prompt = parse_prompt(request.parameters, request.inputs)
        sampling = parse_sampling(request.parameters, default_max_tokens=self.default_max_tokens)
        extra: dict[str, Any] = {}
        if request.parameters.get("kv_transfer_params") is not None:
            extra["kv_transfer_params"] = request.parameters["kv_transfer_params"]
        rid = self.engine_request_id(request)
        self._inflight += 1
        finished = False
        try:
            async for chunk in self.engine.generate(prompt, sampling, rid, extra=extra):
                outputs, params = chunk_to_response(chunk)
                self._tokens_out += len(chunk.token_ids)
                if chunk.finished:
                    finished = True
                    await request.send(outputs, parameters=params, final=True)
                    break
                await request.send(outputs, parameters=params)
            if not finished:  # the engine ended the stream without a finished chunk
                await request.send({"token_ids": np.zeros(0, np.int64)}, parameters={"text": "", "finish_reason": "abort"}, final=True)
                finished = True
            self._served += 1
        except asyncio.CancelledError:
            self._aborted += 1
            # Cancelling the generator already aborts in vLLM; say it explicitly (idempotent)
            # and shield it so the abort reaches the engine even while we are being cancelled.
            try:
                await asyncio.shield(self.engine.abort(rid))
            except Exception:  # pragma: no cover - engine already gone
                pass
            raise
        except BaseException:
            if not finished and self.engine is not None:
                try:
                    await asyncio.shield(self.engine.abort(rid))
                except Exception:
                    pass
            raise
        finally:
            self._inflight -= 1

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "engine": self.engine_kind,
            "model": self.served_model_name,
            "role": self.role,
            "inflight": self._inflight,
            "served": self._served,
            "aborted": self._aborted,
            "tokens_out": self._tokens_out,
            "model_path": self.engine_args.get("model"),
        }
        if self.engine is not None:
            out["engine_unfinished"] = self.engine.num_unfinished_requests()
            out.update(self.engine.stats())
        return out


# ---------------------------------------------------------------------------------------------
# Prometheus: the figures of stats() on the worker's metrics endpoint (read at scrape time)

#: stats key → (metric name, help, kind) exported for every LLM engine operator.
LLM_GAUGES = {
    "inflight": ("tdist_llm_inflight_requests", "Requests in this engine operator now", "gauge"),
    "kv_cache_usage": ("tdist_llm_kv_cache_usage", "Share of the engine's KV cache in use (0-1)", "gauge"),
    "prefix_cache_hit_rate": ("tdist_llm_prefix_cache_hit_rate", "Prefix-cache hits / queries since start", "gauge"),
    "tokens_out": ("tdist_llm_generated_tokens", "Tokens generated since start", "counter"),
}
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")


def register_collector(registry: Any, families: Any) -> None:
    """Register a scrape-time collector (`families()` → metric families) if there is a registry."""
    if registry is None:
        return

    class _Collector:
        def collect(self) -> Any:
            try:
                return list(families())
            except Exception:  # a scrape must never break the worker
                return []

        def describe(self) -> list[Any]:
            return []

    registry.register(_Collector())


def llm_metric_families(stats: dict[str, Any], worker: str, operator: str) -> list[Any]:
    """Prometheus families of an LLM operator's stats(), labelled with worker, operator and role."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["worker", "operator", "role"]
    values = [worker, operator, str(stats.get("role", "both"))]
    out: list[Any] = []
    for key, (name, help_, kind) in LLM_GAUGES.items():
        if isinstance(stats.get(key), (int, float)):
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, help_, labels=labels)
            fam.add_metric(values, float(stats[key]))
            out.append(fam)
    if any(f"prompt_tokens_{s}" in stats for s in PROMPT_SOURCES):
        fam = CounterMetricFamily("tdist_llm_prompt_tokens", "Prompt tokens by where their KV came from",
                                  labels=labels + ["source"])
        for src in PROMPT_SOURCES:
            fam.add_metric(values + [src], float(stats.get(f"prompt_tokens_{src}", 0) or 0))
        out.append(fam)
    return out
