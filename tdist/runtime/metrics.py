"""Prometheus metrics of one worker: requests, errors, in-flight, latency — per operator."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class WorkerMetrics:
    """A registry of its own per worker (operators may register collectors on `registry`)."""

    def __init__(self, worker: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["worker", "operator"]
        self.requests = Counter("tdist_requests", "Requests finished, by status", labels + ["status"], registry=self.registry)
        self.inflight = Gauge("tdist_inflight_requests", "Requests executing now", labels, registry=self.registry)
        self.latency = Histogram(
            "tdist_request_latency_seconds",
            "Time from pull to final response",
            labels,
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.responses = Counter("tdist_responses", "Responses sent (partial and final)", labels, registry=self.registry)
        self.worker = worker
        self.port: int | None = None
        self._server: Any = None

    def serve(self, port: int) -> int:
        """Start the HTTP endpoint; port 0 picks a free one. Returns the bound port."""
        host = os.environ.get("TDIST_METRICS_HOST", "127.0.0.1")
        result = start_http_server(port, addr=host, registry=self.registry)
        if isinstance(result, tuple):
            self._server = result[0]
            self.port = int(self._server.server_port)
        else:  # older prometheus-client returns None
            self.port = port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
