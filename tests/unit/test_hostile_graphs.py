"""Hostile and broken graph files through the real entry point (`tdist validate FILE`, in process):
each is exit 2 with a message naming the rule, never a traceback, within bounded memory — on
libyaml's parser and on PyYAML's own (the fallback when libyaml is not installed).
Limits and messages: docs/security.md."""

from __future__ import annotations

import os
import textwrap
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tdist.errors import SpecError, SpecErrors
from tdist.spec import limits as L
from tdist.spec import load_graph, parse_graph, source

try:  # tests/unit is a rootdir-less test folder; also importable as a package
    from test_cli_spec import run_main
except ImportError:  # pragma: no cover
    from tests.unit.test_cli_spec import run_main

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = sorted(str(p) for p in (ROOT / "graphs").glob("*.yaml"))


GOOD = """\
name: g
operators:
  - {name: a, implementation: "mod:A"}
workers:
  - {name: w, operators: [a]}
"""
SECRET = "hunter2-0a9f"
PEAK_BYTES = 48 * 1024 * 1024  # generous: each of these is refused within a few MB


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "name: bomb\n" + "\n".join(lines) + "\n"


def _block_nesting(levels: int) -> str:
    return "name: g\nx:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, levels)) + "  " * levels + "v: 1\n"


def _alias_depth() -> str:
    """Each anchor 30 deep, wrapping the previous one: 120 levels once the aliases are expanded."""
    lines = ["name: g", "a0: &a0 " + "[" * 30 + "1" + "]" * 30]
    for i in range(1, 4):
        lines.append(f"a{i}: &a{i} " + "[" * 30 + f"*a{i - 1}" + "]" * 30)
    return "\n".join(lines) + "\n"


def _with_layout(layout_file: str) -> str:
    return textwrap.dedent(f"""\
        name: t
        llm:
          engine: trtllm
          model: some/model
          layout_file: {layout_file}
        operators: [{{name: router, kind: router}}]
        workers: [{{name: router, operators: [router]}}]
        cluster: {{gpus_per_node: 4}}
        """)


def _layout(content: bytes | str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / "layout.yaml").write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def _symlink_out(d: Path) -> None:
    outside = d.parent / f"{d.name}-outside.yaml"
    outside.write_text(f"context_servers: {{num_instances: 1}}\n# {SECRET}\n")
    os.symlink(outside, d / "layout.yaml")


@dataclass
class Case:
    id: str
    graph: bytes | str
    says: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    hidden: str | None = None  # must not appear in the output (a layout file's content)


CASES = [
    Case("alias-bomb", _bomb(), ("expands to more than 250,000 YAML nodes", "TDIST_GRAPH_MAX_NODES")),
    Case("alias-in-its-own-anchor", "name: g\nx: &x [1, *x]\n", ("alias inside its own anchor",)),
    Case("non-utf8", b"name: g\ndescription: caf\xe9\n", ("bad.yaml:2:17", "not UTF-8 text", "0xe9")),
    Case("utf16", "name: g\n".encode("utf-16"), ("not UTF-8 text",)),
    Case("control-character", "name: g\x07\n", ("character #x0007 is not allowed in YAML",)),
    Case("deep-flow-nesting", "name: g\nx: " + "[" * 5000 + "]" * 5000 + "\n", ("nesting deeper than 64 levels",)),
    Case("deep-block-nesting", _block_nesting(100), ("nesting deeper than 64 levels", "TDIST_GRAPH_MAX_DEPTH")),
    Case("deep-through-aliases", _alias_depth(), ("nesting deeper than 64 levels once the alias is expanded",)),
    Case("5000-digit-integer", GOOD.replace("operators: [a]", "operators: [a], replicas: " + "9" * 5000),
         ("bad.yaml:5:", "integer literal longer than 64 characters", "5,000 characters")),
    Case("bad-date", GOOD + "description: 2001-13-45\n", ("a date or time is not a graph value", "quote it")),
    Case("date-in-parameters", GOOD.replace('"mod:A"', '"mod:A", parameters: {when: 2001-01-01}'), ("a date or time is not a graph value",)),
    Case("set-in-parameters", GOOD.replace('"mod:A"', '"mod:A", parameters: {s: !!set {x, y}}'), ("a set (!!set) is not a graph value",)),
    Case("explicit-tag", GOOD.replace("operators: [a]", "operators: [a], replicas: !!int \"\""), ("cannot read this value as !!int",)),
    Case("bool-tag", GOOD + "description: !!bool maybe\n", ("cannot read this value as !!bool",)),
    Case("huge-file", "name: g\ndescription: " + "x" * (L.DEFAULT_MAX_BYTES + 10) + "\n",
         ("larger than the limit of 4,194,304 bytes", "TDIST_GRAPH_MAX_BYTES")),
    Case("small-byte-limit", GOOD, ("larger than the limit of 50 bytes",), env={L.ENV_MAX_BYTES: "50"}),
    Case("bad-limit-setting", GOOD, ("TDIST_GRAPH_MAX_NODES must be a positive whole number",),
         env={L.ENV_MAX_NODES: "lots"}),
    Case("infinite-timeout", GOOD + "request_plane: {default_timeout_s: .inf}\n", ("request_plane.default_timeout_s", "finite")),
    Case("escape-sequence-in-key", GOOD + '"\\e]0;owned\\a\\e[31mzz": 1\n', ("unknown key", "\\x1b[31mzz"), hidden="\x1b"),
    Case("many-errors", GOOD + "".join(f"zz{i}: 1\n" for i in range(500)), ("more problems than the 100 shown", "400 more")),
    # trailing newlines: a `$`-anchored re.match would let each through
    Case("newline-graph-name", GOOD.replace("name: g\n", 'name: "g\\n"\n'), ("name: String should match pattern",)),
    Case("newline-block-name", GOOD.replace("name: g\n", "name: |\n  g\n"), ("name: String should match pattern",)),
    Case("newline-worker-name", GOOD.replace("{name: w,", '{name: "w\\n",'), ("workers[0].name: String should match pattern",)),
    Case("newline-implementation", GOOD.replace('"mod:A"', '"mod:A\\n"'), ("operators[0].implementation: String should match",)),
    Case("newline-env-name", GOOD + 'env: {"A\\n": x}\n', ("not a valid environment variable name",)),
    Case("newline-nats-url", GOOD + 'request_plane: "nats://h:4222\\n"\n', ("request_plane: must be", "nats://h:4222\\n")),
    Case("newline-etcd-endpoint", GOOD + 'discovery: {kind: etcd, etcd_endpoints: ["http://e:2379\\n"]}\n',
         ("discovery.etcd_endpoints", "must look like http://host:2379")),
    Case("newline-time-limit", GOOD + 'launch: {srun: {time_limit: "01:00:00\\n"}}\n', ("launch.srun.time_limit: String should match",)),
    Case("newline-server-url", _with_layout("layout.yaml").replace("  engine: trtllm\n",
         '  engine: trtllm\n  servers: {urls: ["h:8000\\n"]}\n'), ("llm.servers.urls: urls[0] must be host:port",),
         setup=_layout("{}\n")),
    # schema bounds
    Case("replicas-bound", GOOD.replace("operators: [a]", "operators: [a], replicas: 100001"),
         ("workers[0].replicas: Input should be less than or equal to 100000",)),
    Case("processes-bound", GOOD.replace("workers:\n", "workers:\n  - {name: v, operators: [a], replicas: 100000}\n")
         .replace("operators: [a]}", "operators: [a], replicas: 100000}"), ("more than 131,072 processes",)),
    Case("nodes-bound", GOOD + "cluster: {nodes: 100001}\n", ("cluster.nodes: Input should be less than or equal to 100000",)),
    Case("gpus-bound", GOOD + "cluster: {nodes: 100000, gpus_per_node: 16}\n", ("nodes x gpus_per_node is 1,600,000",)),
    Case("tp-bound", _with_layout("layout.yaml"), ("layout.yaml:1:", "context_servers.tp_size: Input should be less than or equal to 1024"),
         setup=_layout("context_servers: {tp_size: 4096}\n")),
    # layout files: confined to the graph's directory (or configs/ beside it), content never shown
    Case("layout-absolute", _with_layout("/etc/passwd"), ("llm.layout_file: an absolute path",)),
    Case("layout-dotdot", _with_layout("../../../../../../etc/passwd"), ("llm.layout_file: the layout file resolves outside",)),
    Case("layout-symlink-out", _with_layout("layout.yaml"), ("resolves outside the graph's directory",), setup=_symlink_out,
         hidden=SECRET),
    Case("layout-directory", _with_layout("sub"), ("llm.layout_file: cannot read layout file (not a regular file)",), setup=lambda d: (d / "sub").mkdir()),
    Case("layout-syntax-error", _with_layout("layout.yaml"), ("layout.yaml:3:", "YAML syntax error", "<not shown"),
         setup=_layout(f"context_servers:\n  num_instances: 1\n token: [{SECRET}\n"), hidden=SECRET),
    Case("layout-not-a-mapping", _with_layout("layout.yaml"), ("a layout file must be a mapping",),
         setup=_layout(f"root $6${SECRET} 19000\n"), hidden=SECRET),
    Case("layout-shadow-line", _with_layout("layout.yaml"), ("layout.yaml:1:1: <key>: unknown key",),
         setup=_layout(f"root:$6${SECRET}:19000:0:99999:7:::\n"), hidden=SECRET),
    Case("layout-unknown-key", _with_layout("layout.yaml"), ("layout.yaml:2:3: context_servers.password: unknown key",),
         setup=_layout(f"context_servers:\n  password: {SECRET}\n"), hidden=SECRET),
    Case("layout-bad-value", _with_layout("layout.yaml"), ("layout.yaml:1:", "urls[0] must be host:port"),
         setup=_layout(f'context_servers: {{urls: ["{SECRET}"]}}\n'), hidden=SECRET),
    Case("layout-non-utf8", _with_layout("layout.yaml"), ("not UTF-8 text",), setup=_layout(b"model: " + SECRET.encode() + b"\xff\n"),
         hidden=SECRET),
    Case("layout-bomb", _with_layout("layout.yaml"), ("layout.yaml:", "expands to more than 250,000 YAML nodes"),
         setup=_layout(_bomb().replace("name: bomb\n", ""))),
]


@pytest.fixture(params=sorted(source.LOADERS))
def yaml_parser(request, monkeypatch):
    """Each case on libyaml's parser (when installed) and on PyYAML's own."""
    monkeypatch.setattr(source, "_Loader", source.LOADERS[request.param])
    return request.param


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_graph_exits_2_with_a_message(case: Case, yaml_parser, monkeypatch, capsys, tmp_path):
    graph_dir = tmp_path / "graph"
    graph_dir.mkdir()
    if case.setup:
        case.setup(graph_dir)
    path = graph_dir / "bad.yaml"
    path.write_bytes(case.graph.encode() if isinstance(case.graph, str) else case.graph)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    tracemalloc.start()
    try:
        code, out, err = run_main(monkeypatch, capsys, "validate", str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = " ".join((out + err).split())  # rich wraps long lines
    assert code == 2, text
    assert "Traceback" not in text
    assert "bad.yaml" in text or "layout.yaml" in text
    for fragment in case.says:
        assert fragment in text
    if case.hidden:
        assert case.hidden not in text
    assert peak < PEAK_BYTES, f"peak {peak / 1e6:.1f} MB"


def test_a_huge_file_is_refused_before_it_is_read(monkeypatch, capsys, tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as fh:  # 64 MiB, sparse: refused from its size, never read
        fh.truncate(64 * 1024 * 1024)
    tracemalloc.start()
    try:
        code, _out, err = run_main(monkeypatch, capsys, "validate", str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 2 and "larger than the limit" in err and "67,108,864 bytes" in " ".join(err.split())
    assert peak < 4 * 1024 * 1024


def test_a_pipe_is_read_only_up_to_the_limit(monkeypatch, tmp_path):
    """A stream (no size known in advance) stops one byte past the limit."""
    monkeypatch.setenv(L.ENV_MAX_BYTES, "1000")
    r, w = os.pipe()
    os.write(w, b"#" * 5000)
    os.close(w)
    with pytest.raises(SpecError, match="larger than the limit of 1,000 bytes"):
        load_graph(f"/dev/fd/{r}")
    os.close(r)


def test_the_shipped_graphs_still_validate(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "validate", *GRAPHS)
    assert code == 0, err
    assert out.count("ok ") == len(GRAPHS)


def test_a_limit_can_be_raised_by_environment(monkeypatch):
    deep = GOOD.replace('"mod:A"}', '"mod:A", parameters: {x: ' + "[" * 70 + "]" * 70 + "}}")
    with pytest.raises(SpecError, match="nesting deeper than 64 levels"):
        parse_graph(deep, file="g.yaml", base_dir="/base")
    monkeypatch.setenv(L.ENV_MAX_DEPTH, "100")
    assert parse_graph(deep, file="g.yaml", base_dir="/base").name == "g"
    monkeypatch.setenv(L.ENV_MAX_DEPTH, "100000")
    with pytest.raises(SpecError, match="TDIST_GRAPH_MAX_DEPTH must be at most 200"):
        parse_graph(deep, file="g.yaml", base_dir="/base")


def test_ordinary_anchors_and_merge_keys_still_work():
    text = textwrap.dedent("""\
        name: g
        operators:
          - &op {name: a, implementation: "mod:A", max_inflight_requests: 4}
          - <<: *op
            name: b
        workers:
          - name: w
            operators: [a, b]
            env: &env {A: "1"}
          - {name: v, operators: [a], env: *env}
        """)
    spec = parse_graph(text, file="g.yaml", base_dir="/base")
    assert [(o.name, o.max_inflight_requests) for o in spec.operators] == [("a", 4), ("b", 4)]
    assert spec.workers[1].env == {"A": "1"}
    # an error in a merged key points at the line that wrote it; the mapping's own keys win
    bad = text.replace("max_inflight_requests: 4", "max_inflight_requests: 0").replace("name: b\n", "name: b\n    max_inflight_requests: 2\n")
    with pytest.raises(SpecErrors) as info:
        parse_graph(bad, file="g.yaml", base_dir="/base")
    rendered = info.value.render()
    assert "g.yaml:3:" in rendered and "operators[0].max_inflight_requests" in rendered
    assert "operators[1]" not in rendered


def test_a_duplicate_key_in_an_aliased_mapping_is_reported_once():
    text = GOOD.replace("{name: w, operators: [a]}", "{name: w, operators: [a], env: &e {A: '1', A: '2'}}\n  - {name: v, operators: [a], env: *e}")
    with pytest.raises(SpecErrors) as info:
        parse_graph(text, file="g.yaml", base_dir="/base")
    assert [e.rule for e in info.value.errors] == ["duplicate key in the same mapping"]


def test_12500_nodes_of_8_gpus_are_admitted():
    text = GOOD.replace("operators: [a]}", "operators: [a], replicas: 100000, placement: {gpus: 1}}") + \
        "cluster: {nodes: 12500, gpus_per_node: 8}\n"
    spec = parse_graph(text, file="g.yaml", base_dir="/base")
    assert (spec.cluster.nodes, spec.workers[0].replicas) == (12500, 100000)


def test_layout_file_in_the_graph_dir_or_configs_beside_it(tmp_path):
    (tmp_path / "graphs" / "sub").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    layout = "context_servers: {num_instances: 1}\ngeneration_servers: {num_instances: 1}\n"
    (tmp_path / "graphs" / "sub" / "l.yaml").write_text(layout)
    (tmp_path / "configs" / "l.yaml").write_text(layout)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "l.yaml").write_text(layout)
    base = str(tmp_path / "graphs")
    for name in ("sub/l.yaml", "sub/../sub/l.yaml", "../configs/l.yaml"):
        assert parse_graph(_with_layout(name), file="t.yaml", base_dir=base).llm.context_servers.num_instances == 1
    with pytest.raises(SpecError, match="resolves outside the graph's directory"):
        parse_graph(_with_layout("../other/l.yaml"), file="t.yaml", base_dir=base)


def test_parse_graph_refuses_a_lone_surrogate():
    with pytest.raises(SpecError, match="lone surrogate"):
        parse_graph("name: g\ud800\n", file="g.yaml", base_dir="/base")


def test_alias_bomb_costs_little():
    """The figure docs/security.md quotes: the bomb is refused in well under a second."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(SpecError):
        parse_graph(_bomb(), file="g.yaml", base_dir="/base")
    assert time.perf_counter() - t0 < 10  # generous for a loaded 2-core machine; measured 0.1 s
