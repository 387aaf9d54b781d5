"""The operator (`kind: frontend`, `protocol: kserve`): parameters, HTTP + gRPC servers, stats.

Kept apart from the protocols so its life cycle (bind, report ports, stop) reads on one page.
"""

from __future__ import annotations

import logging
from typing import Any

from tdist.errors import BadRequest, OperatorLoadError
from tdist.operators.frontends.guards import FrontendLimits
from tdist.operators.frontends.kserve.core import KServeCore
from tdist.operators.frontends.kserve.grpc import KServeGRPC
from tdist.operators.frontends.kserve.http import KServeHTTP
from tdist.runtime.operator import Operator, OperatorContext, Request, current_client

log = logging.getLogger("tdist.kserve")


class KServeFrontend(Operator):
    """Serves KServe v2 over HTTP and gRPC; infer requests become RemoteOperator calls."""

    def __init__(self, context: OperatorContext) -> None:
        super().__init__(context)
        p = self.parameters
        self.host = str(p.get("host") or "127.0.0.1")
        self.http_port = int(p.get("http_port", p.get("port", 8000)))
        grpc_port = p.get("grpc_port", 8001)
        self.grpc_port = None if grpc_port is None else int(grpc_port)
        self.timeout_s = float(p.get("request_timeout_s") or 60.0)
        self.known = list(context.config.targets) + list(p.get("models") or [])
        try:
            self.limits = FrontendLimits.of(p, "kserve", request_timeout_s=self.timeout_s)
        except ValueError as exc:
            raise OperatorLoadError(f"KServe frontend {self.name!r}: {exc}") from None
        #: clients reach the targets and `models` only (every operator when there are no targets:
        #: a frontend built by hand; the graph always gives targets)
        self.reachable = self.known if context.config.targets else None
        self.core: KServeCore | None = None
        self.http: KServeHTTP | None = None
        self.grpc: KServeGRPC | None = None
        self.bound: dict[str, int] = {}

    async def start(self) -> None:
        client = self.context.client or current_client.get()
        if client is None:
            raise RuntimeError("KServe frontend needs the worker's request client")
        self.core = KServeCore(client, known=self.known, timeout_s=self.timeout_s, exclude=[self.name],
                               reachable=self.reachable, limits=self.limits)
        self.http = KServeHTTP(self.core, self.limits)
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
            "max_body_bytes": self.limits.max_body_bytes,
        }
