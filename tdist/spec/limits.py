"""How big a graph file may be: the limits that keep a hostile or broken file from costing more
than a moment and a few megabytes, before anything is built from it.

A graph is a few kilobytes; the largest planned (12,500 nodes × 8 GPUs, with every host listed)
is under half a megabyte. The limits below leave room for that many times over, yet stop an
alias-expansion file (a few hundred bytes that expand to billions of nodes), a multi-gigabyte
file, or a 100,000-deep nesting before the parser, the line tracking or pydantic walk them.

Three of them can be raised by environment variable, for the rare graph that needs more (they
apply to every command that reads a graph: validate, plan, deploy). The others are fixed: no
valid graph comes near them. docs/security.md lists them all with what the user sees.

The schema bounds (replicas, instances, TP/PP sizes, nodes, GPUs) live here too, so the models,
the checks and the docs share one number each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_MAX_BYTES = "TDIST_GRAPH_MAX_BYTES"
ENV_MAX_DEPTH = "TDIST_GRAPH_MAX_DEPTH"
ENV_MAX_NODES = "TDIST_GRAPH_MAX_NODES"

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
"""File size in bytes (graph file and layout file each)."""
DEFAULT_MAX_DEPTH = 64
"""Nesting of mappings and sequences, aliases expanded (a graph needs about 8)."""
DEFAULT_MAX_NODES = 250_000
"""YAML nodes (scalars, mappings, sequences) once every alias is expanded."""
MAX_DEPTH_CEILING = 200
"""TDIST_GRAPH_MAX_DEPTH cannot go past this: the line tracking and pydantic recurse per level."""

MAX_INT_DIGITS = 64
"""Characters in an integer literal (an int64 has 19 digits); longer ones are refused unconverted."""
MAX_ERRORS_SHOWN = 100
"""Problems listed for one file; the rest are counted ("... and 3,000 more")."""

# schema bounds: 12,500 nodes × 8 GPUs (100,000 GPU processes) fit with room to spare
MAX_NODES = 100_000
MAX_GPUS_PER_NODE = 256
MAX_CLUSTER_GPUS = 1_048_576
"""nodes × gpus_per_node: the placement keeps one counter per GPU."""
MAX_CPUS_PER_NODE = 4096
MAX_CLUSTER_CPUS = 16_777_216
"""nodes × cpus_per_node: CPU engines get core lists per node."""
MAX_REPLICAS = 100_000
MAX_INSTANCES = 100_000
MAX_PARALLEL_SIZE = 1024
"""tp_size and pp_size each."""
MAX_PROCESSES = 131_072
"""All processes of a graph together (replicas + instances × ranks): the placement and the plan visit
each (100,000 take about 1 s to check and 3 s to plan)."""


class LimitSettingError(ValueError):
    """An environment variable meant to change a limit holds something that is not a limit."""

    def __init__(self, name: str, value: str, rule: str, default: int) -> None:
        self.name, self.value, self.rule, self.default = name, value, rule, default
        super().__init__(f"{name}={value!r}: {rule}")


@dataclass(frozen=True)
class Limits:
    """The configurable limits in force for one read."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    max_nodes: int = DEFAULT_MAX_NODES


def _env_int(name: str, default: int, ceiling: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip().replace("_", "")
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise LimitSettingError(name, raw, "must be a positive whole number", default)
    value = int(text)
    if ceiling is not None and value > ceiling:
        raise LimitSettingError(name, raw, f"must be at most {ceiling}", default)
    return value


def current_limits() -> Limits:
    """The limits from the environment (defaults where unset); LimitSettingError on a bad value."""
    return Limits(
        max_bytes=_env_int(ENV_MAX_BYTES, DEFAULT_MAX_BYTES),
        max_depth=_env_int(ENV_MAX_DEPTH, DEFAULT_MAX_DEPTH, MAX_DEPTH_CEILING),
        max_nodes=_env_int(ENV_MAX_NODES, DEFAULT_MAX_NODES),
    )
