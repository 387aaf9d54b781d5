"""Cross-field checks: rules that relate several parts of a graph.

Each check returns `Problem`s (never raises) so one run reports everything a user must fix.
Pure: no I/O, no imports of operator code.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterator

from tdist.spec.limits import MAX_PROCESSES
from tdist.spec.models import GraphSpec
from tdist.spec.operators import (
    LLM_KINDS,
    FrontendOperatorSpec,
    FrontendParameters,
    OperatorSpec,
    RouterOperatorSpec,
    protocol_of_parameter,
)
from tdist.spec.placement import (
    LOCAL_HOSTS,
    build_layout,
    processes_per_instance,
    server_engine,
    server_operator_name,
)
from tdist.spec.problem import Problem

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: `$` would let "NAME\n" through


def _did_you_mean(name: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"declare {what} {name!r}, or use one of: {', '.join(known) or '(none declared)'}"


def operator_names(spec: GraphSpec) -> list[str]:
    """Declared operators plus the ones LLM server sets create."""
    names = [op.name for op in spec.operators]
    for key, _role, s in spec.llm.server_sets() if spec.llm else []:
        name = server_operator_name(key, s)
        if name not in names:
            names.append(name)
    return names


def _check_names(spec: GraphSpec) -> Iterator[Problem]:
    for what, items in (("operators", spec.operators), ("workers", spec.workers)):
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            if item.name in seen:
                yield Problem((what, i, "name"), item.name, f"duplicate name (also {what}[{seen[item.name]}])",
                              "give every entry its own name")
            seen.setdefault(item.name, i)
    workers = {w.name for w in spec.workers}
    for key, _role, s in spec.llm.server_sets() if spec.llm else []:
        name = server_operator_name(key, s)
        if name in workers:
            yield Problem(("llm", key), name, f"LLM server processes are named {name!r}.i, which a worker already uses",
                          f"rename the worker, or set llm.{key}.operator")


def _check_operator_fields(spec: GraphSpec, i: int, op: OperatorSpec) -> Iterator[Problem]:
    """What one operator's model cannot say alone (the union already rejects another kind's keys)."""
    loc = ("operators", i)
    if op.kind == "python" and not op.implementation:
        yield Problem(loc, op.name, "a python operator needs `implementation`",
                      'add implementation: "module:Class" (the module on python_path)')
    if op.kind == "triton" and not op.repository:
        yield Problem(loc, op.name, "a triton operator needs `repository`",
                      "add repository: path/to/model_repository (relative to the YAML)")
    if op.kind == "frontend":
        for key in sorted(op.parameters.model_fields_set):
            protocols = protocol_of_parameter(key)
            if protocols is not None and op.protocol not in protocols:
                yield Problem(loc + ("parameters", key), op.protocol, f"{key!r} only applies to protocol {' / '.join(protocols)}",
                              f"remove {key!r} or set protocol: {protocols[0]}", True)
    if op.kind == "router":
        targets = op.targets or default_targets(spec, op)
        for key in ("context_target", "generation_target"):
            name = getattr(op.parameters, key)
            if name is not None and name not in targets:
                yield Problem(loc + ("parameters", key), name, "not one of the router's targets",
                              _did_you_mean(name, targets, "a target"))


def _check_operators(spec: GraphSpec) -> Iterator[Problem]:
    known = operator_names(spec)
    llm_model = spec.llm.model if spec.llm else None
    templates = {server_operator_name(k, s) for k, _r, s in (spec.llm.server_sets() if spec.llm else [])}
    for i, op in enumerate(spec.operators):
        yield from _check_operator_fields(spec, i, op)
        if op.kind in LLM_KINDS and not op.model and not (op.name in templates and llm_model):
            yield Problem(("operators", i), op.name, f"a {op.kind} operator needs a model",
                          "add model: path/or/hub-id to the operator (or llm.model)")
        for j, t in enumerate(op.targets if isinstance(op, (RouterOperatorSpec, FrontendOperatorSpec)) else []):
            if t == op.name:
                yield Problem(("operators", i, "targets", j), t, "an operator cannot target itself", "name another operator")
            elif t not in known:
                yield Problem(("operators", i, "targets", j), t, "unknown operator", _did_you_mean(t, known, "an operator"))
        if isinstance(op, (RouterOperatorSpec, FrontendOperatorSpec)) and not op.targets and not default_targets(spec, op):
            yield Problem(("operators", i), op.name, f"a {op.kind} needs `targets` (nothing to forward to)",
                          "add targets: [operator, ...]" + (" or an llm section" if op.kind == "router" else ""))


def default_targets(spec: GraphSpec, op: OperatorSpec) -> list[str]:
    """What a router/frontend forwards to when `targets` is empty (mirrored by the plan)."""
    llm_ops = [server_operator_name(k, s) for k, _r, s in (spec.llm.server_sets() if spec.llm else [])]
    if op.kind == "router":
        return llm_ops
    routers = [o.name for o in spec.operators if o.kind == "router"]
    if len(routers) == 1:
        return routers
    return llm_ops if not routers else []


def _check_workers(spec: GraphSpec) -> Iterator[Problem]:
    known = [op.name for op in spec.operators]
    hosted: Counter[str] = Counter()
    templates = {server_operator_name(k, s) for k, _r, s in (spec.llm.server_sets() if spec.llm else [])}
    cluster = spec.cluster
    for i, w in enumerate(spec.workers):
        for j, name in enumerate(w.operators):
            if name in templates and name not in known:
                yield Problem(("workers", i, "operators", j), name, "this operator is an LLM server set; llm places its processes",
                              "remove it from the worker (tune the set under llm instead)")
            elif name not in known:
                yield Problem(("workers", i, "operators", j), name, "unknown operator", _did_you_mean(name, known, "an operator"))
            elif w.operators.index(name) != j:
                yield Problem(("workers", i, "operators", j), name, "operator listed twice in one worker", "list it once")
            elif name in templates:
                yield Problem(("workers", i, "operators", j), name, "operator is both a worker's and an LLM server set's",
                              "host it in one place: remove it from the worker or from llm")
            hosted[name] += 1
        pl = w.placement
        loc = ("workers", i, "placement")
        if pl.gpu_ids is not None and pl.gpus and pl.gpus != len(pl.gpu_ids):
            yield Problem(loc + ("gpus",), pl.gpus, f"gpus disagrees with gpu_ids ({len(pl.gpu_ids)} ids)", "set one of them")
        wants = len(pl.gpu_ids) if pl.gpu_ids is not None else pl.gpus
        if wants and cluster.gpus_per_node == 0:
            yield Problem(loc, wants, "the worker asks for GPUs but cluster.gpus_per_node is 0",
                          "set cluster.gpus_per_node, or remove the GPU request")
        elif wants > cluster.gpus_per_node > 0:
            yield Problem(loc, wants, f"more GPUs per process than a node has ({cluster.gpus_per_node})",
                          "lower gpus, or raise cluster.gpus_per_node")
        for g in pl.gpu_ids or []:
            if cluster.gpus_per_node and g >= cluster.gpus_per_node:
                yield Problem(loc + ("gpu_ids",), g, f"GPU id out of range (nodes have GPUs 0..{cluster.gpus_per_node - 1})",
                              "use an id below cluster.gpus_per_node")
        if pl.node is not None and pl.node >= cluster.nodes:
            yield Problem(loc + ("node",), pl.node, f"node index out of range (cluster.nodes is {cluster.nodes})",
                          f"use 0..{cluster.nodes - 1} or raise cluster.nodes")
        for k in w.env:
            if not _ENV_NAME.fullmatch(k):
                yield Problem(("workers", i, "env", k), k, "not a valid environment variable name", "use letters, digits and _", True)
    for i, op in enumerate(spec.operators):
        if op.name not in hosted and op.name not in templates:
            yield Problem(("operators", i), op.name, "no worker hosts this operator; requests to it would wait forever",
                          f"add it to a worker: workers: [{{name: {op.name}, operators: [{op.name}]}}]")


def _check_llm(spec: GraphSpec) -> Iterator[Problem]:
    llm = spec.llm
    if llm is None:
        return
    sets = llm.server_sets()
    keys = {k for k, _r, _s in sets}
    if not sets:
        yield Problem(("llm",), None, "llm declares no servers", "add servers:, or context_servers: and generation_servers:")
    if "servers" in keys and keys & {"context_servers", "generation_servers"}:
        yield Problem(("llm", "servers"), "servers", "servers (monolithic) cannot be combined with context/generation servers",
                      "keep servers for one engine per request, or context_servers + generation_servers", True)
    disagg = keys & {"context_servers", "generation_servers"}
    if len(disagg) == 1:
        (only,) = disagg
        other = "generation_servers" if only == "context_servers" else "context_servers"
        yield Problem(("llm", only), only, f"disaggregated serving needs both context and generation servers",
                      f"add llm.{other}, or rename llm.{only} to servers", True)
    routers = [op for op in spec.operators if op.kind == "router"]
    if disagg and not routers:
        yield Problem(("llm", sorted(disagg)[0]), "no router", "context/generation servers need a router to split requests",
                      "add an operator {name: router, kind: router} and a worker hosting it", True)
    if llm.router is not None:
        names = [op.name for op in routers]
        if llm.router not in names:
            yield Problem(("llm", "router"), llm.router, "not a router operator", _did_you_mean(llm.router, names, "a router"))
    elif len(routers) > 1 and disagg:
        yield Problem(("llm",), [r.name for r in routers], "several routers; which one fronts the servers?",
                      "set llm.router: <name>")
    declared = {op.name: op for op in spec.operators}
    if not llm.model:
        for key, _role, s in sets:
            tmpl = declared.get(server_operator_name(key, s))
            if tmpl is None or not getattr(tmpl, "model", None):
                yield Problem(("llm",), None, "llm needs a model", "add llm.model: path/or/hub-id (or model on the operator)")
                break
    cluster = spec.cluster
    for key, _role, s in sets:
        loc = ("llm", key)
        tmpl = declared.get(server_operator_name(key, s))
        if tmpl is not None and tmpl.kind not in LLM_KINDS:
            yield Problem(loc + ("operator",), tmpl.name, f"operator {tmpl.name!r} is kind {tmpl.kind}, not vllm/trtllm",
                          "point the set at a vllm/trtllm operator, or drop `operator` to create one")
        if s.urls and len(s.urls) != s.num_instances:
            yield Problem(loc + ("urls",), s.urls, f"{len(s.urls)} urls for num_instances: {s.num_instances}",
                          "give one host:port per instance, or no urls")
        per_inst = s.ranks_per_instance
        if cluster.gpus_per_node and per_inst > cluster.gpus_per_node:
            found = f"tp_size {s.tp_size} x pp_size {s.pp_size} = {per_inst}"
            if server_engine(spec, key, s) == "vllm":
                yield Problem(loc, found,
                              f"a vLLM instance runs on one node (it starts its own tensor/pipeline-parallel workers) "
                              f"and needs {per_inst} GPUs, but a node has {cluster.gpus_per_node}",
                              "lower tp_size/pp_size to fit one node (multi-node vLLM needs a Ray cluster, which tdist "
                              "does not launch), or use engine: trtllm, whose instances run as MPI worlds across nodes")
            elif cluster.nodes == 1:
                yield Problem(loc, found, f"one instance needs {per_inst} GPUs but a node has {cluster.gpus_per_node}",
                              "lower tp_size/pp_size, or set cluster.nodes > 1 for a multi-node instance")
        if s.urls and cluster.gpus_per_node and per_inst > cluster.gpus_per_node:
            yield Problem(loc + ("urls",), s.urls, f"a url pins an instance to one node, but it needs {per_inst} GPUs "
                          f"(a node has {cluster.gpus_per_node})", "remove urls to let the instance span nodes")


def _check_server_sets(spec: GraphSpec) -> Iterator[Problem]:
    """Layout settings the set's engine has no use for are rejected here, not at engine start;
    and a set and its declared operator must not disagree."""
    llm = spec.llm
    if llm is None:
        return
    declared = {op.name: op for op in spec.operators}
    engines = {key: server_engine(spec, key, s) for key, _role, s in llm.server_sets()}
    vllm_sets = [key for key, engine in engines.items() if engine == "vllm"]
    if llm.backend and llm.backend != "pytorch" and vllm_sets:  # vLLM runs on PyTorch: "pytorch" asks for nothing more
        yield Problem(("llm", "backend"), llm.backend, f"backend picks a TensorRT-LLM backend, and llm.{vllm_sets[0]} runs vLLM "
                      "(PyTorch only)", "remove backend (or write pytorch), or use engine: trtllm", True)
    for key, role, s in llm.server_sets():
        loc = ("llm", key)
        tmpl = declared.get(server_operator_name(key, s))
        if engines[key] == "vllm":
            if s.kv_cache_config:
                yield Problem(loc + ("kv_cache_config",), s.kv_cache_config, "kv_cache_config is a TensorRT-LLM setting; this set runs vLLM",
                              "size vLLM's KV cache with engine_args: {gpu_memory_utilization: ...} or {kv_cache_memory_bytes: ...}", True)
            if s.gpu_fraction is not None:
                args = {**llm.engine_args, **(getattr(tmpl, "engine_args", None) or {}), **s.engine_args}
                if spec.cluster.gpus_per_node == 0:
                    yield Problem(loc + ("gpu_fraction",), s.gpu_fraction, "gpu_fraction shares GPUs, and cluster.gpus_per_node is 0 "
                                  "(on CPUs vLLM's gpu_memory_utilization reserves that share of the whole machine's memory)",
                                  "remove gpu_fraction; size the KV cache with engine_args.kv_cache_memory_bytes", True)
                elif args.get("gpu_memory_utilization", s.gpu_fraction) != s.gpu_fraction:
                    yield Problem(loc + ("gpu_fraction",), s.gpu_fraction,
                                  f"gpu_fraction is vLLM's gpu_memory_utilization, which engine_args set to {args['gpu_memory_utilization']}",
                                  "set one of them", True)
        if tmpl is None:
            continue
        if "max_inflight_requests" in tmpl.model_fields_set and "max_inflight_requests" in s.model_fields_set \
                and tmpl.max_inflight_requests != s.max_inflight_requests:
            yield Problem(loc + ("max_inflight_requests",), s.max_inflight_requests,
                          f"operator {tmpl.name!r} sets max_inflight_requests {tmpl.max_inflight_requests}",
                          "set it in one place", True)
        if "role" in tmpl.model_fields_set and getattr(tmpl, "role", role) != role:
            i = spec.operators.index(tmpl)
            yield Problem(("operators", i, "role"), tmpl.role, f"operator {tmpl.name!r} is llm.{key}'s, which serves role {role}",  # type: ignore[union-attr]
                          "remove role from the operator (the set decides it)")


def _check_ports(spec: GraphSpec) -> Iterator[Problem]:
    """Same port twice on one host; metrics ports in range and clear of the declared ones."""
    taken: dict[tuple[str, int], str] = {}

    def claim(host: str | None, port: int, what: str, loc: tuple) -> Iterator[Problem]:
        h = "localhost" if host is None or host in LOCAL_HOSTS else host
        if (h, port) in taken:
            yield Problem(loc, port, f"port collision on {h}: {what} and {taken[(h, port)]} both use {port}",
                          "give each its own port (0 lets the process pick a free one)")
        else:
            taken[(h, port)] = what

    host_of_worker: dict[str, tuple[str | None, int]] = {}
    for w in spec.workers:
        for o in w.operators:
            host_of_worker.setdefault(o, (spec.cluster.hosts[w.placement.node] if spec.cluster.hosts and w.placement.node is not None
                                          and w.placement.node < len(spec.cluster.hosts) else None, w.replicas))
    for i, op in enumerate(spec.operators):
        if not isinstance(op, FrontendOperatorSpec):
            continue
        port = op.port if op.port is not None else (spec.llm.port if spec.llm and spec.llm.port is not None else 8000)
        host, replicas = host_of_worker.get(op.name, (None, 1))
        if port and replicas > 1:
            yield Problem(("operators", i, "port"), port, f"{replicas} replicas of the worker hosting {op.name!r} would all listen on {port}",
                          "use one replica, port: 0, or separate nodes")
        if port:
            yield from claim(host, port, f"frontend {op.name!r}", ("operators", i, "port"))
        for key in FrontendParameters.model_fields:  # KServe's grpc_port (default 8001), or one the graph sets
            value = getattr(op.parameters, key)
            if not key.endswith("_port") or (key not in op.parameters.model_fields_set
                                             and op.protocol not in (protocol_of_parameter(key) or [op.protocol])):
                continue
            if key.endswith("_port") and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                yield from claim(host, value, f"frontend {op.name!r} {key}", ("operators", i, "parameters", key))
    for key, _role, s in spec.llm.server_sets() if spec.llm else []:
        for j, url in enumerate(s.urls):
            host, port = url.rsplit(":", 1)
            yield from claim(host, int(port), f"llm.{key}.urls[{j}]", ("llm", key, "urls", j))
    if spec.request_plane.url == "embedded":
        yield from claim(None, spec.launch.srun.nats_port, "the embedded nats-server (launch.srun.nats_port)",
                         ("launch", "srun", "nats_port"))
    if spec.discovery.kind == "etcd" and spec.discovery.etcd_endpoints == "embedded":
        yield from claim(None, spec.launch.srun.etcd_port, "the embedded etcd (launch.srun.etcd_port)",
                         ("launch", "srun", "etcd_port"))
    base = spec.launch.local.metrics_port_base
    if base:
        count = _process_count(spec)
        if base + count - 1 > 65535:
            yield Problem(("launch", "local", "metrics_port_base"), base, f"{count} workers need ports up to {base + count - 1} (> 65535)",
                          "lower metrics_port_base, or 0 to let each worker pick")
        for (h, port), what in list(taken.items()):
            if h == "localhost" and base <= port < base + count:
                yield Problem(("launch", "local", "metrics_port_base"), base,
                              f"metrics ports {base}..{base + count - 1} include {port}, used by {what}",
                              f"move metrics_port_base past {port} (or set it to 0)")


def _process_count(spec: GraphSpec) -> int:
    n = sum(w.replicas for w in spec.workers)
    for k, _r, s in spec.llm.server_sets() if spec.llm else []:
        n += s.num_instances * processes_per_instance(spec, k, s)
    return n


def _check_misc(spec: GraphSpec) -> Iterator[Problem]:
    d = spec.discovery
    if d.kind == "nats" and "etcd_endpoints" in d.model_fields_set:
        yield Problem(("discovery", "etcd_endpoints"), d.etcd_endpoints, "etcd_endpoints only applies with kind: etcd",
                      "set discovery.kind: etcd, or remove etcd_endpoints", True)
    for k in spec.env:
        if not _ENV_NAME.fullmatch(k):
            yield Problem(("env", k), k, "not a valid environment variable name", "use letters, digits and _", True)
    for i, p in enumerate(spec.python_path):
        if not p.strip():
            yield Problem(("python_path", i), p, "empty path", "remove the entry")
    c = spec.cluster
    if c.hosts and len(c.hosts) != c.nodes:
        yield Problem(("cluster", "hosts"), c.hosts, f"{len(c.hosts)} hosts for cluster.nodes: {c.nodes}",
                      "list one hostname per node")
    if len(set(c.hosts)) != len(c.hosts):
        yield Problem(("cluster", "hosts"), c.hosts, "duplicate hostname", "list each node once")
    if not spec.workers and not (spec.llm and spec.llm.server_sets()):
        yield Problem(("workers",), [], "the graph starts no processes", "add workers: (and/or an llm section)")


def _largest_group(spec: GraphSpec) -> tuple[str | int, ...]:
    """Where most of the processes come from (a worker's replicas or a server set)."""
    sizes: list[tuple[int, tuple[str | int, ...]]] = [(w.replicas, ("workers", i, "replicas")) for i, w in enumerate(spec.workers)]
    for k, _r, s in spec.llm.server_sets() if spec.llm else []:
        sizes.append((s.num_instances * processes_per_instance(spec, k, s), ("llm", k)))
    return max(sizes, key=lambda x: x[0])[1] if sizes else ()


def check_graph(spec: GraphSpec) -> list[Problem]:
    """All cross-field problems of a schema-valid graph (empty list: the graph is good)."""
    count = _process_count(spec)
    if count > MAX_PROCESSES:  # before anything visits every process
        return [Problem(_largest_group(spec), f"{count:,} processes", f"more than {MAX_PROCESSES:,} processes in one graph",
                        "lower replicas / num_instances / tp_size x pp_size")]
    problems: list[Problem] = []
    for check in (_check_names, _check_operators, _check_workers, _check_llm, _check_server_sets, _check_ports, _check_misc):
        problems.extend(check(spec))
    if not problems:
        layout = build_layout(spec)
        problems.extend(layout.problems)
        srun = spec.launch.srun
        if srun.ntasks is not None and srun.ntasks != layout.world_size:
            problems.append(Problem(("launch", "srun", "ntasks"), srun.ntasks,
                                    f"ntasks must equal the world size ({layout.world_size} ranks)",
                                    "remove ntasks (tdist computes it) or fix the layout"))
    return problems
