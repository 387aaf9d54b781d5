"""Triton's own Prometheus metrics, served through the worker's metrics port.

A custom collector that, at each scrape of the worker's endpoint, reads Triton's metrics
(its loopback endpoint with a short timeout, or the in-process server's text) and re-exposes
its families under Triton's names (nv_inference_*, nv_cpu_*, ...; counters as untyped so no
`_total` is appended). A failed read yields nothing (the worker's own metrics still answer).
"""

from __future__ import annotations

import logging
import urllib.request
from typing import Any, Callable, Iterator

log = logging.getLogger("tdist.triton")


def fetch_url(url: str, timeout_s: float = 1.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.read().decode("utf-8", "replace")


class TritonMetricsCollector:
    """`fetch()` returns Triton's metrics text (an HTTP read, or the in-process server's call)."""

    def __init__(self, fetch: Callable[[], str | None]) -> None:
        self.fetch = fetch

    def describe(self) -> list[Any]:
        return []  # names are only known at scrape time; nothing to check for collisions

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = self.fetch()
        except Exception as exc:
            log.debug("Triton metrics unavailable: %s", exc)
            return
        if not text:
            return
        try:
            for family in text_string_to_metric_families(text):
                yield _keep_triton_names(family, text)
        except Exception as exc:  # a partial/garbled scrape must not break the worker's endpoint
            log.debug("Triton metrics unparsable: %s", exc)


def _keep_triton_names(family: Any, text: str) -> Any:
    """The parser renames counter samples to `<name>_total`; Triton's names have no suffix, and
    dashboards query them as Triton writes them, so counters are re-exposed untyped, as named."""
    if family.type != "counter" or f"\n{family.name}_total" in text:
        return family
    from prometheus_client.metrics_core import Metric

    out = Metric(family.name, family.documentation, "untyped")
    for sample in family.samples:
        name = family.name if sample.name == family.name + "_total" else sample.name
        out.add_sample(name, sample.labels, sample.value, sample.timestamp)
    return out


def register_collector(registry: Any, collector: TritonMetricsCollector) -> bool:
    try:
        registry.register(collector)
        return True
    except Exception as exc:
        log.warning("could not register Triton metrics collector: %s", exc)
        return False


def unregister_collector(registry: Any, collector: TritonMetricsCollector) -> None:
    try:
        registry.unregister(collector)
    except Exception:
        pass
