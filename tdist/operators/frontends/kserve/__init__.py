"""KServe v2 frontend (`kind: frontend`, `parameters.protocol: kserve`): HTTP (aiohttp) and gRPC.

Unchanged `tritonclient.http` / `tritonclient.grpc` clients talk to a tdist deployment through
it: server live/ready/metadata, model metadata/ready/config and the repository index for
every operator of the deployment (from discovery), and infer routed with
`RemoteOperator(model_name)`. HTTP speaks JSON and the binary tensor extension; gRPC uses
tritonclient's generated protos (raw and typed contents, plus ModelStreamInfer for operators
that stream partial responses).

Parameters: host (127.0.0.1), http_port (or port; 8000), grpc_port (8001; null disables gRPC),
request_timeout_s (60), models (names answered with 503 rather than 404 while no worker
serves them; `targets` count too), max_body_bytes (64 MiB, HTTP and gRPC), max_deadline_s
(request_timeout_s), allowed_parameters (any but internal ones), cors_origins (none),
max_concurrent_requests (none; past it 429 / RESOURCE_EXHAUSTED). Port 0
picks a free port; the bound ports are logged ("KServe frontend listening: ...") and reported
by stats().

Only the targets and `models` are models: other operators of the deployment answer 404 (a
frontend built without targets, which a graph never yields, serves every operator). Hostile
input is refused early (guards.py): 413 from Content-Length before reading, 415 for form/text
bodies, 400 for shapes, datatypes and element counts (checked before any allocation), for
internal or unlisted parameters and non-finite deadlines.

Model metadata/config come from each operator's discovery entry: an operator whose stats()
carries `model_metadata` / `model_config` (TritonCoreOperator does: Triton's own answers) is
described exactly; others get their name, `platform: tdist_<kind>` and no declared tensors.
Errors: unknown model → 404 / NOT_FOUND; no ready worker or the request plane down → 503 /
UNAVAILABLE; a full work queue → 429 / RESOURCE_EXHAUSTED with Retry-After; BadRequest →
400 / INVALID_ARGUMENT; too large → 413 / RESOURCE_EXHAUSTED; timeout → 504 /
DEADLINE_EXCEEDED; operator failure → 500 / INTERNAL.

Layout: codec.py (tensors ↔ JSON/raw bytes, pure), core.py (models from discovery, infer),
http.py, grpc.py (the two protocols), frontend.py (the operator). This package re-exports
them so `tdist.operators.frontends.kserve:KServeFrontend` (the operator loader) and the
helpers tests use keep one import path.
"""

from tdist.operators.frontends.kserve.codec import (
    KSERVE_TO_NUMPY,
    KServeError,
    bad,
    deserialize_bytes,
    kserve_datatype,
    numpy_of,
    serialize_bytes,
    tensor_from_json,
    tensor_from_raw,
    tensor_to_json,
    tensor_to_raw,
    wire_parameters,
)
from tdist.operators.frontends.kserve.core import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    InferResult,
    KServeCore,
    ModelInfo,
    select_outputs,
)
from tdist.operators.frontends.kserve.frontend import KServeFrontend
from tdist.operators.frontends.kserve.grpc import KServeGRPC, grpc_inputs, grpc_response, make_grpc_servicer
from tdist.operators.frontends.kserve.http import HEADER_LEN, KServeHTTP, parse_http_infer, render_http_infer

__all__ = [
    "EXTENSIONS",
    "HEADER_LEN",
    "KSERVE_TO_NUMPY",
    "SERVER_NAME",
    "SERVER_VERSION",
    "InferResult",
    "KServeCore",
    "KServeError",
    "KServeFrontend",
    "KServeGRPC",
    "KServeHTTP",
    "ModelInfo",
    "bad",
    "deserialize_bytes",
    "grpc_inputs",
    "grpc_response",
    "kserve_datatype",
    "make_grpc_servicer",
    "numpy_of",
    "parse_http_infer",
    "render_http_infer",
    "select_outputs",
    "serialize_bytes",
    "tensor_from_json",
    "tensor_from_raw",
    "tensor_to_json",
    "tensor_to_raw",
    "wire_parameters",
]
