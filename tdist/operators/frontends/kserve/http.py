"""KServe v2 over HTTP (aiohttp): JSON bodies and the binary tensor extension.

Request parsing and response rendering are pure functions, apart from the aiohttp handlers;
aiohttp is imported when the server is built, so importing the frontend does not need it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tdist.operators.frontends.guards import (
    Admission,
    ClientError,
    FrontendLimits,
    cors_middleware,
    is_json_type,
    loads,
    media_type,
    read_body,
)
from tdist.operators.frontends.kserve.codec import (
    KServeError,
    bad,
    kserve_datatype,
    tensor_from_json,
    tensor_from_raw,
    tensor_to_json,
    tensor_to_raw,
)
from tdist.operators.frontends.kserve.core import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    InferResult,
    KServeCore,
    select_outputs,
)

HEADER_LEN = "Inference-Header-Content-Length"


def _check_request(req: Any) -> dict[str, Any]:
    """The request JSON's structure (types of id, inputs, outputs, parameters), 400 otherwise, so
    nothing after this point meets a shape it does not expect."""
    if not isinstance(req, dict):
        raise bad("request must be a JSON object with an 'inputs' list")
    if not isinstance(req.get("inputs", []), list):
        raise bad("request must be a JSON object with an 'inputs' list")
    if req.get("id") is not None and not isinstance(req["id"], str):
        raise bad("request 'id' must be a string")
    if not isinstance(req.get("parameters", {}), (dict, type(None))):
        raise bad("request 'parameters' must be an object")
    outputs = req.get("outputs", [])
    if outputs is None:
        outputs = []
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) and isinstance(o.get("parameters", {}), (dict, type(None))) for o in outputs
    ):
        raise bad("request 'outputs' must be a list of objects with a string 'name' (and optional 'parameters' object)")
    return req


def parse_http_infer(body: Any, header_length: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Request body (JSON, or JSON + binary tensors) → (request JSON, inputs). Every client
    mistake is a KServeError 400; shapes, datatypes and sizes are checked before allocation."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise bad(f"{HEADER_LEN} {header_length} does not fit a body of {len(body)} bytes")
    view = memoryview(body)
    json_part, binary = (view[:header_length], view[header_length:]) if header_length is not None else (view, view[:0])
    try:
        req = loads(bytes(json_part) or b"{}")
    except ValueError as exc:
        raise bad(f"request body is not JSON: {exc}") from None
    _check_request(req)
    inputs: dict[str, np.ndarray] = {}
    pos = 0
    for i, spec in enumerate(req.get("inputs", [])):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or "datatype" not in spec or "shape" not in spec:
            raise bad(f"inputs[{i}] needs name, datatype and shape")
        name, datatype, shape = spec["name"], spec["datatype"], spec["shape"]
        if name in inputs:
            raise bad(f"input '{name}' is given twice")
        params = spec.get("parameters")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise bad(f"input '{name}': 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise bad(f"input '{name}': binary_data_size must be a non-negative integer")
            if pos + size > len(binary):
                raise bad(f"input '{name}': binary data ends after {len(binary) - pos} of {size} bytes")
            inputs[name] = tensor_from_raw(datatype, shape, binary[pos : pos + size])
            pos += size
        elif "data" in spec:
            inputs[name] = tensor_from_json(datatype, shape, spec["data"])
        else:
            raise bad(f"input '{name}' has neither data nor binary_data_size")
    if pos != len(binary):
        raise bad(f"{len(binary) - pos} bytes of binary data follow the tensors that binary_data_size accounts for")
    return req, inputs


def render_http_infer(req: dict[str, Any], result: InferResult, request_id: str | None) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when all-JSON) for an infer answer."""
    params = req.get("parameters") or {}
    wanted = {o["name"]: (o.get("parameters") or {}) for o in req.get("outputs") or []}
    outputs = select_outputs(result, list(wanted))
    default_binary = bool(params.get("binary_data_output", False))
    out_json, blobs = [], []
    for name, arr in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": kserve_datatype(arr), "shape": list(arr.shape)}
        binary = bool(wanted.get(name, {}).get("binary_data", default_binary)) or entry["datatype"] == "BF16"
        if binary:
            raw = tensor_to_raw(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensor_to_json(arr)
        out_json.append(entry)
    body: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": out_json}
    if request_id:
        body["id"] = request_id
    if result.parameters:
        body["parameters"] = result.parameters
    header = json.dumps(body).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


#: Media types an infer body may declare: JSON, or JSON + binary tensors. No Content-Type at all
#: is accepted too: tritonclient sends none. Form and text types (what a browser may send
#: cross-site without asking) are refused with 415.
BINARY_TYPE = "application/octet-stream"


def check_content_type(mime: str | None) -> None:
    if mime is not None and mime != BINARY_TYPE and not is_json_type(mime):
        raise KServeError(415, "INVALID_ARGUMENT", f"Content-Type {mime!r} is not accepted; send application/json "
                          f"(or {BINARY_TYPE} with the binary tensor extension), e.g. curl -H 'Content-Type: application/json'")


def error_of(exc: ClientError) -> KServeError:
    return KServeError(exc.status, "RESOURCE_EXHAUSTED" if exc.status == 413 else "INVALID_ARGUMENT", exc.message)


class KServeHTTP:
    def __init__(self, core: KServeCore, limits: FrontendLimits | None = None) -> None:
        from aiohttp import web

        self.core = core
        self.web = web
        self.limits = limits or core.limits
        middlewares = [cors_middleware(self.limits.cors_origins)] if self.limits.cors_origins else []
        # aiohttp's own cap too, for any path that reads the body through aiohttp
        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=middlewares)
        r = app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_post("/v2/repository/index", self.repository_index)
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_get(prefix + "/config", self.model_config)
            r.add_post(prefix + "/infer", self.infer)
        self.app = app
        self.runner: Any = None

    def _error(self, exc: KServeError) -> Any:
        resp = self.web.json_response({"error": exc.message}, status=exc.http_status)
        if exc.http_status == 429:
            resp.headers["Retry-After"] = str(Admission.RETRY_AFTER_S)
        return resp

    async def live(self, request: Any) -> Any:
        return self.web.Response(status=200)

    async def ready(self, request: Any) -> Any:
        return self.web.Response(status=200)

    async def server_metadata(self, request: Any) -> Any:
        return self.web.json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    async def repository_index(self, request: Any) -> Any:
        models = await self.core.models()
        return self.web.json_response(
            [{"name": m.name, "version": m.versions[-1], "state": "READY" if m.ready else "UNAVAILABLE"} for m in models.values()]
        )

    async def model_metadata(self, request: Any) -> Any:
        try:
            info = await self.core.model(request.match_info["name"], request.match_info.get("version"))
        except KServeError as exc:
            return self._error(exc)
        return self.web.json_response(info.metadata_json())

    async def model_ready(self, request: Any) -> Any:
        try:
            info = await self.core.model(request.match_info["name"], request.match_info.get("version"))
        except KServeError as exc:
            return self._error(exc)
        if not info.ready:
            return self.web.json_response({"error": f"model '{info.name}' has no ready worker"}, status=400)
        return self.web.Response(status=200)

    async def model_config(self, request: Any) -> Any:
        try:
            info = await self.core.model(request.match_info["name"], request.match_info.get("version"))
        except KServeError as exc:
            return self._error(exc)
        return self.web.json_response(info.config_json())

    async def infer(self, request: Any) -> Any:
        """Checks in order of cost: the model is one of the targets (404), the Content-Type (415),
        the size (413, from Content-Length before reading), then the body itself (400)."""
        name, version = request.match_info["name"], request.match_info.get("version")
        try:
            self.core.check_reachable(name)
            check_content_type(media_type(request))
            hl = request.headers.get(HEADER_LEN)
            try:
                header_len = int(hl) if hl is not None else None
            except ValueError:
                raise bad(f"{HEADER_LEN} must be an integer (got {hl[:40]!r})") from None
            try:
                raw = await read_body(request, self.limits.max_body_bytes)
            except ClientError as exc:
                raise error_of(exc) from None
            req, inputs = parse_http_infer(raw, header_len)
            del raw
            params = {k: v for k, v in (req.get("parameters") or {}).items() if k not in ("binary_data_output",)}
            result = await self.core.infer(name, version, inputs, params, req.get("id"))
            body, header_len = render_http_infer(req, result, req.get("id"))
        except KServeError as exc:
            resp = self._error(exc)
            if exc.http_status == 413:
                resp.force_close()  # what is left of the body is discarded, then the connection closes
            return resp
        if header_len is None:
            resp = self.web.Response(body=body, content_type="application/json")
        else:
            resp = self.web.Response(body=body, headers={HEADER_LEN: str(header_len)}, content_type="application/octet-stream")
        if request.headers.get("Accept-Encoding"):
            resp.enable_compression()  # gzip/deflate as the client asks (tritonclient's response_compression_algorithm)
        return resp

    async def start(self, host: str, port: int) -> int:
        # handler_cancellation: a client that disconnects cancels its handler, hence its request
        # on the worker (RequestClient cancels what it leaves unfinished)
        self.runner = self.web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = self.web.TCPSite(self.runner, host, port)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # the bound port (port 0 → picked)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
