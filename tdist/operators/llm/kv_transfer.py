"""The engine side of disaggregated serving: what a `role: context` or `role: generation` vLLM
engine adds to its engine args, and the check of a KV handle it is asked to pull.

* `connector_settings`: a `kv_transfer_config` for NixlConnector (producer / consumer, CPU
  buffers where there is no GPU, a KV lease long enough for the pull, and on the generation side
  `kv_load_failure_policy: recompute`, so a KV handle that is lost or expired is prefilled
  locally, never answered wrongly). Graph `engine_args.kv_transfer_config` keys win.
* `side_channel_env` / `nixl_env`: its NIXL side channel (host, a port of its own) and NIXL's
  progress thread by role (read by nixl_cpu.py inside the engine processes).

Here, with the engines, and not in routing/disagg.py (the router's side of the same flow), so
the engines never import the router package.
"""

from __future__ import annotations

import os
from typing import Any

from tdist.errors import OperatorLoadError
from tdist.runtime.ports import free_port

#: Measured on CPU: the default 30 s lease can expire before the decode side pulls under load.
DEFAULT_KV_LEASE_S = 120
NIXL_ROLES = {"context": "kv_producer", "generation": "kv_consumer"}


def connector_settings(role: str, *, cpu: bool, lease_s: int = DEFAULT_KV_LEASE_S,
                       given: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The kv_transfer_config for an engine of `role`; None for a monolithic (`both`) engine
    unless the graph gave one. Keys in `given` (graph engine_args) win."""
    if role not in NIXL_ROLES:
        return dict(given) if given else None
    cfg: dict[str, Any] = {
        "kv_connector": "NixlConnector",
        "kv_role": NIXL_ROLES[role],
        "kv_connector_extra_config": {"kv_lease_duration": int(lease_s)},
    }
    if cpu:
        cfg["kv_buffer_device"] = "cpu"
        # NIXL's UCX backend starts 4 worker threads by default, which poll; one is enough for
        # CPU buffers on a small machine (each idle poller costs CPU the engines need)
        cfg["kv_connector_extra_config"]["num_threads"] = 1
        # AMX CPUs need a permission vLLM's decode kernel assumes, and NIXL's progress thread is
        # set per operator: tdist/operators/llm/nixl_cpu.py (settings: nixl_env)
        cfg["kv_connector_module_path"] = "tdist.operators.llm.nixl_cpu"
    if role == "generation":
        cfg["kv_load_failure_policy"] = "recompute"
    for k, v in (given or {}).items():
        if k == "kv_connector_extra_config" and isinstance(v, dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def nixl_env(parameters: dict[str, Any], role: str = "context") -> dict[str, str]:
    """TDIST_NIXL_PROGRESS for tdist/operators/llm/nixl_cpu.py from the operator's parameters:
    `nixl_progress` (busy | off; `nixl_progress_thread: true/false` means busy/off).

    Default by role: a context engine is the passive side of every KV READ and, idle, makes no
    progress calls of its own, so it needs NIXL's progress thread (`busy`); a generation engine
    starts the READs and polls their state every engine step, which progresses its UCX worker,
    so it runs without one (`off`): one busy-polling core per deployment, not one per engine."""
    mode = parameters.get("nixl_progress")
    if mode is None and parameters.get("nixl_progress_thread") is not None:
        mode = "busy" if parameters["nixl_progress_thread"] else "off"
    mode = str(mode or ("off" if role == "generation" else "busy")).lower()
    if mode not in ("busy", "off"):
        raise OperatorLoadError(f"parameters.nixl_progress must be busy or off (found {mode!r})")
    return {"TDIST_NIXL_PROGRESS": mode}


def side_channel_env(parameters: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """VLLM_NIXL_SIDE_CHANNEL_HOST/PORT for this engine: `parameters.kv_side_channel_host/port`,
    else the environment, else 127.0.0.1 (TDIST_HOST_ADDRESS on multi-node) and a free port."""
    env = os.environ if env is None else env
    host = parameters.get("kv_side_channel_host") or env.get("VLLM_NIXL_SIDE_CHANNEL_HOST") \
        or env.get("TDIST_HOST_ADDRESS") or "127.0.0.1"
    port = parameters.get("kv_side_channel_port") or env.get("VLLM_NIXL_SIDE_CHANNEL_PORT") or free_port(
        "0.0.0.0" if host not in ("127.0.0.1", "localhost") else "127.0.0.1")
    return {"VLLM_NIXL_SIDE_CHANNEL_HOST": str(host), "VLLM_NIXL_SIDE_CHANNEL_PORT": str(int(port))}


def check_handle(kvp: Any) -> str | None:
    """What is wrong with a KV handle a generation engine is asked to pull (None: fine, or no pull).

    vLLM's NIXL worker trusts the handle's shape; a malformed one raises inside the engine and
    kills it, so the operator checks it first."""
    if kvp is None:
        return None
    if not isinstance(kvp, dict):
        return f"must be an object, got {type(kvp).__name__}"
    if not kvp.get("do_remote_prefill"):
        return None
    ids = kvp.get("remote_block_ids")
    if not isinstance(ids, list) or not all(isinstance(g, list) and all(isinstance(i, int) for i in g) for g in ids):
        return "remote_block_ids must be a list of lists of block ids (one per KV-cache group)"
    for k, kind in (("remote_engine_id", str), ("remote_request_id", str), ("remote_host", str), ("remote_port", int)):
        if not isinstance(kvp.get(k), kind) or isinstance(kvp.get(k), bool):
            return f"{k} must be a {kind.__name__}, got {kvp.get(k)!r}"
    return None
