"""vLLM's NixlConnector without NIXL's progress thread (`kv_connector_module_path` target).

NIXL starts a progress thread that polls without pause: measured here, an idle agent takes 100 %
of a core (shared/FIELD-NOTES.md saw the same). On a GPU node that is one host core among many;
on a small CPU-only machine it is half of the engine's own core, and decode slows ~2.4×
(docs/benchmarks.md, "Disaggregated serving"). vLLM does not expose `enable_prog_thread`, so a
role context/generation engine on CPU loads the connector from this module, which builds NIXL's
agent with `enable_prog_thread=False`; transfers then progress when vLLM polls their state (every
engine step). Set `parameters.nixl_progress_thread: true` on the operator to keep vLLM's default.

Imported only inside vLLM's engine processes (by vLLM's connector factory).
"""

from __future__ import annotations

import functools

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector as _VllmNixlConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker as _base_worker

if getattr(_base_worker, "nixl_agent_config", None) is not None and not isinstance(_base_worker.nixl_agent_config, functools.partial):
    _base_worker.nixl_agent_config = functools.partial(_base_worker.nixl_agent_config, enable_prog_thread=False)


class NixlConnector(_VllmNixlConnector):  # same name: vLLM's checks of kv_connector == "NixlConnector" still hold
    """vLLM's NixlConnector; the only difference is the agent config patched above."""
