"""Readiness: wait until every named worker says `ready` in discovery, under a timeout.

The one readiness wait of every launcher (local, a world's ranks and service workers, a Slurm
job's): readiness comes from the signal the worker publishes itself (its discovery entry), never
from a sleep. `check()` runs every round and may raise (a worker exited, the world or the job
ended): start-up then fails at once instead of at the deadline. A failure carries the log tail
of the worker it names.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from tdist.errors import LaunchError
from tdist.launch.logs import tail_file

ProgressFn = Callable[[int, int, str], None]  # (ready, total, who is still awaited)

#: Seconds between two reads of discovery (a bounded poll, not a wait for readiness itself).
POLL_S = 0.1


async def wait_ready_in_discovery(
    nats_url: str,
    deployment: str,
    discovery: Any,
    names: set[str],
    *,
    timeout_s: float,
    log_of: Callable[[str], str | None] = lambda name: None,
    check: Callable[[], None] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, dict[str, Any]]:
    """Wait until every worker in `names` is `ready`; returns the discovery entries.

    Connecting retries until the deadline (a Slurm job's nats-server may still be starting).
    """
    from tdist.runtime.planes.request import RequestClient

    deadline = time.monotonic() + timeout_s
    client = None
    last_error = ""
    try:
        while client is None:
            if check is not None:
                check()
            try:
                client = await RequestClient.connect(nats_url, deployment, discovery=discovery)
            except Exception as e:  # noqa: BLE001 - not up yet
                last_error = f"{type(e).__name__}: {e}"
                if time.monotonic() > deadline:
                    raise LaunchError(f"request plane {nats_url} unreachable within {timeout_s:g} s ({last_error})") from e
                await asyncio.sleep(POLL_S * 5)
        while True:
            if check is not None:
                check()
            try:
                entries = await client.discovery.list()
            except Exception as e:  # noqa: BLE001 - discovery not answering: try again until the deadline
                last_error = f"{type(e).__name__}: {e}"
                entries = {}
            failed = sorted(n for n in names if (entries.get(n) or {}).get("state") == "failed")
            if failed:
                raise LaunchError(f"worker {failed[0]} failed to start: {entries[failed[0]].get('error')}",
                                  log_tail=tail_file(log_of(failed[0])), log_path=log_of(failed[0]))
            ready = {n for n in names if (entries.get(n) or {}).get("state") == "ready"}
            if progress is not None:
                progress(len(ready), len(names), ", ".join(sorted(names - ready)))
            if ready == names:
                return entries
            if time.monotonic() > deadline:
                slow = sorted(names - ready)
                raise LaunchError(f"not ready within {timeout_s:g} s: {', '.join(slow)}"
                                  + (f" ({last_error})" if last_error else ""),
                                  log_tail=tail_file(log_of(slow[0])), log_path=log_of(slow[0]))
            await asyncio.sleep(POLL_S)
    finally:
        if client is not None:
            await client.close()
