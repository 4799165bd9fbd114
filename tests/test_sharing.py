"""The sans-IO side of replicas sharing evidence (services/balancer/sharing.py): what a
replica tells its peers, what it takes from them, and what it never takes on their word.
"""

from __future__ import annotations

import pytest
from twlb.balancer.evidence import EvidenceBook, EvidenceRule, Standing
from twlb.balancer.sharing import (
    MAX_EXPOSURES,
    REPLAY_AGAIN_S,
    REPLAY_TRIES,
    Exposure,
    SharedEvidence,
    parse_document,
)

A, B, C, D = (f"http://10.0.0.{i}:80" for i in range(1, 5))
FLEET = [A, B, C, D]
WORK = Exposure("GET", "/work?key=1", (("accept", "*/*"),))


def book_with(*proven: str, suspect: tuple[str, ...] = (), now: float = 0.0) -> EvidenceBook:
    book = EvidenceBook(EvidenceRule())
    book.set_backends(FLEET)
    for b in proven:
        book.record(b, True, now)
        book.record(b, True, now)
    for b in suspect:
        book.record(b, True, now)
    return book


def claim(standing: str, exposures: int = 1, left: float | None = 60.0, offences: int = 1):
    return {
        "standing": standing,
        "offences": offences,
        "backoff_left_s": left if standing == "proven" else None,
        "exposures": [
            {"method": "GET", "target": f"/work?key={i}", "headers": [["accept", "*/*"]]}
            for i in range(exposures)
        ],
    }


def doc(replica: str = "peer", **backends: dict) -> dict:
    return {"format": 1, "replica": replica, "backends": backends}


def test_an_exposure_keeps_no_credentials_and_stays_within_its_caps() -> None:
    headers = [(b"authorization", b"Bearer s3cret"), (b"cookie", b"id=1"), (b"accept", b"*/*")]
    x = Exposure.of("GET", b"/work?key=" + b"k" * 10_000, headers)
    assert x.headers == (("accept", "*/*"),) and len(x.target) == 8192
    assert Exposure.parse(x.as_json()) == x
    assert x.request() == ("GET", x.target.encode(), [(b"accept", b"*/*")])


@pytest.mark.parametrize(
    ("exposure", "complaint"),
    [
        ({"method": "POST", "target": "/x"}, "must be GET"),
        ({"method": "GET", "target": "x"}, "must be a path"),
        ({"method": "GET", "target": "/a b"}, "not allowed"),
        ({"method": "GET", "target": "/x", "headers": [["bad name", "v"]]}, "not a token"),
        ({"method": "GET", "target": "/x", "headers": [["h", "a\r\nb"]]}, "control character"),
        ({"method": "GET", "target": "/x", "headers": [["h"]]}, "pair of strings"),
    ],
)
def test_a_peers_exposure_that_is_not_a_replayable_get_is_refused(exposure, complaint) -> None:
    with pytest.raises(ValueError, match=complaint):
        Exposure.parse(exposure)


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ([], "JSON object"),
        ({"format": 2, "replica": "p", "backends": {}}, "format must be 1"),
        ({"format": 1, "replica": "", "backends": {}}, "replica"),
        (doc(**{A: {"standing": "clear"}}), "only suspect or proven"),
        (doc(**{A: {"standing": "liar"}}), "standing must be"),
        (doc(**{A: claim("proven", offences=-1)}), "offences"),
        (doc(**{A: claim("proven", left=-5)}), "backoff_left_s"),
        (doc(**{A: claim("proven", exposures=MAX_EXPOSURES + 1)}), "at most"),
    ],
)
def test_a_document_that_is_not_evidence_is_refused_whole(document, complaint) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_document(document, 3600.0)


def test_a_document_tells_suspects_and_proven_liars_with_how_they_were_exposed() -> None:
    sharing = SharedEvidence("me")
    sharing.note_exposure(A, WORK)
    sharing.note_exposure(A, WORK)  # kept once
    book = book_with(A, suspect=(B,), now=10.0)
    out = sharing.document(book, now=15.0)
    assert out["replica"] == "me" and set(out["backends"]) == {A, B}
    assert out["backends"][A]["standing"] == "proven"
    assert out["backends"][A]["backoff_left_s"] == pytest.approx(55.0)
    assert out["backends"][A]["exposures"] == [WORK.as_json()]
    assert out["backends"][B] == {
        "standing": "suspect", "offences": 0, "backoff_left_s": None, "exposures": []
    }  # fmt: skip
    # What it sends, its peers can read.
    assert parse_document(out, 3600.0)[1][A].exposures == (WORK,)


def test_a_peers_claim_is_replayed_never_taken_as_proof() -> None:
    sharing = SharedEvidence("me")
    book = book_with()
    sharing.receive("peer", doc(**{A: claim("proven", exposures=2)}), 0.0, 3600.0)
    assert not book.is_proven(A)  # nothing changed in this replica's evidence
    (job,) = sharing.replays_due(book, FLEET, now=0.0)
    assert job.backend == A and job.prove and job.tries == REPLAY_TRIES
    assert len(job.exposures) == 2
    # One run at a time per backend, and the same claim again only after a while.
    assert sharing.replays_due(book, FLEET, now=1.0) == []
    sharing.replay_done(A)
    assert sharing.replays_due(book, FLEET, now=1.0) == []
    later = REPLAY_AGAIN_S + 1  # the peer kept saying so meanwhile
    sharing.receive("peer", doc(**{A: claim("proven", exposures=2)}), later, 3600.0)
    assert sharing.replays_due(book, FLEET, now=later)[0].backend == A


def test_a_suspicion_is_replayed_once_per_exposure_and_a_backend_proven_here_not_at_all() -> None:
    sharing = SharedEvidence("me")
    sharing.receive("p", doc(**{A: claim("suspect", exposures=3), B: claim("proven")}), 0.0, 3600)
    book = book_with(B)
    (job,) = sharing.replays_due(book, FLEET, now=0.0)
    assert job.backend == A and not job.prove and job.tries == 3
    # Claims without a request to replay call for nothing.
    sharing.receive("q", doc(replica="q", **{C: claim("proven", exposures=0)}), 0.0, 3600)
    sharing.replay_done(A)
    assert [j.backend for j in sharing.replays_due(book, FLEET, now=0.0)] == []


def test_watches_are_capped_at_a_quarter_of_the_fleet_the_most_claimed_first() -> None:
    sharing = SharedEvidence("me")
    everything = {u: claim("proven") for u in FLEET}
    sharing.receive("liar", doc(replica="liar", **everything), 0.0, 3600)
    sharing.receive("honest", doc(replica="honest", **{C: claim("suspect")}), 0.0, 3600)
    watched = sharing.watched(FLEET, now=0.0)
    assert len(watched) == 2 and C in watched
    # A peer that fell silent: its claims lapse.
    assert sharing.watched(FLEET, now=sharing.stale_after_s + 1) == set()


def test_a_liar_proven_here_stays_out_as_long_as_a_peer_says_and_no_longer_than_the_rule() -> None:
    rule = EvidenceRule()
    sharing = SharedEvidence("me")
    book = book_with(A, now=100.0)
    assert book[A].out_until == pytest.approx(160.0)
    sharing.receive("p", doc(**{A: claim("proven", left=200.0, offences=3)}), 110.0, 3600)
    assert sharing.adopt_backoff(book, now=110.0) == [A]
    assert book[A].out_until == pytest.approx(310.0) and book[A].offences == 3
    assert sharing.adopt_backoff(book, now=110.0) == []  # no change the second time
    # A claim past the rule's longest back-off is cut to it.
    sharing.receive("p", doc(**{A: claim("proven", left=1e8)}), 120.0, rule.max_backoff_s)
    sharing.adopt_backoff(book, now=120.0)
    assert book[A].out_until == pytest.approx(120.0 + rule.max_backoff_s)
    # A backend not proven here is not extended into a proof.
    sharing.receive("p", doc(**{B: claim("proven", left=500.0)}), 120.0, 3600)
    assert B not in sharing.adopt_backoff(book, now=120.0)
    assert book.standing(B) is Standing.CLEAR


def test_this_replicas_own_document_coming_back_is_not_a_peers_view() -> None:
    sharing = SharedEvidence("me")
    sharing.receive("me", doc(replica="me", **{A: claim("proven")}), 0.0, 3600)
    assert sharing.views == {}
