"""Bounded loads under concurrency, in memory: the balancer's core routes Zipf-hot keys from
48 concurrent clients to backends that answer after random delays, and the transport,
which counts the requests really in flight on each backend, checks every placement.

The policy keeps its own in-flight counts (`on_start`/`on_end`); the transport's count is
independent of them. At each request that reaches a backend the transport checks the
paper's promise against its own count: the backend now carries at most
ceil(c x (L + 1) / N) (L + 1 the requests in flight, this one included), and a key left
its own backend only if that backend was full.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import orjson
from twlb.balancer.core import Balancer
from twlb.balancer.hashing import HashRing
from twlb.balancer.settings import BalancerSettings
from twlb.balancer.upstream import UpstreamResponse

from twlb.spec import PolicyName

C = 1.25
VNODES = 160
URLS = [f"http://10.0.0.{i + 1}:8000" for i in range(5)]


def zipf_keys(count: int, distinct: int, s: float, seed: int) -> list[str]:
    """`count` keys drawn from `distinct` ones with Zipf weights 1 / rank^s."""
    rng = random.Random(seed)
    names = [f"user-{i}" for i in range(distinct)]
    return rng.choices(names, [1 / (r + 1) ** s for r in range(distinct)], k=count)


@dataclass
class Observer:
    """The backends' side: requests in flight on each, and every placement checked."""

    ring: HashRing
    rng: random.Random
    delay_s: tuple[float, float]  # each answer takes a random time in this range
    inflight: dict[str, int] = field(default_factory=lambda: dict.fromkeys(URLS, 0))
    placements: int = 0
    over_bound: list[tuple] = field(default_factory=list)
    left_home_with_room: list[tuple] = field(default_factory=list)
    spills: int = 0
    most_over_mean: float = 0.0  # chosen load / (c x mean) at a placement, the worst

    def transport(self, url: str) -> ObservedUpstream:
        return ObservedUpstream(self, url)

    def place(self, url: str, key: str) -> None:
        home = self.ring.owner(key)
        home_load = self.inflight[home]  # before this request
        self.inflight[url] += 1
        total = sum(self.inflight.values())  # L + 1
        bound = math.ceil(C * total / len(URLS))
        self.placements += 1
        if self.inflight[url] > bound:
            self.over_bound.append((key, url, self.inflight[url], bound))
        if url != home:
            self.spills += 1
            if home_load < bound:
                self.left_home_with_room.append((key, home, home_load, bound))
        self.most_over_mean = max(self.most_over_mean, self.inflight[url] / (C * total / 5))


@dataclass
class ObservedUpstream:
    observer: Observer
    url: str

    async def request(
        self, method: str, target: bytes, headers: list, body: bytes, timeout: float
    ) -> UpstreamResponse:
        key = parse_qs(urlsplit(target.decode()).query)["key"][0]
        obs = self.observer
        obs.place(self.url, key)
        try:
            await asyncio.sleep(obs.rng.uniform(*obs.delay_s))
        finally:
            obs.inflight[self.url] -= 1
        doc = {"node": self.url, "result": key}
        return UpstreamResponse(200, [(b"content-type", b"application/json")], orjson.dumps(doc))

    def close(self) -> None:
        pass


def bounded_balancer(seed: int, delay_s: tuple[float, float]) -> tuple[Balancer, Observer]:
    ring = HashRing(VNODES)
    ring.set_nodes(URLS)
    observer = Observer(ring, random.Random(seed), delay_s)
    settings = BalancerSettings(
        backends=tuple(URLS),
        policy=PolicyName.BOUNDED_LOAD,
        balance_factor=C,
        vnodes=VNODES,
        audit_fraction=0.0,  # audits add tries the policy does not place
        model="heuristic",
    )
    b = Balancer(settings, transport=observer.transport, health_transport=observer.transport)
    return b, observer


async def _clients(b: Balancer, keys: list[str], clients: int) -> list[str]:
    """`clients` concurrent clients sending the keys in turn; the backend of each key."""
    served: list[str] = [""] * len(keys)
    turn = iter(range(len(keys)))

    async def client() -> None:
        for i in turn:
            target = f"/work?key={keys[i]}".encode()
            result, why = await b.route("GET", target, [], b"", keys[i])
            assert why == "" and result is not None and result.response is not None
            served[i] = result.backend

    await asyncio.gather(*(client() for _ in range(clients)))
    return served


async def test_zipf_keys_from_48_clients_never_put_a_backend_over_the_bound() -> None:
    b, obs = bounded_balancer(seed=1, delay_s=(0.0005, 0.006))
    keys = zipf_keys(6000, distinct=1000, s=1.1, seed=1)
    served = await _clients(b, keys, clients=48)
    assert obs.placements == len(keys) == b.policy.placements  # one try per request
    assert obs.over_bound == []
    assert obs.left_home_with_room == []
    # The hot keys are what the bound is for: they spilled, and the spills are what the
    # policy counted.
    assert obs.spills == b.policy.spills > 0
    assert b.policy.worst_load_over_bound <= 1.0
    hottest = Counter(keys).most_common(1)[0][0]
    assert len({s for k, s in zip(keys, served, strict=True) if k == hottest}) > 1
    # Nothing is left counted in flight once every answer is in.
    assert set(b.policy.inflight.values()) == {0}
    assert {rec.inflight for rec in b.fleet.records.values()} == {0}


async def test_the_same_keys_sent_twice_at_low_load_land_on_the_same_backends() -> None:
    b, obs = bounded_balancer(seed=2, delay_s=(0.0, 0.0))
    keys = zipf_keys(2000, distinct=1000, s=1.1, seed=2)
    first = await _clients(b, keys, clients=1)
    second = await _clients(b, keys, clients=1)
    assert first == second
    assert first == [obs.ring.owner(k) for k in keys]  # every key on its own backend
    assert b.policy.spills == 0
