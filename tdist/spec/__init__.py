"""The graph YAML, validated: `load_graph(path) -> GraphSpec` (raises SpecError / SpecErrors)."""

from tdist.spec.loader import format_path, load_graph, parse_graph
from tdist.spec.models import GraphSpec, LLMSpec, OperatorSpec, ServerSetSpec, WorkerSpec

__all__ = [
    "GraphSpec",
    "LLMSpec",
    "OperatorSpec",
    "ServerSetSpec",
    "WorkerSpec",
    "format_path",
    "load_graph",
    "parse_graph",
]
