"""CPU features an engine process must ask the kernel for before using them."""

from __future__ import annotations

import ctypes
import platform

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86_64


def request_amx_permission() -> bool:
    """Ask Linux for the AMX tile state for this process (arch_prctl ARCH_REQ_XCOMP_PERM).

    Without it the first AMX instruction raises SIGILL. True when granted; False where the CPU,
    kernel or platform has none to give (then nothing uses AMX either)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False
