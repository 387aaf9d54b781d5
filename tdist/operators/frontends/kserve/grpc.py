"""KServe v2 over gRPC with tritonclient's generated protos (raw and typed contents, streaming).

grpc and tritonclient are imported when the server is built, so importing the frontend does not
need them. (Inside this module `import grpc` is the grpcio package: imports are absolute.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tdist.operators.frontends.kserve.codec import (
    KServeError,
    bad,
    element_count,
    kserve_datatype,
    tensor_from_json,
    tensor_from_raw,
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
        if t.name in inputs:
            raise bad(f"input '{t.name}' is given twice")
        if raw:
            inputs[t.name] = tensor_from_raw(t.datatype, shape, raw[i])
            continue
        fname = _CONTENTS_FIELD.get(t.datatype)
        if fname is None:
            raise bad(f"input '{t.name}': {t.datatype} must be sent as raw_input_contents")
        values = list(getattr(t.contents, fname))
        if t.datatype == "BYTES":
            if len(values) != element_count(shape):
                raise bad(f"input '{t.name}': {len(values)} BYTES elements; the shape {shape} says {element_count(shape)}")
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
    def __init__(self, core: KServeCore, *, max_message_bytes: int | None = None) -> None:
        self.core = core
        #: gRPC refuses a bigger request itself (RESOURCE_EXHAUSTED) before handing it to us
        self.max_message_bytes = max_message_bytes or core.limits.max_body_bytes
        self.server: Any = None

    async def start(self, host: str, port: int) -> int:
        import grpc
        from tritonclient.grpc import service_pb2_grpc as pbg

        opts = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", 1 << 30),  # answers: what the operators return
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
