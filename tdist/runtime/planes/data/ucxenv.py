"""UCX settings and ucxx's process-wide runtime (one context per process, bound to one loop).

Settings: defaults < the process environment < the graph's `ucx_env`; UCX reads them when
its context is created, so they go into os.environ just before ucxx is first imported.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from typing import Any

from tdist.errors import DataPlaneError

log = logging.getLogger("tdist.data.ucx")

# Progress on ucxx's thread, completions delivered as Python futures by its notifier thread.
# Without futures every pending request (an idle server's recv included) spins the event loop
# with sleep(0): ~40 % of a core per idle process on the dev box; with them ~2 %.
DEFAULT_ENV = {
    "UCX_TLS": "tcp,self",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCXPY_PROGRESS_MODE": "thread",
    "UCXPY_ENABLE_PYTHON_FUTURE": "1",
}
def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def ucx_environment(overrides: dict[str, str], host: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """UCX_* settings to apply: defaults < the process environment < the graph's ucx_env.

    Loopback hosts also get UCX_NET_DEVICES=lo (UCX otherwise tries every interface)."""
    base = dict(os.environ if base is None else base)
    env = {k: v for k, v in DEFAULT_ENV.items() if k not in base}
    if is_loopback(host) and "UCX_NET_DEVICES" not in base:
        env["UCX_NET_DEVICES"] = "lo"
    env.update(overrides)
    return env


class UcxRuntime:
    """ucxx's process-wide context, shared by the planes of a process and bound to one event
    loop (its notifier thread resolves futures there). The last plane to let go resets it,
    which stops the notifier thread (else it can keep the interpreter from exiting) and lets
    a later plane start over on another loop (tests run one loop per test)."""

    users = 0
    loop: asyncio.AbstractEventLoop | None = None
    module: Any = None

    @classmethod
    def acquire(cls, env: dict[str, str]) -> Any:
        loop = asyncio.get_running_loop()
        if cls.loop is not None and cls.loop is not loop:
            if cls.users and not cls.loop.is_closed():
                raise DataPlaneError("UCX is in use by a data plane on another event loop of this process")
            cls.users = 0  # planes of a closed loop are gone, closed or not
            cls._reset()
        if cls.loop is None:
            os.environ.update(env)
            try:
                import ucxx
            except Exception as exc:  # ImportError, or a broken CUDA/UCX install
                raise DataPlaneError(
                    f"the UCX data plane needs ucxx: pip install 'tdist[ucx]' (ucxx-cu12) ({exc})"
                ) from None
            cls.module, cls.loop = ucxx, loop
        else:
            clash = {k: v for k, v in env.items() if os.environ.get(k) != v}
            if clash:
                log.warning("UCX already initialised in this process; ignoring later settings %s", clash)
        cls.users += 1
        return cls.module

    @classmethod
    def release(cls) -> None:
        cls.users = max(0, cls.users - 1)
        if cls.users == 0:
            cls._reset()

    @classmethod
    def _reset(cls) -> None:
        if cls.module is None or cls.loop is None:
            return
        try:
            cls.module.reset()
        except Exception as exc:  # something still holds an endpoint: keep going
            log.debug("ucxx.reset failed: %s", exc)
            try:
                cls.module.stop_notifier_thread()
            except Exception:
                pass
        cls.loop = None


def ucx_available() -> bool:
    if UcxRuntime.module is not None:
        return True
    import importlib.util

    return importlib.util.find_spec("ucxx") is not None
