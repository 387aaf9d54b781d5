"""Property-based fuzzing of the graph loader (hypothesis, in process): whatever the bytes or text,
`load_graph` / `parse_graph` return a valid spec or raise SpecError / SpecErrors with a message —
never another exception.

Inputs start from the shipped graphs and layout files and are mutated: bytes (flips, inserts of
YAML-significant fragments, deletions, repeats), and the parsed data (values, keys, nesting,
shared subtrees that the dumper writes as anchors and aliases, cycles). About 1,000 examples per
target, no deadline; the whole module runs in about 20 s on two cores.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdist.errors import SpecError, SpecErrors
from tdist.spec import GraphSpec, load_graph, parse_graph

ROOT = Path(__file__).resolve().parents[2]
GRAPH_FILES = sorted((ROOT / "graphs").glob("*.yaml"))
LAYOUT_FILES = sorted((ROOT / "configs").glob("*.yaml"))
SEEDS = [p.read_bytes() for p in GRAPH_FILES]
LAYOUT_SEEDS = {p.name: p.read_bytes() for p in LAYOUT_FILES}
SEED_DATA = [yaml.safe_load(b) for b in SEEDS]

FUZZ = settings(max_examples=1000, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

FRAGMENTS = [
    b"&a ", b"*a", b"<<: *a\n", b"<<: [*a, *b]\n", b"&b [*a, *a, *a]", b"[", b"]", b"{", b"}", b": ", b"- ", b"? ",
    b"\n  ", b"\n", b"\t", b"'", b'"', b"\\", b"#", b"|", b">-", b"---\n", b"...\n", b"%YAML 1.1\n", b"%TAG ! tag:x,2000:\n",
    b"!!python/object/apply:os.system ['true']", b"!!binary AAAA", b"!!int ", b"!!float ", b"!!set ", b"!!omap ", b"!custom ",
    b"9" * 90, b"0x" + b"f" * 80, b"0b" + b"1" * 80, b"1:2:3:4:5:6:7", b"2001-13-45", b"2001-02-29t25:61:61Z", b".inf", b"-.nan",
    b"~", b"null", b"yes", b"\xff", b"\xc3", b"\x00", b"\x07", "\ufeff".encode(), "\u2028".encode(), b"\r", b"\r\n",
    b"replicas: 100001", b"num_instances: 99999999999", b"tp_size: 0", b"nodes: -1", b'name: "x\\n"', b"layout_file: /etc/passwd",
    b"layout_file: ../../../etc/hostname", b"layout_file: .", b"layout_file: disagg_multi_node.yaml", b"kind: frontend",
]


@st.composite
def mutated_bytes(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few byte-level edits; one in ten is random bytes instead."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["value", "value", "value", "insert", "insert", "delete", "repeat", "flip"]))
        pos = draw(st.integers(0, len(data)))
        if op == "value":  # a value replaced: the fragment stands alone after "key: "
            starts = [i + 2 for i in range(len(data) - 1) if data[i:i + 2] == b": "]
            if starts:
                start = draw(st.sampled_from(starts))
                end = data.find(b"\n", start)
                data[start:len(data) if end < 0 else end] = draw(st.sampled_from(FRAGMENTS))
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(FRAGMENTS) | st.binary(max_size=4))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 40))]
        elif op == "repeat":
            chunk = data[pos:pos + draw(st.integers(1, 60))]
            data[pos:pos] = chunk * draw(st.integers(1, 4))
        elif data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
    return bytes(data)


def _places(node: Any) -> list[tuple[Any, Any]]:
    """(container, key-or-index) of every value in a parsed document."""
    out: list[tuple[Any, Any]] = []
    stack, seen = [node], set()
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        items = list(cur.items()) if isinstance(cur, dict) else list(enumerate(cur)) if isinstance(cur, list) else []
        for k, v in items:
            out.append((cur, k))
            stack.append(v)
    return out


SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
           | st.sampled_from(["", "embedded", "etcd", "frontend", "router", "vllm", "trtllm", "kserve", "mod:C", "x\n", "0-3",
                              "nats://h:4222", "localhost:8000", "KIND_GPU", "../configs/disagg_multi_node.yaml"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=6)
KEYS = st.text(max_size=12) | st.integers() | st.none() | st.booleans() | st.sampled_from(
    ["name", "kind", "operators", "workers", "replicas", "replcas", "parameters", "llm", "servers", "cluster", "nodes",
     "gpus_per_node", "layout_file", "tp_size", "tensor_parallel_size", "placement", "gpu_ids", "env", "targets", "port"])


@st.composite
def mutated_data(draw: st.DrawFn) -> str:
    """A shipped graph with its data mutated, dumped back to YAML (shared subtrees become aliases)."""
    data = copy.deepcopy(draw(st.sampled_from(SEED_DATA)))
    for _ in range(draw(st.integers(1, 5))):
        places = _places(data)
        if not places:
            break
        container, key = draw(st.sampled_from(places))
        op = draw(st.sampled_from(["value", "value", "value", "key", "key", "delete", "nest", "share", "share", "cycle"]))
        if op == "value":
            container[key] = draw(VALUES)
        elif op == "key" and isinstance(container, dict):
            container[draw(KEYS)] = container.pop(key)
        elif op == "delete":
            del container[key]
        elif op == "nest":
            container[key] = draw(st.sampled_from([[container[key]], {"x": container[key]}, {key if isinstance(key, str) else "k": container[key]}]))
        elif op == "share":  # the same object twice: safe_dump writes &id001 / *id001
            other_container, other_key = draw(st.sampled_from(places))
            container[key] = other_container[other_key]
        elif op == "cycle" and isinstance(container[key], (dict, list)):
            inner = container[key]
            if isinstance(inner, dict):
                inner["loop"] = container
            else:
                inner.append(container)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _outcome(load) -> None:  # noqa: ANN001
    """A spec, or a SpecError/SpecErrors with a message; any other exception fails the test."""
    try:
        spec = load()
    except SpecErrors as exc:
        assert exc.errors and all(e.render().strip() for e in exc.errors)
    except SpecError as exc:
        assert exc.render().strip() and exc.rule
    else:
        assert isinstance(spec, GraphSpec)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """graphs/ and configs/ side by side, as the repository ships them."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "graphs").mkdir()
    (root / "configs").mkdir()
    for name, content in LAYOUT_SEEDS.items():
        (root / "configs" / name).write_bytes(content)
    return root


@FUZZ
@given(data=st.data())
def test_load_graph_on_mutated_and_random_files(project: Path, data: st.DataObject) -> None:
    graph = data.draw(mutated_bytes(SEEDS), label="graph")
    layout_name = data.draw(st.sampled_from(sorted(LAYOUT_SEEDS)), label="layout file")
    layout = data.draw(st.none() | mutated_bytes([LAYOUT_SEEDS[layout_name]]), label="mutated layout")
    (project / "graphs" / "g.yaml").write_bytes(graph)
    if layout is not None:
        (project / "configs" / layout_name).write_bytes(layout)
    try:
        _outcome(lambda: load_graph(project / "graphs" / "g.yaml"))
    finally:
        if layout is not None:  # writes are slow here: only the mutated file is written, then restored
            (project / "configs" / layout_name).write_bytes(LAYOUT_SEEDS[layout_name])


@FUZZ
@given(text=mutated_data() | st.text(alphabet=st.sampled_from(list(":-[]{},&*!|>'\"#?\n  \tab01.~%@`")), max_size=120))
def test_parse_graph_on_mutated_data_and_random_text(project: Path, text: str) -> None:
    _outcome(lambda: parse_graph(text, file="g.yaml", base_dir=os.fspath(project / "graphs")))


def test_the_seeds_themselves_load() -> None:
    """The fuzzing starts from valid graphs (a mutation is then what makes one invalid)."""
    for path in GRAPH_FILES:
        assert isinstance(load_graph(path), GraphSpec)
