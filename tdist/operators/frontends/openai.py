"""`kind: frontend, protocol: openai` — an OpenAI-compatible HTTP server in front of the router.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming with
`stream: true`, usage counts, `stream_options.include_usage`), GET /health. Each HTTP request
becomes one tdist request to the target (the router) in the team's LLM convention
(parameters.prompt | parameters.messages + sampling; streamed `text` deltas). Chat templates
are applied by the engine worker, which has the tokenizer (plain fallback when none).

Errors are OpenAI-shaped (openai_wire.py), `{"error": {"message", "type", "param", "code"}}`:
400 bad parameters, a body that is not application/json, not strict JSON or with a
deployment-internal field (`kv_transfer_params`, ...); 401 no or wrong API key; 404 unknown
model or route; 413 a body over max_body_bytes (refused from Content-Length before it is read)
or a request over the request plane's max_payload; 429 over max_concurrent_requests or a full work
queue (Overloaded, with Retry-After); 503 no worker or the request plane down; 504 deadline;
500 otherwise. A client that disconnects mid-stream cancels the request all the way to the engine.
Limits: guards.py, docs/security.md.

Parameters: host (127.0.0.1), port (8000; 0 picks a free one — the bound port is logged as
"OpenAI frontend listening on http://HOST:PORT", returned by stats() and, with `port_file`,
written to that file), target (default: targets[0]), served_model_name (default: the served
names the deployment's vLLM / TensorRT-LLM workers publish, else the target name; `model_names`
adds aliases), request_timeout_s (600), default_max_tokens (16 for
completions; chat: until EOS or `default_chat_max_tokens`, 512), max_body_bytes (4 MiB),
allowed_parameters (the sampling fields passed through; default SAMPLING_FIELDS), cors_origins
(none), max_concurrent_requests (none; past it 429 with Retry-After), api_key_env (none; with it
requests need `Authorization: Bearer <key>`, 401 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from tdist.errors import OperatorLoadError
from tdist.operators.frontends import guards
from tdist.operators.frontends.guards import Admission, ClientError, FrontendLimits, is_json_type, media_type, read_body
from tdist.operators.frontends.openai_models import ModelNames
from tdist.operators.frontends.openai_wire import (
    CLIENT_ERROR_CODES,
    FINISH,
    SAMPLING_FIELDS,
    ApiError,
    api_error_of,
    parse_body,
    sse,
    stream_flags,
    usage_of,
)
from tdist.operators.llm.convention import parse_sampling
from tdist.runtime.operator import Operator, OperatorContext, Request

LISTEN_LINE = "OpenAI frontend listening on"

class OpenAIFrontend(ModelNames, Operator):
    """See the module doc. The HTTP server lives as long as the operator (start → stop)."""

    def __init__(self, context: OperatorContext) -> None:
        super().__init__(context)
        p = self.parameters
        targets = list(context.config.targets)
        self.target = str(p.get("target") or (targets[0] if targets else ""))
        if not self.target:
            raise OperatorLoadError(f"frontend {self.name!r} needs targets: [<router>] (or parameters.target)")
        self.host = str(p.get("host", "127.0.0.1"))
        self.port = int(p.get("port", 8000))
        self.port_file = p.get("port_file")
        configured = p.get("served_model_name") or p.get("model")
        #: Names given in the YAML; when none, the served names of the deployment's LLM operators
        #: (their discovery stats) are used, and the target's name as a last resort.
        self.configured_models = ([str(configured)] if configured else []) + [str(m) for m in p.get("model_names", [])]
        #: The LLM operators' served names from the plan (tdist/plan/build.py); discovery adds more.
        self.planned_models = [str(m) for m in p.get("served_models", [])]
        self.model_names = list(self.configured_models) or list(self.planned_models) or [self.target]
        self.model_name = self.model_names[0]
        self._models_checked = 0.0
        self._lookup_error: str | None = None  # the last discovery lookup's error (warned once)
        self.request_timeout_s = float(p.get("request_timeout_s") or 600.0)
        try:
            self.limits = FrontendLimits.of(p, "openai", request_timeout_s=self.request_timeout_s)
        except ValueError as exc:
            raise OperatorLoadError(f"OpenAI frontend {self.name!r}: {exc}") from None
        try:
            self.api_key = guards.api_key_of(p)
        except ValueError as exc:
            raise OperatorLoadError(f"OpenAI frontend {self.name!r}: {exc}") from None
        self.admission = Admission(self.limits.max_concurrent_requests)
        #: request fields passed through to the engine (allowed_parameters narrows or names them)
        self.pass_through = tuple(sorted(self.limits.allowed_parameters)) if self.limits.allowed_parameters is not None \
            else SAMPLING_FIELDS
        self.default_max_tokens = int(p.get("default_max_tokens", 16))
        self.default_chat_max_tokens = int(p.get("default_chat_max_tokens", 512))
        self.created = int(time.time())
        self._runner: Any = None
        self.bound_port: int | None = None
        self.counts = {"requests": 0, "errors": 0, "inflight": 0, "streams": 0}

    # -- life cycle ---------------------------------------------------------------------------

    def make_app(self) -> Any:
        try:
            from aiohttp import web
        except ModuleNotFoundError:
            raise OperatorLoadError("the OpenAI frontend needs aiohttp: pip install 'tdist[frontend]'") from None
        @web.middleware
        async def errors(request: Any, handler: Any) -> Any:
            return await self._error_middleware(request, handler)

        middlewares = [errors] + ([guards.cors_middleware(self.limits.cors_origins)] if self.limits.cors_origins else [])
        app = web.Application(middlewares=middlewares, client_max_size=self.limits.max_body_bytes)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/v1/models/{model}", self.handle_model)
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/health", self.handle_health)
        return app

    async def start(self) -> None:
        from aiohttp import web

        app = self.make_app()
        # handler_cancellation: a client that disconnects cancels its handler, hence the request.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = int(sockets[0].getsockname()[1]) if sockets else self.port
        if self.port_file:
            Path(str(self.port_file)).write_text(str(self.bound_port))
        self.logger.info("%s %s (target %s, model %s)", LISTEN_LINE, self.url, self.target, self.model_name)
        print(f"{LISTEN_LINE} {self.url}", flush=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.bound_port or self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def execute(self, request: Request) -> None:
        """Over the request plane a frontend only says where it listens."""
        await request.send(parameters={"url": self.url, "port": self.bound_port, "models": self.model_names}, final=True)

    def stats(self) -> dict[str, Any]:
        return {"url": self.url, "port": self.bound_port, "target": self.target, "models": self.model_names, **self.counts}

    # -- plumbing -----------------------------------------------------------------------------

    async def _error_middleware(self, request: Any, handler: Any) -> Any:
        from aiohttp import web

        try:
            if request.method != "OPTIONS" and request.path != "/health":  # probes and CORS preflights need no key
                guards.check_api_key(request, self.api_key)
            return await handler(request)
        except ClientError as exc:
            resp = web.json_response(ApiError(exc.status, exc.message, param=exc.param, code=CLIENT_ERROR_CODES.get(exc.status)).body(),
                                     status=exc.status)
            if exc.status == 413:
                resp.force_close()  # what is left of the body is discarded, then the connection closes
            if exc.status == 429:
                resp.headers["Retry-After"] = str(Admission.RETRY_AFTER_S)
            return resp
        except web.HTTPException as exc:
            if exc.status >= 400:
                err = ApiError(exc.status, exc.reason or "error", code="not_found" if exc.status == 404 else None)
                return web.json_response(err.body(), status=err.status)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = api_error_of(exc)
            self.counts["errors"] += 1
            if err.status >= 500:
                self.logger.warning("%s %s → %d: %s", request.method, request.path, err.status, err.message)
            resp = web.json_response(err.body(), status=err.status)
            if err.status == 429:
                resp.headers["Retry-After"] = str(Admission.RETRY_AFTER_S)
            return resp

    async def _json_body(self, request: Any) -> dict[str, Any]:
        """The body as a JSON object: application/json (400 otherwise, as OpenAI answers), at most
        max_body_bytes (413, refused from Content-Length before reading), strict JSON, no
        internal fields."""
        if not is_json_type(media_type(request)):
            raise ApiError(400, "Content-Type must be application/json", code="invalid_content_type")
        return parse_body(await read_body(request, self.limits.max_body_bytes))

    def _sampling_params(self, body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
        refused = [k for k in SAMPLING_FIELDS if body.get(k) is not None and k not in self.pass_through]
        if refused:
            raise ApiError(400, f"'{refused[0]}' is not allowed by this frontend (allowed_parameters)", param=refused[0])
        params: dict[str, Any] = {k: body[k] for k in self.pass_through if body.get(k) is not None}
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        params["max_tokens"] = max_tokens if max_tokens is not None else (
            self.default_chat_max_tokens if chat else self.default_max_tokens
        )
        n = body.get("n", 1)
        if n not in (1, None):
            raise ApiError(400, "only n=1 is supported", param="n")
        if body.get("best_of") not in (None, 1):
            raise ApiError(400, "best_of is not supported", param="best_of")
        if body.get("echo"):
            raise ApiError(400, "echo is not supported", param="echo")
        if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        parse_sampling(params)  # validate here: a 400 without a round trip to a worker
        return params

    def _generate(self, parameters: dict[str, Any]) -> AsyncIterator[Any]:
        return self.context.remote(self.target).async_infer(parameters=parameters, timeout_s=self.request_timeout_s)

    async def _collect(self, parameters: dict[str, Any]) -> tuple[str, str, dict[str, int]]:
        texts: list[str] = []
        finish, usage = "stop", {"prompt_tokens": 0, "completion_tokens": 0}
        stream = self._generate(parameters)
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for resp in stream:
                texts.append(str(resp.parameters.get("text", "")))
                if resp.final:
                    finish = FINISH.get(str(resp.parameters.get("finish_reason", "stop")), "stop")
                    usage = dict(resp.parameters.get("usage") or usage)
        return "".join(texts), finish, usage_of(usage)

    # -- handlers -----------------------------------------------------------------------------

    async def handle_health(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"status": "ok", "target": self.target})

    async def handle_completions(self, request: Any) -> Any:
        body = await self._json_body(request)
        model = await self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "give exactly one prompt per request (a list of one string is accepted)", param="prompt")
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        return await self._answer(request, body, model, {"prompt": prompt, **self._sampling_params(body, chat=False)}, chat=False)

    async def handle_chat(self, request: Any) -> Any:
        body = await self._json_body(request)
        model = await self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        return await self._answer(request, body, model, {"messages": messages, **self._sampling_params(body, chat=True)}, chat=True)

    async def _answer(self, request: Any, body: dict[str, Any], model: str, params: dict[str, Any], *, chat: bool) -> Any:
        """One completion (text or chat), whole or as SSE, in OpenAI's shapes."""
        stream, include_usage = stream_flags(body)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def head(kind: str) -> dict[str, Any]:
            return {"id": rid, "object": kind, "created": created, "model": model}

        with self.admission:  # 429 past max_concurrent_requests
            return await self._respond(request, params, stream, include_usage, head, obj, chat)

    async def _respond(self, request: Any, params: dict[str, Any], stream: bool, include_usage: bool, head: Any, obj: str,
                       chat: bool) -> Any:
        from aiohttp import web

        self.counts["requests"] += 1
        self.counts["inflight"] += 1
        try:
            if not stream:
                text, finish, usage = await self._collect(params)
                choice: dict[str, Any] = {"index": 0, **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
                choice.update(logprobs=None, finish_reason=finish)
                return web.json_response({**head(obj), "choices": [choice], "usage": usage})
            chunk_obj = f"{obj}.chunk" if chat else obj
            first = [True]

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                if chat:
                    delta: dict[str, Any] = {}
                    if first[0]:
                        delta["role"] = "assistant"
                        first[0] = False
                    if text or finish is None:
                        delta["content"] = text
                    piece: dict[str, Any] = {"index": 0, "delta": delta}
                else:
                    piece = {"index": 0, "text": text}
                piece.update(logprobs=None, finish_reason=finish)
                return {**head(chunk_obj), "choices": [piece]}

            def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
                return {**head(chunk_obj), "choices": [], "usage": usage}

            return await self._stream(request, params, chunk, usage_chunk, include_usage)
        finally:
            self.counts["inflight"] -= 1

    async def _stream(self, request: Any, params: dict[str, Any], chunk: Any, usage_chunk: Any, include_usage: bool) -> Any:
        """SSE: one event per delta; the last carries finish_reason; optional usage; [DONE].

        The first response is awaited before the 200 header goes out, so an error that
        happens before any token (bad request, no worker) still gets its proper status.
        """
        from aiohttp import web

        self.counts["streams"] += 1
        gen = self._generate(params)
        async with contextlib.aclosing(gen):  # type: ignore[type-var]
            try:
                first = await gen.__anext__()
            except StopAsyncIteration:
                first = None
            resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            try:
                item = first
                while item is not None:
                    text = str(item.parameters.get("text", ""))
                    if item.final:
                        finish = FINISH.get(str(item.parameters.get("finish_reason", "stop")), "stop")
                        usage = dict(item.parameters.get("usage") or usage)
                        await resp.write(sse(chunk(text, finish)))
                        break
                    if text:
                        await resp.write(sse(chunk(text, None)))
                    try:
                        item = await gen.__anext__()
                    except StopAsyncIteration:
                        item = None
                if include_usage:
                    await resp.write(sse(usage_chunk(usage_of(usage))))
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception as exc:  # headers are out: report in-band, as OpenAI does
                err = api_error_of(exc)
                self.counts["errors"] += 1
                await resp.write(sse(err.body()))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
