"""The OpenAI frontend's model names (`/v1/models`, the `model` of a request), apart from the
HTTP handling in openai.py: configured names, else the plan's served names, else what the LLM
workers publish in discovery; an unknown name is a 404 in OpenAI's shape, a non-string one a 400.
"""

from __future__ import annotations

import time
from typing import Any

from tdist.operators.frontends.openai_wire import ApiError
from tdist.runtime.planes.discovery_entry import WorkerEntry


class ModelNames:
    """Mixed into OpenAIFrontend, which sets configured_models, model_names, model_name, target,
    created, _models_checked, _lookup_error, context and logger."""

    configured_models: list[str]
    model_names: list[str]
    model_name: str
    target: str
    created: int
    _models_checked: float
    _lookup_error: str | None
    context: Any
    logger: Any

    async def refresh_models(self, *, force: bool = False) -> list[str]:
        """Served model names: configured ones, else those the LLM workers publish in discovery.

        A successful lookup is reused for 2 s; a failed or empty one is retried on the next call.
        """
        if self.configured_models:
            return self.model_names
        if not force and time.monotonic() - self._models_checked < 2.0:
            return self.model_names
        workers = getattr(self.context.client, "workers", None)
        if workers is None:
            return self.model_names
        try:
            entries = await workers(max_age_s=0.0 if force else 1.0)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            if text != self._lookup_error:  # once per distinct error, not per request
                self.logger.warning("model lookup in discovery failed (serving %s meanwhile): %s", self.model_names, text)
            self._lookup_error = text
            return self.model_names
        self._lookup_error = None
        found: list[str] = []
        for data in entries.values():
            entry = WorkerEntry.read(data)
            if entry is None:
                continue
            for op, kind in entry.kinds.items():
                if kind in ("vllm", "trtllm"):
                    name = entry.stats_of(op).get("model")
                    if isinstance(name, str) and name not in found:
                        found.append(name)
        if found:
            self._models_checked = time.monotonic()
            self.model_names = sorted(set(found) | (set(self.model_names) - {self.target}))
            self.model_name = sorted(found)[0]
        return self.model_names

    async def _check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        await self.refresh_models()
        if model is None:
            return self.model_name
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if isinstance(model, str) and model not in self.model_names:
            await self.refresh_models(force=True)  # a worker may have joined since the last look
        if not isinstance(model, str) or model not in self.model_names:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves: {', '.join(self.model_names)}",
                           param="model", code="model_not_found")
        return model

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "tdist", "root": name}

    async def handle_models(self, request: Any) -> Any:
        from aiohttp import web

        names = await self.refresh_models()
        return web.json_response({"object": "list", "data": [self._model_card(m) for m in names]})

    async def handle_model(self, request: Any) -> Any:
        from aiohttp import web

        name = request.match_info["model"]
        if name not in await self.refresh_models() and name not in await self.refresh_models(force=True):
            raise ApiError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return web.json_response(self._model_card(name))

