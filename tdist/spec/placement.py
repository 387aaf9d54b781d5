"""Where every process of a graph goes: node, GPUs, rank. Pure; shared by the checks and the plan.

Order (= rank order): the LLM engine ranks (servers, context_servers, generation_servers, one
instance's tp×pp ranks together), then the other workers in declaration order — together "the
world" that mpirun/srun start, sorted by node so srun's block distribution matches — then the
service workers (those hosting only routers/frontends), which the launcher starts next to the
request plane rather than inside the world.

GPU sharing is counted in thousandths so that four 0.25 shares fill a GPU exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tdist.spec.models import GraphSpec, ServerSetSpec
from tdist.spec.operators import LLM_KINDS, SERVICE_KINDS
from tdist.spec.problem import Loc, Problem

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "0.0.0.0", "::1"})
_FULL = 1000
_DEFAULT_SET_NAMES = {"servers": "llm", "context_servers": "context", "generation_servers": "generation"}


def server_operator_name(key: str, s: ServerSetSpec) -> str:
    """Operator name of an LLM server set: its `operator`, else llm / context / generation."""
    return s.operator or _DEFAULT_SET_NAMES[key]


def server_engine(spec: GraphSpec, key: str, s: ServerSetSpec) -> str:
    """The engine kind of a server set: its declared operator's kind, else llm.engine."""
    name = server_operator_name(key, s)
    declared = next((op.kind for op in spec.operators if op.name == name), None)
    return declared if declared in LLM_KINDS else (spec.llm.engine if spec.llm else "vllm")


def processes_per_instance(spec: GraphSpec, key: str, s: ServerSetSpec) -> int:
    """TensorRT-LLM instances run as tp x pp MPI ranks; a vLLM instance is one process that starts
    its own tensor/pipeline-parallel workers on the GPUs it is given."""
    return 1 if server_engine(spec, key, s) == "vllm" else s.ranks_per_instance


@dataclass(frozen=True)
class EngineRank:
    """What an LLM engine rank belongs to."""

    set_key: str
    role: str
    instance: int
    instance_rank: int
    instance_size: int
    url: str | None


@dataclass(frozen=True)
class Proc:
    """One process of the deployment."""

    component: str
    replica: int
    operators: tuple[str, ...]
    loc: Loc
    in_world: bool
    node: int
    gpu_ids: tuple[int, ...] = ()
    gpu_fraction: float | None = None
    cpu_ids: tuple[int, ...] = ()
    worker_index: int | None = None
    engine: EngineRank | None = None

    @property
    def name(self) -> str:
        return f"{self.component}.{self.replica}"


@dataclass
class Layout:
    """Processes in rank order, node hostnames (None where unknown), and what did not fit."""

    procs: list[Proc]
    hosts: list[str | None]
    world_size: int
    problems: list[Problem] = field(default_factory=list)


class _Gpus:
    """Remaining share of every GPU on every node, with a cursor past the full nodes."""

    def __init__(self, nodes: int, per_node: int) -> None:
        self.free = [[_FULL] * per_node for _ in range(nodes)]
        self.per_node = per_node
        self.cursor = 0

    def take(self, node: int | None, count: int, share: int, exclude: set[tuple[int, int]]) -> tuple[int, list[int]] | None:
        nodes = [node] if node is not None else range(self.cursor, len(self.free))
        for n in nodes:
            gpus = self.free[n]
            # spread: the emptiest GPUs first (ties: lowest id), so shares fill GPUs evenly
            free = [g for g in range(self.per_node) if gpus[g] >= share and (n, g) not in exclude]
            ids = sorted(free, key=lambda g: (-gpus[g], g))[:count] if len(free) > count else free
            if len(ids) == count:
                for g in ids:
                    gpus[g] -= share
                if node is None:
                    while self.cursor < len(self.free) and max(self.free[self.cursor], default=0) == 0:
                        self.cursor += 1
                return n, ids
        return None

    def take_ids(self, node: int, ids: list[int], share: int) -> int | None:
        """Take fixed ids; returns the first over-subscribed id, or None when all fit."""
        for g in ids:
            if self.free[node][g] < share:
                return g
        for g in ids:
            self.free[node][g] -= share
        return None


def _share(fraction: float | None) -> int:
    return _FULL if fraction is None else max(1, round(fraction * _FULL))


def resolve_hosts(spec: GraphSpec) -> tuple[list[str | None], dict[str, int], list[Problem]]:
    """Node hostnames and the node index of every host named in LLM urls."""
    nodes = spec.cluster.nodes
    problems: list[Problem] = []
    named = list(spec.cluster.hosts)
    index: dict[str, int] = {}
    if named:
        index = {h: i for i, h in enumerate(named)}
    url_hosts: list[tuple[str, Loc]] = []
    for key, _role, s in spec.llm.server_sets() if spec.llm else []:
        url_hosts += [(u.rsplit(":", 1)[0], ("llm", key, "urls", i)) for i, u in enumerate(s.urls)]
    hosts: list[str | None] = list(named) if named else [None] * nodes
    uses_local = any(h in LOCAL_HOSTS for h, _ in url_hosts)
    next_free = 1 if uses_local else 0
    for host, loc in url_hosts:
        if host in index:
            continue
        if host in LOCAL_HOSTS:
            index[host] = 0
            continue
        if named or next_free >= nodes:
            what = f"cluster.hosts {named}" if named else f"cluster.nodes: {nodes}"
            problems.append(Problem(loc, host, f"url host is not one of the cluster's nodes ({what})",
                                    "list the host in cluster.hosts and raise cluster.nodes, or use localhost"))
            index[host] = 0
            continue
        index[host] = next_free
        hosts[next_free] = host
        next_free += 1
    return hosts, index, problems


def build_layout(spec: GraphSpec) -> Layout:
    """Place every process; problems (over-subscribed GPUs, bad hosts) are returned, not raised."""
    hosts, host_index, problems = resolve_hosts(spec)
    gpus = _Gpus(spec.cluster.nodes, spec.cluster.gpus_per_node)
    has_gpus = spec.cluster.gpus_per_node > 0
    kinds = {op.name: op.kind for op in spec.operators}
    world: list[Proc] = []
    services: list[Proc] = []

    for key, role, s in spec.llm.server_sets() if spec.llm else []:
        name = server_operator_name(key, s)
        size = s.ranks_per_instance
        procs = processes_per_instance(spec, key, s)
        per_proc = size // procs  # GPUs each process takes (all of the instance's for vLLM)
        share = _share(s.gpu_fraction)
        failed = False
        for inst in range(s.num_instances):
            url = s.urls[inst] if inst < len(s.urls) else None
            pinned = host_index.get(url.rsplit(":", 1)[0]) if url else None
            used: set[tuple[int, int]] = set()
            for r in range(procs):
                node, ids = (pinned if pinned is not None else 0), []
                if has_gpus and not failed:
                    got = gpus.take(pinned, per_proc, share, used)
                    if got is None:
                        failed = True
                        problems.append(Problem(
                            ("llm", key), f"{s.num_instances} x tp {s.tp_size} x pp {s.pp_size}",
                            f"GPUs over-subscribed: rank {r} of instance {inst} finds no free GPU"
                            + (f" on node {pinned}" if pinned is not None else ""),
                            "set gpu_fraction so ranks share GPUs, or raise cluster.gpus_per_node / cluster.nodes",
                        ))
                    else:
                        node, ids = got
                        used.update((node, g) for g in ids)
                world.append(Proc(name, inst * procs + r,
                                  (name,), ("llm", key), True, node, tuple(ids), s.gpu_fraction,
                                  engine=EngineRank(key, role, inst, r, size, url)))

    for wi, w in enumerate(spec.workers):
        service = all(kinds.get(o) in SERVICE_KINDS for o in w.operators)
        pl = w.placement
        node = pl.node if pl.node is not None and pl.node < spec.cluster.nodes else 0
        share = _share(pl.gpu_fraction)
        failed = False
        for rep in range(w.replicas):
            ids: list[int] = []
            where = node
            if not failed and has_gpus and pl.gpu_ids:
                if all(g < spec.cluster.gpus_per_node for g in pl.gpu_ids):
                    bad = gpus.take_ids(node, pl.gpu_ids, share)
                    if bad is not None:
                        failed = True
                        problems.append(Problem(
                            ("workers", wi, "placement", "gpu_ids"), pl.gpu_ids,
                            f"GPU {bad} on node {node} is over-subscribed by replica {rep} of {w.name!r}",
                            "set placement.gpu_fraction so the processes share it (e.g. 0.5 for 2), or give each its own GPU",
                        ))
                    ids = list(pl.gpu_ids)
            elif not failed and has_gpus and pl.gpus:
                got = gpus.take(pl.node if pl.node is not None else None, pl.gpus, share, set())
                if got is None:
                    failed = True
                    problems.append(Problem(
                        ("workers", wi, "placement"), f"{w.replicas} replicas x {pl.gpus} GPUs",
                        f"GPUs over-subscribed: replica {rep} of {w.name!r} finds no {pl.gpus} free GPU(s)",
                        "set placement.gpu_fraction to share GPUs, lower replicas or gpus, or raise cluster.gpus_per_node / nodes",
                    ))
                else:
                    where, ids = got
            proc = Proc(w.name, rep, tuple(w.operators), ("workers", wi), not service, where, tuple(ids),
                        pl.gpu_fraction, tuple(pl.cpu_ids), worker_index=wi)
            (services if service else world).append(proc)

    if not has_gpus and spec.cluster.cpus_per_node > 0:
        engine_kinds = {n for n, k in kinds.items() if k in LLM_KINDS}
        world = _place_cpu_engines(world, spec.cluster.cpus_per_node, engine_kinds)
    world.sort(key=lambda p: p.node)  # stable: keeps declaration order within a node
    return Layout(world + services, hosts, len(world), problems)


def cpu_assignment(roles: list[str], cores: int) -> list[tuple[int, ...]]:
    """Cores for each engine of one node, given the engines' roles in order (context / generation /
    both) and the node's core count. Pure.

    Every engine computes with its own cores where there are enough: the node's cores split into
    equal disjoint ranges, context engines at the top. With fewer cores than engines, each
    context engine still gets a core of its own (when fewer context engines than cores) and the
    rest share the remaining cores round robin — a generation engine never shares a core with a
    context engine: both poll without blocking, and two such peers on one core meet only at
    time-slice ends (measured: KV pulls 5 s late, then never; docs/llm.md)."""
    n = len(roles)
    if n == 0 or cores <= 0:
        return [() for _ in roles]
    ctx = [i for i, r in enumerate(roles) if r == "context"]
    rest = [i for i, r in enumerate(roles) if r != "context"]
    out: list[tuple[int, ...]] = [() for _ in roles]
    if cores >= n:
        width = cores // n
        for slot, i in enumerate(rest + ctx):  # rest from core 0 up, context engines at the top
            base = slot * width if slot < len(rest) else cores - (n - slot) * width
            out[i] = tuple(range(base, base + width))
        return out
    if ctx and len(ctx) < cores:
        for k, i in enumerate(ctx):
            out[i] = (cores - 1 - k,)
        shared = cores - len(ctx)
        for k, i in enumerate(rest):
            out[i] = (k % shared,)
        return out
    for k, i in enumerate(rest + ctx):
        out[i] = (k % cores,)
    return out


def _place_cpu_engines(procs: list[Proc], cores: int, engine_kinds: set[str]) -> list[Proc]:
    """cpu_ids for the LLM engine processes of every node (those without cpu_ids of their own)."""
    by_node: dict[int, list[int]] = {}
    for i, p in enumerate(procs):
        is_engine = p.engine is not None or any(o in engine_kinds for o in p.operators)
        if is_engine and not p.cpu_ids:
            by_node.setdefault(p.node, []).append(i)
    out = list(procs)
    for idx in by_node.values():
        roles = [procs[i].engine.role if procs[i].engine is not None else "both" for i in idx]
        for i, ids in zip(idx, cpu_assignment(roles, cores)):
            out[i] = replace(procs[i], cpu_ids=ids)
    return out
