"""AMX permission (the fix for SIGILL in vLLM's CPU decode kernel on AMX machines)."""

from __future__ import annotations

from pathlib import Path

from tdist.operators.llm.cpu_features import request_amx_permission


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_amx_permission_is_granted_where_the_cpu_has_amx() -> None:
    granted = request_amx_permission()
    if "amx_tile" in _cpu_flags():
        assert granted is True
    assert request_amx_permission() == granted  # asking twice is harmless
