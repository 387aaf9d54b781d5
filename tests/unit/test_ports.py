"""tdist.runtime.ports: ports handed to another program to bind later come from outside the
kernel's ephemeral range, where no outgoing connection or bind(0) can take them meanwhile."""

from __future__ import annotations

import random
import socket

from tdist.runtime import ports


def test_ports_are_free_distinct_and_outside_the_ephemeral_range() -> None:
    lo, hi = ports.ephemeral_range()
    assert 1024 <= lo < hi <= 65535
    got = ports.free_ports(20)
    assert len(set(got)) == 20
    for p in got:
        assert not lo <= p <= hi
        with socket.socket() as s:  # free: bindable now
            s.bind(("127.0.0.1", p))


def test_a_taken_port_is_never_returned() -> None:
    lo, _ = ports.ephemeral_range()
    taken = ports.free_port()
    other = taken + 1 if taken + 1 < lo else taken - 1
    held = socket.socket()
    held.bind(("127.0.0.1", taken))
    held.listen()
    try:
        # the random choice offers the held port twice, then another: the answer is the other
        choices = iter([taken, taken, other] * 50)

        class Rigged(random.Random):
            def randint(self, a: int, b: int) -> int:
                return next(choices)

        assert ports.free_ports(1, rng=Rigged()) == [other]
    finally:
        held.close()


def test_falls_back_to_the_kernel_when_nothing_outside_the_range_is_usable(monkeypatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    [p] = ports.free_ports(1)
    assert 1024 <= p <= 65535
