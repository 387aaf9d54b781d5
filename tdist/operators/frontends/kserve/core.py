"""What both KServe protocols answer: the model list from discovery, and infer routed to operators.

Protocol-independent so HTTP and gRPC give the same answers and errors; `client` is a
RequestClient or a test fake with workers()/infer().
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np

from tdist.errors import BadRequest, NoWorkerError, Overloaded, PayloadTooLarge, RequestError, RequestPlaneDown, RequestTimeout
from tdist.operators.frontends.guards import DEFAULT_MAX_BODY_BYTES, Admission, ClientError, FrontendLimits
from tdist.operators.frontends.kserve.codec import KServeError, bad, wire_parameters
from tdist.runtime.operator import RemoteOperator
from tdist.runtime.planes.discovery_entry import WorkerEntry

SERVER_NAME = "tdist"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "parameters"]


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
    """What both protocols answer; `client` is a RequestClient (or a fake with workers()/infer()).

    `reachable`: the only operators clients may see and call (the frontend's targets and
    `models`); None — a frontend built without targets, which the graph never yields — serves
    every operator of the deployment.
    """

    def __init__(self, client: Any, *, known: list[str] | None = None, timeout_s: float = 60.0, exclude: list[str] | None = None,
                 reachable: list[str] | None = None, limits: FrontendLimits | None = None) -> None:
        self.client = client
        self.known = set(known or [])
        self.exclude = set(exclude or [])
        self.reachable = set(reachable) if reachable else None
        self.timeout_s = timeout_s
        self.limits = limits or FrontendLimits(DEFAULT_MAX_BODY_BYTES["kserve"], timeout_s)
        self.admission = Admission(self.limits.max_concurrent_requests)
        self.started_at = time.time()
        self.requests = 0
        self.errors = 0

    def check_reachable(self, name: str) -> None:
        """404 for an operator outside the frontend's targets, before anything else is done."""
        if name in self.exclude or (self.reachable is not None and name not in self.reachable):
            raise KServeError(404, "NOT_FOUND", f"Request for unknown model: '{name}' is not found")

    async def models(self) -> dict[str, ModelInfo]:
        out: dict[str, ModelInfo] = {n: ModelInfo(n) for n in self.known if n not in self.exclude}
        entries = await self.client.workers()
        for data in entries.values():
            entry = WorkerEntry.read(data)
            if entry is None:
                continue
            for name in entry.operators:
                kind = entry.kinds.get(name, "python")
                if kind == "frontend" or name in self.exclude or (self.reachable is not None and name not in self.reachable):
                    continue
                info = out.setdefault(name, ModelInfo(name, kind))
                info.kind = kind
                stats = entry.stats_of(name)
                if stats.get("model_metadata") and not info.metadata:
                    info.metadata = dict(stats["model_metadata"])
                if stats.get("model_config") and not info.config:
                    info.config = dict(stats["model_config"])
                info.ready = info.ready or entry.state == "ready"
        self.known.update(n for n in out)  # once seen, a model gone missing answers 503, not 404
        return out

    async def model(self, name: str, version: str | None = None) -> ModelInfo:
        self.check_reachable(name)
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
        parameters, timeout_s = self.client_parameters(parameters)
        try:
            self.admission.__enter__()  # held until the last response: 429 past max_concurrent_requests
        except ClientError as exc:
            raise KServeError(429, "RESOURCE_EXHAUSTED", exc.message) from None
        self.requests += 1
        try:
            async for resp in RemoteOperator(name, client=self.client).async_infer(inputs, parameters, timeout_s=timeout_s):
                outs = {k: (v if isinstance(v, np.ndarray) else np.asarray(v)) for k, v in resp.outputs.items()}
                yield InferResult(name, version or info.versions[-1], outs, wire_parameters(resp.parameters))
        except KServeError:
            self.errors += 1
            raise
        except (NoWorkerError, RequestPlaneDown) as exc:  # nobody to run it / nothing stored it: retry later
            self.errors += 1
            raise KServeError(503, "UNAVAILABLE", exc.render()) from None
        except Overloaded as exc:  # the work queue is full: 429 with Retry-After
            self.errors += 1
            raise KServeError(429, "RESOURCE_EXHAUSTED", exc.render()) from None
        except PayloadTooLarge as exc:
            self.errors += 1
            raise KServeError(413, "RESOURCE_EXHAUSTED", exc.render()) from None
        except BadRequest as exc:
            self.errors += 1
            raise KServeError(400, "INVALID_ARGUMENT", exc.render()) from None
        except RequestTimeout as exc:
            self.errors += 1
            raise KServeError(504, "DEADLINE_EXCEEDED", exc.render()) from None
        except RequestError as exc:
            self.errors += 1
            raise KServeError(500, "INTERNAL", exc.render()) from None
        finally:
            self.admission.__exit__()

    def client_parameters(self, parameters: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """(parameters passed to the operator, deadline in seconds) from a client's parameters.

        The deadline comes from `timeout` (KServe/Triton: microseconds) or `timeout_s`, capped by
        max_deadline_s; what is internal to the deployment or outside allowed_parameters is a 400.
        """
        params = dict(parameters)
        timeout_s = self.timeout_s
        try:
            if "timeout_s" in params:
                timeout_s = self.limits.deadline(params.pop("timeout_s"), self.timeout_s, param="timeout_s")
            if "timeout" in params:  # KServe/Triton request parameter, in microseconds
                us = params.pop("timeout")
                if isinstance(us, bool) or not isinstance(us, (int, float)):
                    raise bad("request parameter 'timeout' must be microseconds (a number)")
                try:
                    seconds: Any = us / 1e6
                except OverflowError:  # an integer beyond any float: deadline() caps or refuses it
                    seconds = us
                timeout_s = self.limits.deadline(seconds, self.timeout_s, param="timeout")
            return self.limits.check_parameters(params), min(timeout_s, self.limits.max_deadline_s)
        except ClientError as exc:
            raise KServeError(exc.status, "INVALID_ARGUMENT", exc.message) from None

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
