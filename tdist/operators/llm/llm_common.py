"""What every LLM engine operator shares: request parsing, sampling options, the engine interface,
and the operator loop that streams token deltas.

The team-wide convention for text requests (`tdist infer --prompt`, the router, the OpenAI
frontend all speak it):

* request: `parameters["prompt"]` (str) or `parameters["messages"]` (chat, list of
  {role, content}) or `inputs["prompt_token_ids"]` (int array); sampling in parameters:
  `max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos, min_tokens,
  presence_penalty, frequency_penalty, repetition_penalty`.
* every streamed response: `parameters["text"]` (the delta), `outputs["token_ids"]` (int64
  delta ids); the final one adds `parameters["finish_reason"]` and
  `parameters["usage"] = {"prompt_tokens", "completion_tokens"}`.

Engines (vLLM, TensorRT-LLM) implement `LLMEngine`; `LLMEngineOperator` turns requests into
`engine.generate(...)` calls and aborts the engine request when the tdist request is cancelled
or its deadline passes. Disaggregated serving (issue 9) adds to this without changing it:
`role` travels in the operator config, and `kv_transfer_params` pass through both ways.
"""

from __future__ import annotations

import abc
import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import numpy as np

from tdist.errors import BadRequest, OperatorLoadError
from tdist.runtime.operator import Operator, OperatorContext, Request

#: Finish reasons the frontend maps to OpenAI's ("stop", "length", "abort" → "stop").
FINISH_REASONS = ("stop", "length", "abort", "error")

# ---------------------------------------------------------------------------------------------
# sampling options


@dataclass(frozen=True)
class SamplingOptions:
    """Engine-neutral sampling parameters, validated once (bad values are a BadRequest)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d


#: parameter name → (python type(s), check, rule text)
_NUMERIC_RULES: dict[str, tuple[type, Any, str]] = {
    "max_tokens": (int, lambda v: v >= 1, "an integer ≥ 1"),
    "temperature": (float, lambda v: 0.0 <= v <= 100.0, "a number in [0, 100]"),
    "top_p": (float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "top_k": (int, lambda v: v >= -1, "an integer ≥ 0 (0 or -1: disabled)"),
    "seed": (int, lambda v: True, "an integer"),
    "min_tokens": (int, lambda v: v >= 0, "an integer ≥ 0"),
    "presence_penalty": (float, lambda v: -2.0 <= v <= 2.0, "a number in [-2, 2]"),
    "frequency_penalty": (float, lambda v: -2.0 <= v <= 2.0, "a number in [-2, 2]"),
    "repetition_penalty": (float, lambda v: 0.0 < v <= 10.0, "a number in (0, 10]"),
}
SAMPLING_KEYS = tuple(_NUMERIC_RULES) + ("stop", "stop_token_ids", "ignore_eos")


def _coerce_number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise BadRequest(f"sampling parameter {name!r} must be a number, got {value!r}")
    if isinstance(value, np.generic):
        value = value.item()
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise BadRequest(f"sampling parameter {name!r} must be an integer, got {value!r}")
    if isinstance(value, (int, float)):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            raise BadRequest(f"sampling parameter {name!r} must be a number, got {value!r}") from None
    else:
        raise BadRequest(f"sampling parameter {name!r} must be a number, got {value!r}")
    if not math.isfinite(f):
        raise BadRequest(f"sampling parameter {name!r} must be finite, got {value!r}")
    return f


def parse_sampling(parameters: dict[str, Any], *, default_max_tokens: int = 16) -> SamplingOptions:
    """Read sampling options from request parameters. None values mean "default"."""
    kw: dict[str, Any] = {"max_tokens": default_max_tokens}
    for name, (kind, check, rule) in _NUMERIC_RULES.items():
        value = parameters.get(name)
        if value is None:
            continue
        value = _coerce_number(name, value, kind)
        if not check(value):
            raise BadRequest(f"sampling parameter {name!r} must be {rule}, got {value!r}", detail={"param": name})
        kw[name] = value
    if kw.get("top_k") == -1:
        kw["top_k"] = 0
    stop = parameters.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise BadRequest(f"'stop' must be a string or a list of strings, got {stop!r}", detail={"param": "stop"})
        if any(s == "" for s in stop):
            raise BadRequest("'stop' strings must not be empty", detail={"param": "stop"})
        kw["stop"] = tuple(stop)
    ids = parameters.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRequest(f"'stop_token_ids' must be a list of integers, got {ids!r}", detail={"param": "stop_token_ids"})
        kw["stop_token_ids"] = tuple(ids)
    ignore_eos = parameters.get("ignore_eos")
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise BadRequest(f"'ignore_eos' must be true or false, got {ignore_eos!r}", detail={"param": "ignore_eos"})
        kw["ignore_eos"] = ignore_eos
    if kw.get("min_tokens", 0) > kw["max_tokens"]:
        raise BadRequest(
            f"'min_tokens' ({kw['min_tokens']}) must not exceed 'max_tokens' ({kw['max_tokens']})",
            detail={"param": "min_tokens"},
        )
    return SamplingOptions(**kw)


# ---------------------------------------------------------------------------------------------
# prompts


@dataclass(frozen=True)
class LLMPrompt:
    """Exactly one of text, messages (chat, rendered by the engine's template) or token_ids."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None

    def routing_key(self) -> str:
        """The text a prefix-affinity router hashes (messages flattened; ids joined)."""
        if self.text is not None:
            return self.text
        if self.messages is not None:
            return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in self.messages)
        return " ".join(str(i) for i in self.token_ids or ())


def _check_messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", detail={"param": "messages"})
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", detail={"param": "messages"})
        content = m.get("content", "")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", detail={"param": "messages"})
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", detail={"param": "messages"})
        out.append({"role": m["role"], "content": content})
    return tuple(out)


def parse_prompt(parameters: dict[str, Any], inputs: dict[str, Any] | None = None) -> LLMPrompt:
    """The request's prompt: parameters.prompt | parameters.messages | inputs.prompt_token_ids."""
    inputs = inputs or {}
    given = [k for k in ("prompt", "messages") if parameters.get(k) is not None]
    if "prompt_token_ids" in inputs:
        given.append("prompt_token_ids")
    if not given:
        raise BadRequest(
            "an LLM request needs parameters.prompt (text), parameters.messages (chat) "
            "or inputs.prompt_token_ids",
            detail={"param": "prompt"},
        )
    if len(given) > 1:
        raise BadRequest(f"give only one of prompt, messages, prompt_token_ids (got {', '.join(given)})")
    if given[0] == "prompt":
        prompt = parameters["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest(f"'prompt' must be a string, got {type(prompt).__name__}", detail={"param": "prompt"})
        return LLMPrompt(text=prompt)
    if given[0] == "messages":
        return LLMPrompt(messages=_check_messages(parameters["messages"]))
    ids = np.asarray(inputs["prompt_token_ids"]).reshape(-1)
    if ids.size == 0 or ids.dtype.kind not in "iu":
        raise BadRequest("inputs.prompt_token_ids must be a non-empty integer array", detail={"param": "prompt_token_ids"})
    return LLMPrompt(token_ids=tuple(int(i) for i in ids))


def render_chat_fallback(messages: Sequence[dict[str, str]]) -> str:
    """A plain chat rendering for tokenizers without a chat template."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The tokenizer's chat template with a generation prompt, or the plain fallback."""
    template = getattr(tokenizer, "chat_template", None)
    if tokenizer is not None and template:
        try:
            return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that rejects these messages (e.g. role order)
            raise BadRequest(f"the model's chat template rejected the messages: {exc}", detail={"param": "messages"}) from None
    return render_chat_fallback(messages)


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
