"""Ports for services started next: outside the kernel's ephemeral range, never twice."""

from __future__ import annotations

import socket

from twlb.processes.managed import ephemeral_ports, free_port, free_port_range


def test_free_ports_are_outside_the_ephemeral_range_distinct_and_bindable() -> None:
    low, high = ephemeral_ports()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)  # never the same port twice from one process
    assert not [p for p in ports if low <= p <= high]
    for port in ports[:20]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_a_port_range_is_handed_out_whole_and_not_again() -> None:
    base = free_port_range(16)
    later = {free_port() for _ in range(300)}
    assert not later & set(range(base, base + 16))
