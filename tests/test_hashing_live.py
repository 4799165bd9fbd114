"""The hashing policies in the real balancer: each key goes where the sans-IO core says."""

from __future__ import annotations

import httpx
import pytest
from twlb.balancer.hashing import HashRing, MaglevTable, rendezvous_owner

pytestmark = pytest.mark.timeout(90)


def test_each_hashing_policy_routes_a_key_where_its_core_puts_it(spawn) -> None:
    quiet = ("--log-level", "warning")
    backends = [
        spawn("backend", "--node-id", f"n{i}", "--no-simulation", *quiet)[1] for i in range(3)
    ]
    args = [a for b in backends for a in ("--backend", b)] + ["--audit-fraction", "0", *quiet]
    ring = HashRing(40)
    ring.set_nodes(backends)
    expected = {
        "rendezvous": lambda k: rendezvous_owner(k, backends),
        "maglev": _maglev(backends),
        # One request at a time: nothing is in flight, so bounded loads never spill a key.
        "bounded-load": ring.owner,
    }
    by_url = {b: f"n{i}" for i, b in enumerate(backends)}
    for policy, owner in expected.items():
        _, url = spawn(
            "balancer", "--policy", policy, "--vnodes", "40", "--balance-factor", "1.5", *args
        )
        with httpx.Client(base_url=url, timeout=5) as client:
            served = {}
            for i in range(45):
                key = f"user-{i}"
                # The key travels in the header, or as the work's own ?key= parameter.
                by_header = client.get("/work", params={"key": "x"}, headers={"X-TWLB-Key": key})
                by_query = client.get("/work", params={"key": key})
                assert by_header.status_code == by_query.status_code == 200
                served[key] = by_header.json()["node"]
                assert served[key] == by_query.json()["node"] == by_url[owner(key)], (policy, key)
            assert set(served.values()) == {"n0", "n1", "n2"}
            rows = client.get("/trust").json()["backends"]
        if policy == "bounded-load":
            assert {r["policy"]["balance_factor"] for r in rows} == {1.5}


def _maglev(backends: list[str]):
    table = MaglevTable()
    table.set_nodes(backends)
    return table.owner
