"""The balancer's core in memory: routing, retries, audits, quorum reads, health and
gossip decisions, the loops that feed them, and evidence moved between balancers; no
sockets.

A `Balancer` is given a fake clock and a fake upstream transport whose backends answer
honestly, lie (a wrong body, so a wrong digest), stall (no answer until the try timeout,
which the fake clock jumps over), drop (the connection fails) or answer over the caps,
and serve gossip views; every try is recorded, so what each backend was sent is known
exactly.
"""

from __future__ import annotations

import asyncio
import gc
import re
import weakref
from dataclasses import dataclass, field

import orjson
import pytest
from twlb.balancer.app import BalancerApp
from twlb.balancer.cli import refreeze
from twlb.balancer.core import FLEET_SETTLED_S, Balancer
from twlb.balancer.settings import BalancerSettings
from twlb.balancer.trust import EjectionReason
from twlb.balancer.upstream import (
    UpstreamConnectError,
    UpstreamOverBudget,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTooLarge,
)

from twlb.outcome import Outcome
from twlb.spec import PolicyName

HONEST, LIAR, STALL, DROP, HUGE = "honest", "liar", "stall", "drop", "huge"
BIG = "big"  # an honest backend whose answers the memory budget has no room for


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeFleet:
    """Backends by behaviour, keyed by URL; `sent` records (backend, method, target)."""

    clock: FakeClock
    behaviour: dict[str, str]
    sent: list[tuple[str, str, bytes]] = field(default_factory=list)
    headers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)  # per try

    def transport(self, url: str) -> FakeUpstream:
        return FakeUpstream(self, url)

    dead: set[str] = field(default_factory=set)  # backends every other's gossip calls dead

    def gossip_view(self, url: str) -> dict:
        """`url`'s GET /gossip: members are named by URL; the others see `dead` dead."""
        states = {m: "dead" if m in self.dead and m != url else "alive" for m in self.behaviour}
        return {"self": url, "members": [{"node": m, "state": s} for m, s in states.items()]}

    def tries_of(self, backend: str, method: str | None = None) -> int:
        return sum(1 for b, m, _ in self.sent if b == backend and method in (None, m))


@dataclass
class FakeUpstream:
    fleet: FakeFleet
    url: str

    async def request(
        self, method: str, target: bytes, headers: list, body: bytes, timeout: float
    ) -> UpstreamResponse:
        self.fleet.sent.append((self.url, method, target))
        self.fleet.headers.append(list(headers))
        await asyncio.sleep(0)  # a real exchange yields to the loop: tries may interleave
        kind = self.fleet.behaviour[self.url]
        if kind == STALL:
            self.fleet.clock.now += timeout  # nothing arrives until the deadline
            raise UpstreamTimeout("no answer within the try timeout")
        if kind == DROP:
            raise UpstreamConnectError("backend closed the connection")
        if kind == HUGE:
            raise UpstreamTooLarge("answer body over 16777216 bytes")
        if kind == BIG:
            raise UpstreamOverBudget("the balancer's memory budget is spent")
        self.fleet.clock.now += 0.002
        if target == b"/gossip":
            return UpstreamResponse(200, [], orjson.dumps(self.fleet.gossip_view(self.url)))
        # Honest backends name themselves in `node` (ignored by audits) and agree on the
        # result; a liar's result differs (its own, so two liars never agree).
        result = target.decode() if kind == HONEST else f"lie from {self.url}"
        doc = {"node": self.url, "result": result}
        return UpstreamResponse(200, [(b"content-type", b"application/json")], orjson.dumps(doc))

    def close(self) -> None:
        pass


def fake_fleet(kinds: list[str], **settings: object) -> tuple[dict, FakeFleet, list[str]]:
    """The Balancer's settings and injected parts for a fake fleet of `kinds`."""
    urls = [f"http://10.0.0.{i + 1}:8000" for i in range(len(kinds))]
    clock = FakeClock()
    fleet = FakeFleet(clock, dict(zip(urls, kinds, strict=True)))
    defaults: dict[str, object] = {
        "backends": tuple(urls),
        "policy": PolicyName.ROUND_ROBIN,
        "audit_fraction": 0.0,
        "unhealthy_threshold": 100,  # keep failing backends in rotation: they are the test
    }
    parts = {
        "settings": BalancerSettings(**{**defaults, **settings}),
        "clock": clock,
        "transport": fleet.transport,
        "health_transport": fleet.transport,
        "gossip_transport": fleet.transport,
    }
    return parts, fleet, urls


def make_balancer(kinds: list[str], **settings: object) -> tuple[Balancer, FakeFleet, list[str]]:
    parts, fleet, urls = fake_fleet(kinds, **settings)
    return Balancer(parts.pop("settings"), **parts), fleet, urls


def result_of(try_result: object) -> str:
    return orjson.loads(try_result.response.body)["result"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [(STALL, Outcome.TIMEOUT), (DROP, Outcome.CONNECT_ERROR), (HUGE, Outcome.ERROR)],
)
async def test_a_failed_get_is_retried_on_another_backend(fault: str, outcome: Outcome) -> None:
    b, fleet, (bad, good) = make_balancer([fault, HONEST])
    for i in range(10):
        last, why = await b.route("GET", f"/work?key={i}".encode(), [], b"", None)
        assert why == "" and last is not None
        assert (last.backend, last.outcome) == (good, Outcome.SUCCESS)
        assert result_of(last) == f"/work?key={i}"
    # Round robin sent at least every other first try to the bad backend (the retry moves
    # its turn on, so it may get them all); each came back as exactly one retry.
    failed = fleet.tries_of(bad)
    assert 5 <= failed <= 10 and fleet.tries_of(good) == 10
    assert b.metrics.retries == failed
    # Each failed try counted against the bad backend as what it was.
    assert b.metrics.backend(bad).outcomes[outcome] == failed
    assert b.metrics.backend(good).outcomes[Outcome.SUCCESS] == 10


@pytest.mark.parametrize("fault", [STALL, DROP, HUGE])
async def test_a_failed_post_is_not_sent_again(fault: str) -> None:
    b, fleet, (bad, good) = make_balancer([fault, HONEST])
    outcomes = []
    for i in range(10):
        last, _ = await b.route("POST", f"/work?key={i}".encode(), [], b"x", None)
        assert last is not None
        outcomes.append((last.backend, last.outcome))
    # Every POST was sent exactly once: the ones that reached the bad backend fail.
    assert len(fleet.sent) == 10 and b.metrics.retries == 0
    assert fleet.tries_of(bad, "POST") == 5 and fleet.tries_of(good, "POST") == 5
    assert {o for be, o in outcomes if be == bad} == {
        {STALL: Outcome.TIMEOUT, DROP: Outcome.CONNECT_ERROR, HUGE: Outcome.ERROR}[fault]
    }


async def test_retries_stop_at_max_tries_when_every_backend_fails() -> None:
    b, fleet, _ = make_balancer([DROP, STALL, HUGE, DROP], max_tries=3)
    last, why = await b.route("GET", b"/work", [], b"", None)
    assert why == "" and last is not None and last.outcome is not Outcome.SUCCESS
    assert len(fleet.sent) == 3  # three different backends, none twice
    assert len({be for be, _, _ in fleet.sent}) == 3


async def test_no_backend_up_is_reported_without_a_try() -> None:
    b, fleet, _ = make_balancer([])
    assert await b.route("GET", b"/work", [], b"", None) == (None, "no backends configured")
    assert fleet.sent == []


async def test_audits_charge_the_liar_a_mismatch_and_never_an_honest_backend() -> None:
    b, fleet, (h1, h2, liar) = make_balancer([HONEST, HONEST, LIAR], audit_fraction=1.0)
    n = 12
    for i in range(n):
        answered, _ = await b.route("GET", f"/work?key={i}".encode(), [], b"", None)
        assert answered is not None
        b.maybe_audit("GET", f"/work?key={i}".encode(), [], answered)
        await asyncio.gather(*b._background)
    # Until the liar is proven every audit includes it (three backends); once proven its
    # vote counts for nothing, so it is audited when it answers and no longer asked as a
    # peer. Every mismatch is the liar's, never an honest backend's.
    mismatches = b.metrics.backend(liar).mismatches
    assert mismatches >= b.engine.evidence.rule.mismatches_to_prove
    assert b.metrics.audits["mismatch"] == mismatches == b.metrics.backend(liar).audits
    assert b.metrics.backend(h1).mismatches == b.metrics.backend(h2).mismatches == 0
    assert b.engine.evidence.is_proven(liar)


async def test_the_trust_policy_learns_to_avoid_the_liar_from_audits() -> None:
    b, fleet, (_, _, _, liar) = make_balancer(
        [HONEST, HONEST, HONEST, LIAR], policy=PolicyName.TRUST, audit_fraction=1.0
    )
    for i in range(200):
        answered, _ = await b.route("GET", f"/work?key={i}".encode(), [], b"", None)
        assert answered is not None
        b.maybe_audit("GET", f"/work?key={i}".encode(), [], answered)
        await asyncio.gather(*b._background)
        if i % 10 == 9:
            b.clock.now += b.settings.trust_tick_s  # type: ignore[attr-defined]
            b.update_trust(b.clock())
    assert sum(b.metrics.trust_tick.counts) == 20  # every tick's compute time is measured
    weights = {u: b.engine.weight(u) for u in b.backends}
    assert weights[liar] < min(w for u, w in weights.items() if u != liar)
    before = fleet.tries_of(liar)
    for i in range(50):
        await b.route("GET", f"/more?key={i}".encode(), [], b"", None)
    # Audits still send it GETs; first tries it now gets at most a small share of.
    assert fleet.tries_of(liar) - before <= 10


async def test_a_quorum_read_returns_the_majority_answer_never_the_liars() -> None:
    b, fleet, urls = make_balancer([HONEST, HONEST, LIAR])
    for i in range(20):
        chosen, why = await b.quorum_read("GET", f"/work?key={i}".encode(), [], b"", quorum=2)
        assert why == "" and chosen is not None
        assert chosen.backend != urls[2]
        assert result_of(chosen) == f"/work?key={i}"
    assert b.metrics.backend(urls[2]).mismatches > 0


async def test_a_quorum_read_without_agreement_answers_nothing() -> None:
    # One honest answer, two different lies, a stall and a drop: no two answers agree.
    b, fleet, urls = make_balancer([HONEST, LIAR, LIAR, STALL, DROP])
    chosen, why = await b.quorum_read("GET", b"/work?key=1", [], b"", quorum=2)
    assert chosen is None
    assert why.startswith("no 2 backends agreed")
    assert len(fleet.sent) == 5  # every backend was asked before giving up
    assert b.metrics.audits["no_quorum"] == 1
    assert all(b.metrics.backend(u).mismatches == 0 for u in urls)  # nobody can be blamed


async def test_a_quorum_read_asks_no_more_backends_than_agreement_needs() -> None:
    b, fleet, _ = make_balancer([HONEST] * 5)
    chosen, why = await b.quorum_read("GET", b"/work?key=7", [], b"", quorum=3)
    assert why == "" and chosen is not None
    assert len(fleet.sent) == 3


async def test_a_quorum_larger_than_the_fleet_up_is_refused_without_a_try() -> None:
    b, fleet, _ = make_balancer([HONEST, HONEST])
    chosen, why = await b.quorum_read("GET", b"/work", [], b"", quorum=3)
    assert chosen is None and why == "quorum 3 needs 3 backends up, 2 are"
    assert fleet.sent == []


async def test_a_try_the_memory_budget_gave_up_is_retried_and_teaches_nothing() -> None:
    parts, fleet, (big, good) = fake_fleet([BIG, HONEST])
    app = BalancerApp(parts.pop("settings"), **parts)
    b = app.balancer
    for i in range(6):
        reply = await app.forward("GET", b"/work", f"key={i}".encode(), [], None, b"")
        assert reply.status == 200
    assert fleet.tries_of(big) >= 3  # every other first try, each retried on `good`
    counters = b.metrics.backends[big]
    assert sum(counters.outcomes.values()) == 0  # not counted against the backend ...
    assert b.up == [big, good]  # ... nor taken out by passive health
    assert b.policy.inflight.get(big, 0) == 0
    parts, fleet, _ = fake_fleet([BIG, BIG])
    app = BalancerApp(parts.pop("settings"), **parts)
    reply = await app.forward("GET", b"/work", b"key=x", [], None, b"")
    assert reply.status == 503  # no backend's answer fitted: the client is told why
    assert "memory budget" in orjson.loads(reply.body)["error"]
    assert app.balancer.metrics.requests["over_budget"] == 1


CLIENT_HEADERS = [
    (b"host", b"lb.example:8080"),
    (b"connection", b"keep-alive, x-secret-hop"),
    (b"x-secret-hop", b"for this hop only"),
    (b"keep-alive", b"timeout=5"),
    (b"x-twlb-key", b"k1"),
    (b"x-twlb-anything", b"internal"),
    (b"x-forwarded-for", b"203.0.113.7"),
    (b"forwarded", b"for=203.0.113.7;proto=https"),
    (b"x-real-ip", b"203.0.113.7"),
    (b"accept", b"application/json"),
]


async def test_hop_and_balancer_headers_stay_here_and_forwarding_headers_are_the_balancers() -> (
    None
):
    parts, fleet, _ = fake_fleet([HONEST])
    app = BalancerApp(parts.pop("settings"), **parts)
    reply = await app.forward("GET", b"/work", b"key=1", CLIENT_HEADERS, "127.0.0.9", b"")
    assert reply.status == 200
    (sent,) = fleet.headers
    # A client's own forwarding headers are claims anyone can write: replaced.
    assert sent[:-1] == [
        (b"accept", b"application/json"),
        (b"x-forwarded-for", b"127.0.0.9"),
        (b"forwarded", b'for=127.0.0.9;host="lb.example:8080";proto=http'),
    ]
    # The request id the balancer made goes to the backend and back to the client.
    name, rid = sent[-1]
    assert name == b"x-request-id" and re.fullmatch(rb"[0-9a-f]{16}", rid)
    assert (b"x-request-id", rid) in reply.headers


async def test_a_trusted_proxys_forwarding_chains_are_kept_and_extended() -> None:
    parts, fleet, _ = fake_fleet([HONEST], trusted_proxies=("127.0.0.0/8", "::1"))
    app = BalancerApp(parts.pop("settings"), **parts)
    await app.forward("GET", b"/work", b"key=1", CLIENT_HEADERS, "127.0.0.9", b"")
    await app.forward("GET", b"/work", b"key=2", CLIENT_HEADERS, "::1", b"")
    await app.forward("GET", b"/work", b"key=3", CLIENT_HEADERS, "10.1.2.3", b"")
    trusted_v4, trusted_v6, untrusted = (
        [h for h in sent if h[0] != b"x-request-id"] for sent in fleet.headers
    )
    assert trusted_v4 == [
        (b"x-real-ip", b"203.0.113.7"),
        (b"accept", b"application/json"),
        (b"x-forwarded-for", b"203.0.113.7, 127.0.0.9"),
        (
            b"forwarded",
            b'for=203.0.113.7;proto=https, for=127.0.0.9;host="lb.example:8080";proto=http',
        ),
    ]
    assert trusted_v6[-1] == (
        b"forwarded",
        b'for=203.0.113.7;proto=https, for="[::1]";host="lb.example:8080";proto=http',
    )
    assert (b"x-forwarded-for", b"10.1.2.3") in untrusted
    assert (b"x-real-ip", b"203.0.113.7") not in untrusted


async def test_failing_health_checks_take_a_backend_out_and_passing_ones_keep_the_rest() -> None:
    b, fleet, (good, dropping) = make_balancer(
        [HONEST, DROP], health_interval_s=0.02, unhealthy_threshold=2, health_timeout_s=0.5
    )
    await b.start()
    try:
        # Bounded wait (real sleeps of the health loop): 2 failed checks at 20 ms each.
        for _ in range(500):
            if dropping not in b.up:
                break
            await asyncio.sleep(0.01)
        assert b.up == [good]
        checks = [u for u, _, target in fleet.sent if target == b"/healthz"]
        assert good in checks and dropping in checks
    finally:
        await b.stop()


def test_health_check_results_take_a_backend_out_and_back_in_memory() -> None:
    b, fleet, (good, bad) = make_balancer([HONEST, HONEST], unhealthy_threshold=2)
    now = b.clock()
    for t in (1.0, 2.0):
        assert b.on_health_check(good, True, now + t)
        assert b.on_health_check(bad, False, now + t)
    assert b.up == [good]
    assert b.metrics.backend(bad).ejections[EjectionReason.HEALTH] == 1
    assert b.on_health_check(bad, True, now + 3.0) and b.up == [good]  # one pass: not yet
    assert b.on_health_check(bad, True, now + 4.0) and b.up == [good, bad]
    assert b.metrics.backend(bad).readmissions == 1
    assert b.remove_backend(bad)
    assert not b.on_health_check(bad, True, now + 5.0)  # not in the fleet: its checks end


async def test_a_backend_added_while_running_is_checked_and_one_removed_no_longer() -> None:
    b, fleet, (first,) = make_balancer([HONEST], health_interval_s=0.02)
    added = "http://10.0.0.9:8000"
    fleet.behaviour[added] = HONEST

    def checks(url: str) -> int:
        return sum(1 for u, _, target in fleet.sent if u == url and target == b"/healthz")

    await b.start()
    try:
        assert b.add_backend(added)
        for _ in range(500):  # bounded wait: checks every 20 ms
            if checks(added) >= 2:
                break
            await asyncio.sleep(0.01)
        assert checks(added) >= 2
        assert b.remove_backend(added)
        await asyncio.sleep(0)
        seen, others = checks(added), checks(first)
        await asyncio.sleep(0.1)  # five intervals
        assert checks(added) == seen  # its checks ended with it
        assert checks(first) > others  # the rest go on
    finally:
        await b.stop()


async def test_a_liar_proven_by_one_balancer_is_out_of_another_that_imports_the_evidence() -> None:
    first, _, urls = make_balancer(
        [HONEST, HONEST, HONEST, LIAR], policy=PolicyName.TRUST, audit_fraction=1.0
    )
    liar = urls[3]
    for i in range(60):
        answered, _ = await first.route("GET", f"/work?key={i}".encode(), [], b"", None)
        assert answered is not None
        first.maybe_audit("GET", f"/work?key={i}".encode(), [], answered)
        await asyncio.gather(*first._background)
        if first.engine.is_proven(liar):
            break
    assert first.engine.is_proven(liar)
    doc = orjson.loads(orjson.dumps(first.export_evidence(first.clock())))

    second, fleet, _ = make_balancer([HONEST, HONEST, HONEST, LIAR], policy=PolicyName.TRUST)
    assert second.import_evidence(doc, second.clock()) == urls
    assert second.engine.is_ejected(liar)
    assert second.metrics.backend(liar).ejections[EjectionReason.PROVEN_LIAR] == 1
    for i in range(30):
        await second.route("GET", f"/work?key={i}".encode(), [], b"", None)
    assert fleet.tries_of(liar) == 0
    with pytest.raises(ValueError, match="evidence format"):
        second.import_evidence({"format": 0}, second.clock())


async def test_an_answer_seen_in_other_traffic_is_audited_by_asking_other_backends() -> None:
    b, fleet, (h1, h2, h3, liar) = make_balancer([HONEST] * 3 + [LIAR], audit_fraction=1.0)
    lie = UpstreamResponse(200, [], orjson.dumps({"node": liar, "result": "made up"}))
    # As the Envoy control plane does: draw (the share shown: all), then start the audit.
    for k in range(2):
        peers = b.auditor.draw("GET", liar, 1.0)
        assert peers is not None
        b.start_audit("GET", f"/work?key={k}".encode(), [], liar, lie, peers)
        await asyncio.gather(*b._background)
    assert fleet.tries_of(liar) == 0  # its answer was seen, not asked for
    assert fleet.tries_of(h1) + fleet.tries_of(h2) + fleet.tries_of(h3) >= 4
    assert b.metrics.backend(liar).mismatches == 2 and b.engine.is_proven(liar)
    assert b.auditor.draw("POST", h1, 1.0) is None  # only safe methods


async def test_the_gossip_loop_takes_out_a_backend_every_other_member_calls_dead() -> None:
    b, fleet, (a, c, victim) = make_balancer(
        [HONEST] * 3, gossip_poll_s=0.02, health_interval_s=60.0
    )
    fleet.dead.add(victim)
    await b.start()
    try:
        for _ in range(500):  # bounded wait: a round every 20 ms
            if victim not in b.up:
                break
            await asyncio.sleep(0.01)
        assert b.up == [a, c]
        assert b.trust_report()["backends"][2]["gossip"]["verdict"] == "dead"
        fleet.dead.clear()  # the members take it back
        for _ in range(500):
            if victim in b.up:
                break
            await asyncio.sleep(0.01)
        assert b.up == [a, c, victim]
    finally:
        await b.stop()


def test_the_fleet_settled_call_comes_once_a_window_after_the_last_change() -> None:
    calls: list[float] = []
    parts, fleet, urls = fake_fleet([HONEST, HONEST], window_s=2.0)
    clock = parts["clock"]
    b = Balancer(parts.pop("settings"), fleet_settled=lambda: calls.append(clock()), **parts)
    start = clock()
    fleet.behaviour["http://10.0.0.9:8000"] = HONEST
    assert b.add_backend("http://10.0.0.9:8000")

    def run_until(t: float) -> None:
        while clock.now < t - 1e-9:
            clock.now = round(clock.now + 0.1, 6)
            b.tick(clock())

    run_until(start + 2.0 + FLEET_SETTLED_S - 0.1)  # a window and the margin not yet over
    assert calls == []
    run_until(start + 2.0 + FLEET_SETTLED_S)
    assert calls == [pytest.approx(start + 3.0)]
    run_until(start + 20.0)  # nothing changed since: no second call
    assert len(calls) == 1
    assert b.remove_backend("http://10.0.0.9:8000")  # a change starts the wait again
    run_until(start + 20.0 + 2.0 + FLEET_SETTLED_S)
    assert calls[1:] == [pytest.approx(start + 23.0)]


def test_refreeze_collects_garbage_cycles_before_freezing_the_rest() -> None:
    class Node:
        pass

    cycle = Node()
    cycle.me = cycle  # type: ignore[attr-defined]
    gone = weakref.ref(cycle)
    del cycle
    kept = Node()
    try:
        refreeze()
        assert gone() is None  # collected, not frozen for good
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: no longer scanned
    finally:
        gc.unfreeze()
