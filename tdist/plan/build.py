"""spec → Plan. Pure: no processes, no sockets, no file reads (paths are only joined).

Relative paths in the graph (python_path, Triton repositories, local model paths) resolve
against the YAML's directory, so a plan runs from any working directory.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from tdist.errors import PlanError
from tdist.runtime.config import (
    DataPlaneConfig,
    DiscoveryConfig,
    OperatorConfig,
    RequestPlaneConfig,
    WorkerConfig,
)
from tdist.spec.checks import default_targets
from tdist.spec.models import GraphSpec, ServerSetSpec
from tdist.spec.operators import (
    FrontendOperatorSpec,
    OperatorSpec,
    PythonOperatorSpec,
    RouterOperatorSpec,
    TritonOperatorSpec,
    TrtllmOperatorSpec,
    VllmOperatorSpec,
)
from tdist.spec.placement import Layout, Proc, build_layout, server_operator_name
from tdist.plan.model import LAUNCHERS, EtcdPlan, MpirunPlan, NatsPlan, Plan, SrunPlan


def _abs(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def resolve_model(base: str, model: str | None) -> str | None:
    """A model starting with `.`, `/` or `~` is a path (relative to the YAML); anything else a hub id."""
    if model and model.startswith((".", "/", "~")):
        return _abs(base, model)
    return model


def _operator_config(spec: GraphSpec, op: OperatorSpec, base: str) -> OperatorConfig:
    """One declared operator as the runtime reads it. Typed parameters become the dict keys the
    operators read; only the settings the graph gives are passed, so the operators' own defaults
    (which the spec's descriptions name) apply to the rest."""
    if isinstance(op, PythonOperatorSpec):
        params: dict[str, Any] = dict(op.parameters)
    else:
        params = op.parameters.model_dump(exclude_unset=True)
    extra: dict[str, Any] = {}
    if isinstance(op, (RouterOperatorSpec, FrontendOperatorSpec)):
        extra["targets"] = list(op.targets) or default_targets(spec, op)
    if isinstance(op, FrontendOperatorSpec):
        llm = spec.llm
        params["protocol"] = op.protocol
        host = op.host or (llm.hostname if llm and llm.hostname else None)
        if host:  # else the frontend's own default (127.0.0.1)
            params["host"] = host
        params["port"] = op.port if op.port is not None else (llm.port if llm and llm.port is not None else 8000)
    if isinstance(op, TritonOperatorSpec):
        extra["repository"] = _abs(base, op.repository or ".")
        extra["model_name"] = op.model_name or op.name
        extra["triton_config"] = op.triton_config.model_dump(exclude_none=True) if op.triton_config else {}
    if isinstance(op, (VllmOperatorSpec, TrtllmOperatorSpec)):
        args = dict(spec.llm.engine_args) if spec.llm else {}
        args.update(op.engine_args)
        model = resolve_model(base, op.model or (spec.llm.model if spec.llm else None))
        if model:
            args["model"] = model
        extra["engine_args"] = args
        extra["role"] = op.role
    return OperatorConfig(
        name=op.name, kind=op.kind, implementation=op.implementation if isinstance(op, PythonOperatorSpec) else None,
        version=op.version, max_inflight_requests=op.max_inflight_requests, parameters=params, log_level=op.log_level,
        **extra,
    )


def _server_operator(spec: GraphSpec, key: str, role: str, s: ServerSetSpec, base: str,
                     template: OperatorConfig | None, template_spec: OperatorSpec | None, url: str | None) -> OperatorConfig:
    """The operator of an LLM server set: llm.engine_args < the declared operator's < the set's,
    plus what the layout says in the engine's own terms (the checks reject what it cannot say)."""
    llm = spec.llm
    assert llm is not None
    kind = template.kind if template else llm.engine
    args: dict[str, Any] = dict(llm.engine_args)
    if template is not None:
        args.update(template.engine_args)
    args.update(s.engine_args)
    model = args.get("model") if template is not None and "model" in args else resolve_model(base, llm.model)
    if model:
        args["model"] = model
    args["tensor_parallel_size"] = s.tp_size
    args["pipeline_parallel_size"] = s.pp_size
    if kind == "trtllm":  # TensorRT-LLM's own settings; the trtllm operator maps gpu_fraction to its KV cache
        if s.kv_cache_config:
            args["kv_cache_config"] = dict(s.kv_cache_config)
        if llm.backend:
            args.setdefault("backend", llm.backend)
        if s.gpu_fraction is not None:
            args.setdefault("gpu_fraction", s.gpu_fraction)
    elif s.gpu_fraction is not None:  # vLLM: the share of each GPU the engine may fill
        args.setdefault("gpu_memory_utilization", s.gpu_fraction)
    params = dict(template.parameters) if template else {}
    if url:
        params["url"] = url
    # the set's own max_inflight_requests unless only the declared operator sets one (they must agree)
    explicit = template_spec is not None and "max_inflight_requests" in template_spec.model_fields_set \
        and "max_inflight_requests" not in s.model_fields_set
    return OperatorConfig(
        name=server_operator_name(key, s), kind=kind,
        version=template.version if template else 1,
        max_inflight_requests=template.max_inflight_requests if explicit and template else s.max_inflight_requests,
        parameters=params, log_level=template.log_level if template else "INFO",
        engine_args=args, role=role,  # type: ignore[arg-type]
    )


def served_model_name(op: OperatorConfig) -> str:
    """The name an LLM operator serves its model under (what it reports; OpenAI's `model`)."""
    return str(op.parameters.get("served_model_name") or op.engine_args.get("served_model_name")
               or op.engine_args.get("model") or op.name)


def _with_served_models(ops: dict[str, OperatorConfig], all_ops: list[OperatorConfig]) -> dict[str, OperatorConfig]:
    """OpenAI frontends learn the deployment's served model names from the plan
    (`parameters.served_models`), so /v1/models is right from the first request; discovery adds
    names of workers that join later."""
    names = sorted({served_model_name(o) for o in all_ops if o.kind in ("vllm", "trtllm")})
    if not names:
        return ops
    out = dict(ops)
    for name, op in ops.items():
        if op.kind == "frontend" and op.parameters.get("protocol", "openai") == "openai" and "served_models" not in op.parameters:
            out[name] = op.model_copy(update={"parameters": {**op.parameters, "served_models": names}})
    return out


def _srun_plan(spec: GraphSpec, layout: Layout, log_dir: str) -> SrunPlan:
    s = spec.launch.srun
    counts = Counter(p.node for p in layout.procs[: layout.world_size])
    used = max(counts) + 1 if counts else 1
    per_node = [counts.get(n, 0) for n in range(used)]
    nodes = s.nodes or used
    ntasks_per_node = s.ntasks_per_node or max(max(per_node), 1)
    hosts = layout.hosts[:nodes]
    return SrunPlan(
        nodes=nodes, ntasks=max(layout.world_size, 1), ntasks_per_node=ntasks_per_node, ranks_per_node=per_node,
        nodelist=[h for h in hosts if h] if all(hosts) and len(hosts) == nodes else [],
        partition=s.partition, account=s.account, time_limit=s.time_limit, job_name=s.job_name or spec.name,
        output=s.output or os.path.join(log_dir, "slurm-%j.out"), mpi=s.mpi, container_image=s.container_image,
        container_mounts=list(s.container_mounts), extra_args=list(s.extra_args), env_names=list(s.env),
        nats_port=s.nats_port, etcd_port=s.etcd_port,
    )


def build_plan(spec: GraphSpec, *, launcher: str = "local", run_dir: str | None = None) -> Plan:
    """Expand a validated graph into one WorkerConfig per process, in rank order.

    `run_dir` (default `./.tdist/<name>`, made absolute) holds plan.json and the logs.
    Raises PlanError for a launcher tdist does not know, or a layout a launcher cannot express.
    """
    if launcher not in LAUNCHERS:
        raise PlanError(f"unknown launcher {launcher!r}; use one of: {', '.join(LAUNCHERS)}")
    base = spec.base_dir or os.getcwd()
    run_dir = os.path.abspath(run_dir or os.path.join(".tdist", spec.name))
    local = spec.launch.local
    log_dir = _abs(run_dir, local.log_dir)
    layout = build_layout(spec)
    if layout.problems:  # load_graph reports these; a hand-built spec may still carry them
        p = layout.problems[0]
        raise PlanError(f"{'.'.join(map(str, p.loc))}: {p.rule} (got {p.got!r})" + (f"\n  fix: {p.hint}" if p.hint else ""))

    python_path = [_abs(base, p) for p in spec.python_path]
    common_env: dict[str, str] = {}
    if python_path:
        common_env["PYTHONPATH"] = os.pathsep.join(python_path)
    common_env.update(spec.env)

    rp = spec.request_plane
    nats = NatsPlan.resolve(rp.url)
    request_plane = RequestPlaneConfig(
        url=nats.url, ack_wait_s=rp.ack_wait_s, max_deliver=rp.max_deliver,
        heartbeat_interval_s=rp.heartbeat_interval_s, default_timeout_s=rp.default_timeout_s, storage=rp.storage,
    )
    dp = spec.data_plane
    data_plane = DataPlaneConfig(kind=dp.kind, inline_threshold_bytes=dp.inline_threshold_bytes, lease_s=dp.lease_s,
                                 ucx_env=dict(dp.ucx_env))
    d = spec.discovery
    endpoints = d.etcd_endpoints if d.kind == "etcd" else None
    discovery = DiscoveryConfig(kind=d.kind, etcd_endpoints=list(endpoints) if isinstance(endpoints, list) else [], ttl_s=d.ttl_s)

    ops = {op.name: _operator_config(spec, op, base) for op in spec.operators}
    declared = {op.name: op for op in spec.operators}
    server_ops: dict[tuple[str, int], OperatorConfig] = {}
    for key, role, s in spec.llm.server_sets() if spec.llm else []:
        name = server_operator_name(key, s)
        template, template_spec = ops.get(name), declared.get(name)
        shared = _server_operator(spec, key, role, s, base, template, template_spec, None)
        for inst in range(s.num_instances):
            url = s.urls[inst] if inst < len(s.urls) else None
            server_ops[(key, inst)] = _server_operator(spec, key, role, s, base, template, template_spec, url) if url else shared

    ops = _with_served_models(ops, list(ops.values()) + list(server_ops.values()))
    worker_env = [dict(common_env, **w.env) for w in spec.workers]
    base_port = local.metrics_port_base
    local_ranks: Counter[int] = Counter()
    workers: list[WorkerConfig] = []
    for index, proc in enumerate(layout.procs):
        workers.append(_worker_config(spec, proc, index, layout, ops, server_ops, common_env, worker_env,
                                      request_plane, data_plane, discovery, log_dir, base_port, local_ranks))

    mp = spec.launch.mpirun
    return Plan(
        deployment=spec.name, graph_file=spec.file, launcher=launcher, run_dir=run_dir,  # type: ignore[arg-type]
        log_dir=log_dir, nats=nats, discovery=d.kind, etcd=EtcdPlan.resolve(endpoints) if d.kind == "etcd" else None,
        data_plane=data_plane,
        world_size=layout.world_size, nodes=spec.cluster.nodes, hosts=layout.hosts, python=spec.launch.python,
        python_path=python_path, env=dict(spec.env), startup_timeout_s=local.startup_timeout_s,
        restart_on_crash=local.restart_on_crash, restart_max_crashes=local.restart_max_crashes,
        restart_window_s=local.restart_window_s,
        mpirun=MpirunPlan(allow_run_as_root=mp.allow_run_as_root, oversubscribe=mp.oversubscribe,
                          extra_args=list(mp.extra_args), env_names=list(mp.env)),
        srun=_srun_plan(spec, layout, log_dir), workers=workers,
    )


def _worker_config(spec, proc: Proc, index, layout, ops, server_ops, common_env, worker_env, request_plane,
                   data_plane, discovery, log_dir, base_port, local_ranks) -> WorkerConfig:
    env = worker_env[proc.worker_index] if proc.worker_index is not None else common_env
    if proc.gpu_ids:
        env = dict(env, CUDA_VISIBLE_DEVICES=",".join(map(str, proc.gpu_ids)))
    eng = proc.engine
    operators = [server_ops[(eng.set_key, eng.instance)]] if eng else [ops[o] for o in proc.operators]
    in_world = proc.in_world
    local_rank = None
    if in_world:
        local_rank = local_ranks[proc.node]
        local_ranks[proc.node] += 1
    name = proc.name
    return WorkerConfig(
        name=name, component=proc.component, replica=proc.replica, deployment=spec.name, operators=operators,
        request_plane=request_plane, data_plane=data_plane, discovery=discovery, env=env,
        gpu_ids=list(proc.gpu_ids), gpu_fraction=proc.gpu_fraction, cpu_ids=list(proc.cpu_ids),
        metrics_port=base_port + index if base_port else 0, log_path=os.path.join(log_dir, f"{name}.log"),
        host=layout.hosts[proc.node] if proc.node < len(layout.hosts) else None,
        rank=index if in_world else None, world_size=layout.world_size if in_world else None, local_rank=local_rank,
        node_index=proc.node, instance=eng.instance if eng else None, instance_rank=eng.instance_rank if eng else None,
        instance_size=eng.instance_size if eng else None,
    )
