"""Liars in memory: the real `Balancer` core, driven with a fake clock and an in-memory
transport whose backends act out the backend's own fault injector (byzantine and
colluding answers included). Fast enough for many seeds and long runs: each liar is
ejected within the evidence rule's bound at every lie rate, colluders are both ejected
and no honest node ever is."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from twlb.backend.faults import FaultAction, FaultInjector
from twlb.balancer.core import Balancer
from twlb.balancer.evidence import EvidenceRule
from twlb.balancer.settings import BalancerSettings
from twlb.balancer.trust import EjectionReason
from twlb.balancer.upstream import UpstreamResponse

from twlb.spec import FaultSpec
from twlb.work import digest

RATE = 150.0  # requests per simulated second
ROUNDS = 1


class MemoryBackend:
    """One backend in memory: answers /work as `twlb backend` does under its fault."""

    def __init__(self, url: str, fault: FaultSpec, seed: int) -> None:
        self.name = url.rsplit(":", 1)[-1]
        self.injector = FaultInjector(fault, random.Random(seed), 0.0)
        self.now = 0.0

    async def request(
        self, method: str, target: bytes, headers: list, body: bytes, timeout: float
    ) -> UpstreamResponse:
        query = dict(parse_qsl(urlsplit(target.decode()).query))
        key, rounds = query["key"], int(query["rounds"])
        answer = digest(key, rounds)
        decision = self.injector.decide(self.now, key)
        if decision.action is FaultAction.BYZANTINE:
            answer = self.injector.wrong_digest(answer)
        elif decision.action is FaultAction.COLLUDING:
            answer = self.injector.colluded_digest(key, rounds, answer)
        doc = {"node": self.name, "key": key, "rounds": rounds, "digest": answer}
        return UpstreamResponse(200, [(b"content-type", b"application/json")], orjson.dumps(doc))

    def close(self) -> None:
        pass


class Fleet:
    """Backends by URL, the transport factory the balancer is given, and a fake clock."""

    def __init__(self, faults: list[FaultSpec], seed: int) -> None:
        self.urls = [f"http://10.0.0.1:{9000 + i}" for i in range(len(faults))]
        self.backends = {
            u: MemoryBackend(u, f, seed * 100 + i)
            for i, (u, f) in enumerate(zip(self.urls, faults, strict=True))
        }
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def transport(self, url: str) -> MemoryBackend:
        return self.backends[url]


def balancer(fleet: Fleet, seed: int, audit: float, **settings: object) -> Balancer:
    s = BalancerSettings(
        backends=tuple(fleet.urls), policy="trust", audit_fraction=audit, seed=seed,
        model="heuristic", **settings,
    )  # fmt: skip
    return Balancer(s, clock=fleet.clock, transport=fleet.transport)


async def drive(
    b: Balancer, fleet: Fleet, requests: int, stop_when: callable = lambda: False
) -> Counter[str]:
    """`requests` basic-client GETs at RATE per simulated second (trust updated every
    0.5 s, audits finished before the next request); wrong answers by backend URL."""
    wrong: Counter[str] = Counter()
    next_trust = 0.0
    for i in range(requests):
        fleet.now = i / RATE
        for m in fleet.backends.values():
            m.now = fleet.now
        if fleet.now >= next_trust:
            b.policy.tick(fleet.now)
            b.update_trust(fleet.now)
            next_trust += 0.5
        key = f"k{i}"
        target = f"/work?key={key}&rounds={ROUNDS}".encode()
        result, _ = await b.route("GET", target, [], b"", key)
        assert result is not None
        if orjson.loads(result.response.body)["digest"] != digest(key, ROUNDS):
            wrong[result.backend] += 1
        b.maybe_audit("GET", target, [], result)
        while b._background:  # the audit runs to its verdict before the next request
            await asyncio.gather(*list(b._background))
        if stop_when():
            break
    return wrong


def ejected_for(b: Balancer, url: str) -> dict[EjectionReason, int]:
    return dict(b.metrics.backend(url).ejections)


HONEST = FaultSpec()


@pytest.mark.parametrize("rate", [1.0, 0.3, 0.1, 0.02])
def test_a_liar_delivers_no_more_wrong_answers_than_the_bound_at_any_rate(rate: float) -> None:
    audit = 0.1
    bound = EvidenceRule().wrong_answers_bound(audit, 1.0)  # 67 at a = 0.1, 99.9%
    delivered = []
    for seed in range(6):
        fleet = Fleet([FaultSpec(type="byzantine", probability=rate), *[HONEST] * 7], seed)
        b = balancer(fleet, seed, audit)
        liar = fleet.urls[0]
        wrong = asyncio.run(drive(b, fleet, 40_000, lambda b=b, u=liar: b.engine.is_proven(u)))
        assert b.engine.is_proven(liar) and b.engine.is_ejected(liar), (rate, seed)
        assert ejected_for(b, liar)[EjectionReason.PROVEN_LIAR] == 1
        assert set(wrong) <= {liar}
        delivered.append(wrong[liar])
        for h in fleet.urls[1:]:
            assert not any(ejected_for(b, h).values()), (h, ejected_for(b, h))
            assert b.engine.evidence[h].mismatches == 0
    assert max(delivered) <= bound, delivered


def test_two_colluders_among_eight_are_ejected_and_no_honest_node_is_over_a_long_run() -> None:
    # Colluders that lie on only 30% of keys, so they keep earning agreeing audits, and
    # a byzantine node besides: 30,000 requests (200 simulated seconds), ~3,000 audits.
    ring = FaultSpec(type="colluding", probability=0.3, collusion_group="ring")
    for seed in range(2):
        fleet = Fleet([ring, ring, *[HONEST] * 6], seed)
        b = balancer(fleet, seed, 0.1)
        wrong = asyncio.run(drive(b, fleet, 30_000))
        for c in fleet.urls[:2]:
            assert b.engine.is_proven(c) and b.engine.is_ejected(c), (seed, c)
        for h in fleet.urls[2:]:
            assert not any(ejected_for(b, h).values()), (seed, h, ejected_for(b, h))
            assert b.engine.evidence[h].mismatches == 0, (seed, h)
        # the widened audit charges both colluders at once: few wrong answers in all
        assert sum(wrong.values()) <= 2 * EvidenceRule().wrong_answers_bound(0.1, 1.0)
