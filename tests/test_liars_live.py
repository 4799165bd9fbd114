"""Liars on real backends: `twlb balancer --policy trust` in front of real `twlb backend`
processes on loopback, driven by a client that counts (but, like a real client, does not
repair) wrong answers. Each liar is proven and ejected after delivering no more wrong
answers than the evidence rule's bound; colluders are both ejected and no honest node
is; a proven liar that goes quiet stays out until its back-off ends.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from test_balancer_api import ServiceGroup, _sample, group  # noqa: F401 (the module fixture)
from twlb.balancer.evidence import EvidenceRule

from twlb.work import digest

QUIET = ("--log-level", "warning")
AUDIT = 0.2
ROUNDS = 2
#: Answers in flight when the proving audit lands: the client's concurrency. They can
#: still come from the liar, on top of the bound (which counts answers up to the proof).
CONCURRENCY = 4


def _backend(group: ServiceGroup, name: str, *fault: str) -> str:  # noqa: F811
    return group.start("backend", "--no-simulation", "--node-id", name, *QUIET, *fault)


def _balancer(group: ServiceGroup, backends: list[str], *extra: str) -> str:  # noqa: F811
    return group.start(
        "balancer", "--policy", "trust", "--audit-fraction", repr(AUDIT), "--seed", "3",
        *(a for b in backends for a in ("--backend", b)), *QUIET, *extra,
    )  # fmt: skip


def _trust(balancer: str) -> dict[str, dict]:
    rows = httpx.get(balancer + "/trust", timeout=5).json()["backends"]
    return {r["url"]: r for r in rows}


def _metric(balancer: str, name: str, labels: str) -> float:
    with httpx.Client(base_url=balancer, timeout=5) as client:
        return _sample(client, name, labels)


async def _drive(
    balancer: str, budget: int, done: callable, prefix: str
) -> tuple[Counter[str], int]:
    """GET /work with `CONCURRENCY` callers until `done()` (checked every 40 answers) or
    `budget` requests; returns wrong answers by the node that gave them, and requests sent."""
    wrong: Counter[str] = Counter()
    sent = 0
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=balancer, timeout=5) as client:

        async def caller(worker: int) -> None:
            nonlocal sent
            while not stop.is_set() and sent < budget:
                i = sent = sent + 1
                key = f"{prefix}-{worker}-{i}"
                r = await client.get("/work", params={"key": key, "rounds": ROUNDS})
                if r.status_code == 200 and r.json()["digest"] != digest(key, ROUNDS):
                    wrong[r.json()["node"]] += 1
                if i % 40 == 0 and await asyncio.to_thread(done):
                    stop.set()

        await asyncio.gather(*(caller(w) for w in range(CONCURRENCY)))
    return wrong, sent


@dataclass
class Sites:
    liars: dict[float, tuple[str, str]]  # lie rate -> (balancer, liar)
    ring: tuple[str, list[str], list[str]]  # balancer, colluders, honest
    quiet: tuple[str, str]  # balancer with a 4 s liar back-off, liar


QUIET_BACKOFF_S = 4.0


@pytest.fixture(scope="module")
def sites(group: ServiceGroup) -> Iterator[Sites]:  # noqa: F811
    """Every balancer and backend of this module, started at once (starting is most of
    what these tests cost)."""
    liars = {}
    for rate in (1.0, 0.3, 0.1, 0.02):
        name = f"liar-{rate:g}"
        liar = _backend(group, name, "--fault-type", "byzantine", "--fault-probability", str(rate))
        honest = [_backend(group, f"{name}-honest-{i}") for i in range(2)]
        liars[rate] = (_balancer(group, [liar, *honest], "--model", "heuristic"), liar)
    colluding = ("--fault-type", "colluding", "--collusion-group", "ring")
    colluders = [_backend(group, f"colluder-{i}", *colluding) for i in range(2)]
    honest = [_backend(group, f"honest-{i}") for i in range(6)]
    ring = _balancer(group, [*colluders, *honest])  # the shipped model: the default
    liar = _backend(group, "quiet-liar", "--fault-type", "byzantine")
    quiet_honest = [_backend(group, f"quiet-honest-{i}") for i in range(2)]
    quiet = _balancer(
        group, [liar, *quiet_honest], "--liar-backoff", repr(QUIET_BACKOFF_S),
        "--model", "heuristic",
    )  # fmt: skip
    group.wait()
    yield Sites(liars, (ring, colluders, honest), (quiet, liar))


@pytest.mark.parametrize("rate", [1.0, 0.3, 0.1, 0.02])
def test_a_liar_at_any_rate_is_ejected_within_the_bound(sites: Sites, rate: float) -> None:
    balancer, liar = sites.liars[rate]
    rule = EvidenceRule()
    bound = rule.wrong_answers_bound(AUDIT, 1.0)  # 32 at a = 0.2, 99.9%

    def proven() -> bool:
        return _trust(balancer)[liar]["evidence"]["proven"]

    # A liar at 2% needs ~1/(a r) = 250 of its answers for an audited lie; it gets a third
    # of the traffic. The budget covers the bound's 32 lies at that rate, and more.
    wrong, sent = asyncio.run(_drive(balancer, 12_000, proven, f"r{rate:g}"))
    row = _trust(balancer)[liar]
    assert row["evidence"]["proven"] and row["state"] == "ejected", (sent, row)
    assert _metric(balancer, "twlb_balancer_ejections_total", f'backend="{liar}",reason="proven_liar"') == 1  # fmt: skip
    delivered = wrong[f"liar-{rate:g}"]
    assert delivered <= bound + CONCURRENCY, (delivered, bound, sent)
    assert set(wrong) <= {f"liar-{rate:g}"}  # nobody else lied
    honest = [u for u in _trust(balancer) if u != liar]
    assert not any(_trust(balancer)[u]["evidence"]["mismatches"] for u in honest)


def test_two_colluders_among_eight_are_ejected_and_no_honest_node_is(sites: Sites) -> None:
    balancer, colluders, honest = sites.ring

    def both_proven() -> bool:
        rows = _trust(balancer)
        return all(rows[c]["evidence"]["proven"] for c in colluders)

    # 2,400 requests, ~500 audits: a long run at this audit fraction for the honest nodes.
    wrong, sent = asyncio.run(_drive(balancer, 2_400, lambda: False, "ring"))
    rows = _trust(balancer)
    assert both_proven(), {c: rows[c]["evidence"] for c in colluders}
    for c in colluders:
        assert rows[c]["state"] == "ejected"
    for h in honest:
        assert not rows[h]["evidence"]["proven"] and rows[h]["evidence"]["mismatches"] == 0
        assert rows[h]["state"] != "ejected", rows[h]
        for reason in ("model", "proven_liar", "health", "gossip"):
            labels = f'backend="{h}",reason="{reason}"'
            assert _metric(balancer, "twlb_balancer_ejections_total", labels) == 0
    # both colluders were caught by the widened audits: few wrong answers each
    assert sum(wrong.values()) <= 2 * EvidenceRule().wrong_answers_bound(AUDIT, 1.0) + CONCURRENCY


def test_a_proven_liar_that_goes_quiet_stays_out_until_its_back_off_ends(sites: Sites) -> None:
    balancer, liar = sites.quiet
    backoff = QUIET_BACKOFF_S

    def proven() -> bool:
        return _trust(balancer)[liar]["evidence"]["proven"]

    asyncio.run(_drive(balancer, 3_000, proven, "quiet"))
    evidence = _trust(balancer)[liar]["evidence"]
    assert evidence["proven"], evidence
    until = evidence["backoff_until"]  # the balancer's monotonic clock: the system's
    assert until == pytest.approx(evidence["proven_at"] + backoff)
    # No traffic at all now: quiet is no evidence of honesty. Poll its state.
    seen_back = None
    deadline = time.monotonic() + backoff + 10.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        state = _trust(balancer)[liar]["state"]
        if state != "ejected":
            seen_back = now
            break
        time.sleep(0.1)
    assert seen_back is not None, "never readmitted after its back-off"
    # readmitted only once its back-off was over (polls see it at most 0.1 s late)
    assert seen_back >= until
    assert _metric(balancer, "twlb_balancer_readmissions_total", f'backend="{liar}"') == 1
    assert _trust(balancer)[liar]["evidence"]["standing"] == "suspect"
