"""Free TCP ports for servers a tdist process starts and hands to another program to bind later
(a vLLM engine's NIXL side channel, Triton's HTTP/gRPC/metrics ports, an etcd for tests).

A port from bind(port 0) is an *ephemeral* port: the kernel hands the same range to every
outgoing connection and every other bind(0) on the machine. Between our check and the other
program's bind (30 s or more while an engine loads) the engines' own ZMQ, gloo and UCX sockets
took such a port here — "Address already in use" in vLLM's handshake listener, and an engine that
never became ready. Ports below the ephemeral range are only ever taken by an explicit bind, so
they are picked from there (at random, each checked free), and port 0 is the fallback.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Linux's default ephemeral range, used where /proc does not say.
_DEFAULT_EPHEMERAL = (32768, 60999)
#: The lowest port picked: clear of well-known and most registered service ports.
_LOWEST = 20000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (net.ipv4.ip_local_port_range)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(lo), int(hi)
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_ports(n: int = 1, host: str = "127.0.0.1", *, rng: random.Random | None = None) -> list[int]:
    """`n` distinct ports that are free on `host` now and outside the ephemeral range."""
    rng = rng or random.SystemRandom()
    lo, hi = ephemeral_range()
    # the candidates: below the ephemeral range, else above it, else (a range covering nearly
    # everything) anything — then a port 0 answer is as good
    candidates = [(_LOWEST, lo - 1), (hi + 1, 65535)]
    out: list[int] = []
    for first, last in candidates:
        if last - first < 256:
            continue
        for _ in range(64 * n):
            if len(out) == n:
                return out
            port = rng.randint(first, last)
            if port not in out and _bindable(host, port):
                out.append(port)
    while len(out) < n:  # fallback: the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in out:
            out.append(port)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """One port that is free on `host` now and outside the ephemeral range (see the module doc)."""
    return free_ports(1, host)[0]
