"""The team-wide convention for text requests, as pure parsing (no engine, no operator):
`tdist infer --prompt`, the router, the OpenAI frontend and the engine operators all speak it.

* request: `parameters["prompt"]` (str) or `parameters["messages"]` (chat, list of
  {role, content}) or `inputs["prompt_token_ids"]` (int array); sampling in parameters:
  `max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos, min_tokens,
  presence_penalty, frequency_penalty, repetition_penalty`.
* every streamed response: `parameters["text"]` (the delta), `outputs["token_ids"]` (int64
  delta ids); the final one adds `parameters["finish_reason"]` and
  `parameters["usage"] = {"prompt_tokens", "completion_tokens"}`.

Apart from llm_common.py (the engine interface and operator loop), so the router and the
frontend parse requests without importing the engine side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from tdist.errors import BadRequest

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
