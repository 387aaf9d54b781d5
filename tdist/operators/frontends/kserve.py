"""KServe v2 frontend (`kind: frontend`, `parameters.protocol: kserve`): HTTP (aiohttp) and gRPC.

Unchanged `tritonclient.http` / `tritonclient.grpc` clients talk to a tdist deployment through
it: server live/ready/metadata, model metadata/ready/config and the repository index for
every operator of the deployment (from discovery), and infer routed with
`RemoteOperator(model_name)`. HTTP speaks JSON and the binary tensor extension; gRPC uses
tritonclient's generated protos (raw and typed contents, plus ModelStreamInfer for operators
that stream partial responses).

Parameters: host (127.0.0.1), http_port (or port; 8000), grpc_port (8001; null disables gRPC),
request_timeout_s (60), models (names answered with 503 rather than 404 while no worker
serves them; `targets` count too). Port 0 picks a free port; the bound ports are logged
("KServe frontend listening: ...") and reported by stats().

Model metadata/config come from each operator's discovery entry: an operator whose stats()
carries `model_metadata` / `model_config` (TritonCoreOperator does: Triton's own answers) is
described exactly; others get their name, `platform: tdist_<kind>` and no declared tensors.
Errors: unknown model → 404 / NOT_FOUND; no ready worker → 503 / UNAVAILABLE; BadRequest →
400 / INVALID_ARGUMENT; timeout → 504 / DEADLINE_EXCEEDED; operator failure → 500 / INTERNAL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np

from tdist.errors import BadRequest, NoWorkerError, OperatorLoadError, RequestError, RequestTimeout
from tdist.runtime.operator import Operator, OperatorContext, RemoteOperator, Request, current_client

log = logging.getLogger("tdist.kserve")

SERVER_NAME = "tdist"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "parameters"]
HEADER_LEN = "Inference-Header-Content-Length"

# ---------------------------------------------------------------- datatypes (pure)

_BF16: Any = None
try:
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover
    pass

KSERVE_TO_NUMPY = {
    "BOOL": np.dtype(bool), "INT8": np.dtype("int8"), "INT16": np.dtype("int16"), "INT32": np.dtype("int32"),
    "INT64": np.dtype("int64"), "UINT8": np.dtype("uint8"), "UINT16": np.dtype("uint16"),
    "UINT32": np.dtype("uint32"), "UINT64": np.dtype("uint64"), "FP16": np.dtype("float16"),
    "FP32": np.dtype("float32"), "FP64": np.dtype("float64"), "BYTES": np.dtype(object),
}  # fmt: skip
if _BF16 is not None:
    KSERVE_TO_NUMPY["BF16"] = _BF16


class KServeError(Exception):
    """An error answer: HTTP status + gRPC status code name + message."""

    def __init__(self, http_status: int, grpc_code: str, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc_code
        self.message = message


def bad(message: str) -> KServeError:
    return KServeError(400, "INVALID_ARGUMENT", message)


def kserve_datatype(arr: np.ndarray) -> str:
    if arr.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    if _BF16 is not None and arr.dtype == _BF16:
        return "BF16"
    for name, dt in KSERVE_TO_NUMPY.items():
        if name not in ("BYTES", "BF16") and dt == arr.dtype:
            return name
    raise KServeError(500, "INTERNAL", f"output dtype {arr.dtype} has no KServe datatype")


def numpy_of(datatype: str) -> np.dtype:
    try:
        return KSERVE_TO_NUMPY[datatype]
    except KeyError:
        raise bad(f"unsupported datatype {datatype!r}; use one of {', '.join(KSERVE_TO_NUMPY)}") from None


def serialize_bytes(arr: np.ndarray) -> bytes:
    """BYTES tensor → 4-byte little-endian length + payload per element (KServe/Triton raw form)."""
    parts = []
    for item in arr.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def deserialize_bytes(data: bytes, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(data):
            raise bad("truncated BYTES tensor")
        (n,) = struct.unpack_from("<I", data, pos)
        out[i] = bytes(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if pos != len(data):
        raise bad("BYTES tensor has trailing data")
    return out


def tensor_from_raw(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if datatype == "BYTES":
        return deserialize_bytes(raw, count).reshape(shape)
    dt = numpy_of(datatype)
    if len(raw) != count * dt.itemsize:
        raise bad(f"raw data is {len(raw)} bytes; {datatype}{shape} needs {count * dt.itemsize}")
    return np.frombuffer(raw, dtype=dt.newbyteorder("<") if dt.itemsize > 1 else dt).reshape(shape).astype(dt)


def tensor_to_raw(arr: np.ndarray) -> bytes:
    if arr.dtype.kind in ("O", "S", "U"):
        return serialize_bytes(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


def tensor_from_json(datatype: str, shape: list[int], data: Any) -> np.ndarray:
    if datatype == "BYTES":
        flat = np.array(data, dtype=object).reshape(-1)
        out = np.empty(flat.size, dtype=object)
        for i, x in enumerate(flat):
            out[i] = x.encode() if isinstance(x, str) else bytes(x)
        return out.reshape(shape)
    dt = numpy_of(datatype)
    try:
        arr = np.array(data, dtype=np.float32 if datatype == "BF16" else dt)
        return arr.astype(dt).reshape(shape)
    except (ValueError, TypeError) as exc:
        raise bad(f"data does not fit {datatype}{shape}: {exc}") from None


def tensor_to_json(arr: np.ndarray) -> list[Any]:
    if arr.dtype.kind in ("O", "S", "U"):
        out = []
        for x in arr.reshape(-1):
            if isinstance(x, (bytes, bytearray)):
                try:
                    x = bytes(x).decode()
                except UnicodeDecodeError:
                    x = bytes(x).decode("latin-1")
            out.append(str(x))
        return out
    if _BF16 is not None and arr.dtype == _BF16:
        arr = arr.astype(np.float32)
    return arr.reshape(-1).tolist()


def wire_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Response parameters a KServe client can read (scalars only)."""
    return {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))}


# ---------------------------------------------------------------- protocol-independent core


@dataclass
class ModelInfo:
    name: str
    kind: str = "python"
    ready: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def versions(self) -> list[str]:
        return [str(v) for v in self.metadata.get("versions") or ["1"]]

    def metadata_json(self) -> dict[str, Any]:
        md = self.metadata
        return {
            "name": self.name,
            "versions": self.versions,
            "platform": md.get("platform") or f"tdist_{self.kind}",
            "inputs": [{"name": i["name"], "datatype": i["datatype"], "shape": [int(s) for s in i["shape"]]} for i in md.get("inputs", [])],
            "outputs": [{"name": o["name"], "datatype": o["datatype"], "shape": [int(s) for s in o["shape"]]} for o in md.get("outputs", [])],
        }

    def config_json(self) -> dict[str, Any]:
        if self.config:
            return dict(self.config, name=self.name)
        return {"name": self.name, "platform": f"tdist_{self.kind}", "max_batch_size": 0, "input": [], "output": []}


@dataclass
class InferResult:
    model: str
    version: str
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]


class KServeCore:
    """What both protocols answer; `client` is a RequestClient (or a fake with workers()/infer())."""

    def __init__(self, client: Any, *, known: list[str] | None = None, timeout_s: float = 60.0, exclude: list[str] | None = None) -> None:
        self.client = client
        self.known = set(known or [])
        self.exclude = set(exclude or [])
        self.timeout_s = timeout_s
        self.started_at = time.time()
        self.requests = 0
        self.errors = 0

    async def models(self) -> dict[str, ModelInfo]:
        out: dict[str, ModelInfo] = {n: ModelInfo(n) for n in self.known if n not in self.exclude}
        entries = await self.client.workers()
        for entry in entries.values():
            kinds = entry.get("kinds", {})
            per_op = entry.get("per_operator", {})
            for name in entry.get("operators", []):
                kind = kinds.get(name, "python")
                if kind == "frontend" or name in self.exclude:
                    continue
                info = out.setdefault(name, ModelInfo(name, kind))
                info.kind = kind
                stats = (per_op.get(name) or {}).get("stats") or {}
                if stats.get("model_metadata") and not info.metadata:
                    info.metadata = dict(stats["model_metadata"])
                if stats.get("model_config") and not info.config:
                    info.config = dict(stats["model_config"])
                info.ready = info.ready or entry.get("state") == "ready"
        self.known.update(n for n in out)  # once seen, a model gone missing answers 503, not 404
        return out

    async def model(self, name: str, version: str | None = None) -> ModelInfo:
        info = (await self.models()).get(name)
        if info is None:
            raise KServeError(404, "NOT_FOUND", f"Request for unknown model: '{name}' is not found")
        if version and info.metadata and version not in info.versions:
            raise KServeError(404, "NOT_FOUND", f"Request for unknown model: '{name}' version {version} is not found")
        return info

    async def infer_stream(
        self, name: str, version: str | None, inputs: dict[str, np.ndarray], parameters: dict[str, Any], request_id: str | None
    ) -> AsyncIterator[InferResult]:
        """Every response of the operator (partials, then the final), as KServe results."""
        info = await self.model(name, version)
        self.requests += 1
        timeout_s = float(parameters.pop("timeout_s", self.timeout_s))
        if "timeout" in parameters:  # KServe/Triton request parameter, in microseconds
            try:
                timeout_s = float(parameters.pop("timeout")) / 1e6
            except (TypeError, ValueError):
                raise bad("request parameter 'timeout' must be microseconds (a number)") from None
        try:
            async for resp in RemoteOperator(name, client=self.client).async_infer(inputs, parameters, timeout_s=timeout_s):
                outs = {k: (v if isinstance(v, np.ndarray) else np.asarray(v)) for k, v in resp.outputs.items()}
                yield InferResult(name, version or info.versions[-1], outs, wire_parameters(resp.parameters))
        except KServeError:
            self.errors += 1
            raise
        except NoWorkerError as exc:
            self.errors += 1
            raise KServeError(503, "UNAVAILABLE", exc.render()) from None
        except BadRequest as exc:
            self.errors += 1
            raise KServeError(400, "INVALID_ARGUMENT", exc.render()) from None
        except RequestTimeout as exc:
            self.errors += 1
            raise KServeError(504, "DEADLINE_EXCEEDED", exc.render()) from None
        except RequestError as exc:
            self.errors += 1
            raise KServeError(500, "INTERNAL", exc.render()) from None

    async def infer(self, name: str, version: str | None, inputs: dict[str, np.ndarray], parameters: dict[str, Any], request_id: str | None) -> InferResult:
        """Non-streaming: outputs of all responses merged (later ones win), the final's parameters."""
        merged: InferResult | None = None
        async for r in self.infer_stream(name, version, inputs, parameters, request_id):
            if merged is None:
                merged = r
            else:
                merged.outputs.update(r.outputs)
                merged.parameters.update(r.parameters)
        assert merged is not None
        return merged


def select_outputs(result: InferResult, requested: list[str]) -> dict[str, np.ndarray]:
    if not requested:
        return result.outputs
    missing = [n for n in requested if n not in result.outputs]
    if missing:
        raise bad(f"model '{result.model}' has no output(s) {missing}; it returned {sorted(result.outputs)}")
    return {n: result.outputs[n] for n in requested}


# ---------------------------------------------------------------- HTTP


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


# ---------------------------------------------------------------- gRPC

_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def _param_value(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _set_param(target: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        target[key].bool_param = value
    elif isinstance(value, int):
        target[key].int64_param = value
    elif isinstance(value, float):
        target[key].double_param = value
    else:
        target[key].string_param = str(value)


def grpc_inputs(request: Any) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise bad(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    for i, t in enumerate(request.inputs):
        shape = [int(s) for s in t.shape]
        if raw:
            inputs[t.name] = tensor_from_raw(t.datatype, shape, raw[i])
            continue
        fname = _CONTENTS_FIELD.get(t.datatype)
        if fname is None:
            raise bad(f"input '{t.name}': {t.datatype} must be sent as raw_input_contents")
        values = list(getattr(t.contents, fname))
        if t.datatype == "BYTES":
            arr = np.empty(len(values), dtype=object)
            arr[:] = [bytes(v) for v in values]
            inputs[t.name] = arr.reshape(shape)
        else:
            inputs[t.name] = tensor_from_json(t.datatype, shape, values)
    return inputs


def grpc_response(pb: Any, request: Any, result: InferResult) -> Any:
    outputs = select_outputs(result, [o.name for o in request.outputs])
    resp = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=request.id)
    for k, v in result.parameters.items():
        _set_param(resp.parameters, k, v)
    for name, arr in outputs.items():
        resp.outputs.add(name=name, datatype=kserve_datatype(arr), shape=list(arr.shape))
        resp.raw_output_contents.append(tensor_to_raw(arr))
    return resp


def _grpc_params(request: Any) -> dict[str, Any]:
    return {k: _param_value(v) for k, v in request.parameters.items()}


def make_grpc_servicer(core: KServeCore) -> Any:
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    async def abort(context: Any, exc: KServeError) -> None:
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)

    class Servicer(pbg.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:
            return pb.ServerReadyResponse(ready=True)

        async def ServerMetadata(self, request: Any, context: Any) -> Any:
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

        async def ModelReady(self, request: Any, context: Any) -> Any:
            try:
                info = await core.model(request.name, request.version or None)
            except KServeError as exc:
                await abort(context, exc)
            return pb.ModelReadyResponse(ready=info.ready)

        async def ModelMetadata(self, request: Any, context: Any) -> Any:
            try:
                info = await core.model(request.name, request.version or None)
            except KServeError as exc:
                await abort(context, exc)
            md = info.metadata_json()
            resp = pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"])
            for src, dst in ((md["inputs"], resp.inputs), (md["outputs"], resp.outputs)):
                for t in src:
                    dst.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            return resp

        async def ModelConfig(self, request: Any, context: Any) -> Any:
            try:
                info = await core.model(request.name, request.version or None)
            except KServeError as exc:
                await abort(context, exc)
            config = model_config_pb2.ModelConfig()
            json_format.ParseDict(info.config_json(), config, ignore_unknown_fields=True)
            return pb.ModelConfigResponse(config=config)

        async def RepositoryIndex(self, request: Any, context: Any) -> Any:
            resp = pb.RepositoryIndexResponse()
            for m in (await core.models()).values():
                resp.models.add(name=m.name, version=m.versions[-1], state="READY" if m.ready else "UNAVAILABLE")
            return resp

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            try:
                inputs = grpc_inputs(request)
                result = await core.infer(request.model_name, request.model_version or None, inputs, _grpc_params(request), request.id)
                return grpc_response(pb, request, result)
            except KServeError as exc:
                await abort(context, exc)

        async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
            async for request in request_iterator:
                try:
                    inputs = grpc_inputs(request)
                    async for result in core.infer_stream(
                        request.model_name, request.model_version or None, inputs, _grpc_params(request), request.id
                    ):
                        yield pb.ModelStreamInferResponse(infer_response=grpc_response(pb, request, result))
                except KServeError as exc:
                    yield pb.ModelStreamInferResponse(error_message=exc.message)

    return Servicer()


class KServeGRPC:
    def __init__(self, core: KServeCore) -> None:
        self.core = core
        self.server: Any = None

    async def start(self, host: str, port: int) -> int:
        import grpc
        from tritonclient.grpc import service_pb2_grpc as pbg

        opts = [
            ("grpc.max_receive_message_length", 1 << 30),
            ("grpc.max_send_message_length", 1 << 30),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
        ]
        self.server = grpc.aio.server(options=opts)
        pbg.add_GRPCInferenceServiceServicer_to_server(make_grpc_servicer(self.core), self.server)
        bound = self.server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot bind gRPC port {host}:{port}")
        await self.server.start()
        return int(bound)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
            self.server = None


# ---------------------------------------------------------------- the operator


class KServeFrontend(Operator):
    """Serves KServe v2 over HTTP and gRPC; infer requests become RemoteOperator calls."""

    def __init__(self, context: OperatorContext) -> None:
        super().__init__(context)
        p = self.parameters
        self.host = str(p.get("host") or "127.0.0.1")
        self.http_port = int(p.get("http_port", p.get("port", 8000)))
        grpc_port = p.get("grpc_port", 8001)
        self.grpc_port = None if grpc_port is None else int(grpc_port)
        self.timeout_s = float(p.get("request_timeout_s", 60.0))
        self.known = list(context.config.targets) + list(p.get("models") or [])
        self.core: KServeCore | None = None
        self.http: KServeHTTP | None = None
        self.grpc: KServeGRPC | None = None
        self.bound: dict[str, int] = {}

    async def start(self) -> None:
        client = self.context.client or current_client.get()
        if client is None:
            raise RuntimeError("KServe frontend needs the worker's request client")
        self.core = KServeCore(client, known=self.known, timeout_s=self.timeout_s, exclude=[self.name])
        self.http = KServeHTTP(self.core)
        try:
            self.bound["http"] = await self.http.start(self.host, self.http_port)
        except OSError as exc:
            await self.http.stop()
            raise OperatorLoadError(
                f"KServe frontend {self.name!r} cannot listen on {self.host}:{self.http_port} (HTTP): {exc.strerror or exc}; "
                "pick another `port:` (0: a free one)"
            ) from None
        if self.grpc_port is not None:
            self.grpc = KServeGRPC(self.core)
            try:
                self.bound["grpc"] = await self.grpc.start(self.host, self.grpc_port)
            except BaseException as exc:
                await self.grpc.stop()
                await self.http.stop()
                if isinstance(exc, (OSError, RuntimeError)):
                    raise OperatorLoadError(
                        f"KServe frontend {self.name!r} cannot listen on {self.host}:{self.grpc_port} (gRPC): {exc}; "
                        "pick another `parameters.grpc_port` (0: a free one, null: no gRPC)"
                    ) from None
                raise
        self.logger.info(
            "KServe frontend listening: http=%s:%s grpc=%s",
            self.host,
            self.bound["http"],
            f"{self.host}:{self.bound['grpc']}" if "grpc" in self.bound else "off",
        )

    async def execute(self, request: Request) -> None:
        raise BadRequest("the KServe frontend serves HTTP/gRPC clients; send requests to a model operator", operator=self.name)

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
        if self.http is not None:
            await self.http.stop()

    def stats(self) -> dict[str, Any]:
        return {
            "protocol": "kserve",
            "host": self.host,
            "http_port": self.bound.get("http"),
            "grpc_port": self.bound.get("grpc"),
            "requests": self.core.requests if self.core else 0,
            "errors": self.core.errors if self.core else 0,
        }
