"""KServe v2 over HTTP (aiohttp): JSON bodies and the binary tensor extension.

Request parsing and response rendering are pure functions, apart from the aiohttp handlers;
aiohttp is imported when the server is built, so importing the frontend does not need it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

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


def parse_http_infer(body: bytes, header_length: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Request body (JSON, or JSON + binary tensors) → (request JSON, inputs)."""
    json_part, binary = (body[:header_length], body[header_length:]) if header_length is not None else (body, b"")
    try:
        req = json.loads(json_part or b"{}")
    except ValueError as exc:
        raise bad(f"request body is not JSON: {exc}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs", []), list):
        raise bad("request must be a JSON object with an 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    pos = 0
    for i, spec in enumerate(req.get("inputs", [])):
        try:
            name, datatype, shape = spec["name"], spec["datatype"], [int(s) for s in spec["shape"]]
        except (KeyError, TypeError, ValueError):
            raise bad(f"inputs[{i}] needs name, datatype and shape") from None
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            size = int(size)
            if pos + size > len(binary):
                raise bad(f"input '{name}': binary data ends after {len(binary) - pos} of {size} bytes")
            inputs[name] = tensor_from_raw(datatype, shape, binary[pos : pos + size])
            pos += size
        elif "data" in spec:
            inputs[name] = tensor_from_json(datatype, shape, spec["data"])
        else:
            raise bad(f"input '{name}' has neither data nor binary_data_size")
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


class KServeHTTP:
    def __init__(self, core: KServeCore) -> None:
        from aiohttp import web

        self.core = core
        self.web = web
        app = web.Application(client_max_size=1 << 30)
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
        return self.web.json_response({"error": exc.message}, status=exc.http_status)

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
        name, version = request.match_info["name"], request.match_info.get("version")
        try:
            hl = request.headers.get(HEADER_LEN)
            req, inputs = parse_http_infer(await request.read(), int(hl) if hl is not None else None)
            params = {k: v for k, v in (req.get("parameters") or {}).items() if k not in ("binary_data_output",)}
            result = await self.core.infer(name, version, inputs, params, req.get("id"))
            body, header_len = render_http_infer(req, result, req.get("id"))
        except KServeError as exc:
            return self._error(exc)
        if header_len is None:
            resp = self.web.Response(body=body, content_type="application/json")
        else:
            resp = self.web.Response(body=body, headers={HEADER_LEN: str(header_len)}, content_type="application/octet-stream")
        if request.headers.get("Accept-Encoding"):
            resp.enable_compression()  # gzip/deflate as the client asks (tritonclient's response_compression_algorithm)
        return resp

    async def start(self, host: str, port: int) -> int:
        self.runner = self.web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = self.web.TCPSite(self.runner, host, port)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # the bound port (port 0 → picked)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
