"""Audits: comparing answers (majorities, odd ones out, ties, failed tries), and the
auditor: where audits go, whom they ask, when a split vote is decided, what a verdict
records."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twlb.balancer.audit import Auditor, answers_split, compare_answers
from twlb.balancer.fleet import Fleet
from twlb.balancer.metrics import BackendCounters
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.trust import TrustEngine, TrustEvent

D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64


def test_two_agree_and_one_is_odd() -> None:
    result = compare_answers({"a": D1, "b": D2, "c": D1})
    assert result.quorum_met and result.agreed_digest == D1
    assert result.majority == ["a", "c"] and result.odd == ["b"] and result.failed == []
    assert result.reason == ""


def test_all_agree() -> None:
    result = compare_answers({"a": D1, "b": D1, "c": D1})
    assert result.agreed_digest == D1 and result.majority == ["a", "b", "c"]
    assert result.odd == []


def test_a_tie_is_no_agreement_and_charges_nobody() -> None:
    result = compare_answers({"a": D1, "b": D2, "c": D1, "d": D2})
    assert not result.quorum_met and result.agreed_digest is None
    assert result.odd == [] and result.majority == []
    assert "answer groups [2, 2]" in result.reason
    split = compare_answers({"a": D1, "b": D2, "c": D3})
    assert not split.quorum_met and split.odd == []


def test_failures_are_listed_and_do_not_vote() -> None:
    result = compare_answers({"a": None, "b": D1, "c": D1})
    assert result.quorum_met and result.failed == ["a"] and result.odd == []
    lonely = compare_answers({"a": None, "b": D2, "c": None})
    assert not lonely.quorum_met and lonely.failed == ["a", "c"]
    assert "at least 2 identical answers" in lonely.reason
    nobody = compare_answers({"a": None, "b": None})
    assert nobody.reason == "no backend answered (2 failed)"


def test_quorum_is_configurable() -> None:
    assert not compare_answers({"a": D1, "b": D1, "c": D2}, quorum=3).quorum_met
    assert compare_answers({"a": D1}, quorum=1).agreed_digest == D1
    with pytest.raises(ValueError, match="quorum must be at least 1"):
        compare_answers({"a": D1}, quorum=0)


def test_odd_keeps_the_order_of_the_answers() -> None:
    result = compare_answers({"x": D2, "a": D1, "y": D3, "b": D1, "c": D1})
    assert result.odd == ["x", "y"] and result.group_sizes == [3, 1, 1]


def _audits_started(policy: str, trusted: bool, suspect: bool = False, n: int = 2000) -> int:
    """How many of n answers from backend a the balancer sends to be cross-checked."""
    from twlb.balancer.app import Balancer, TryResult
    from twlb.balancer.settings import BalancerSettings
    from twlb.balancer.trust import TrustEvent

    from twlb.outcome import Outcome

    fleet = tuple(f"http://127.0.0.1:{9000 + i}" for i in range(4))
    balancer = Balancer(BalancerSettings(backends=fleet, policy=policy, audit_fraction=0.05))
    started: list[str] = []

    def spawn(coro, name: str) -> None:
        coro.close()
        started.append(name)

    balancer._spawn = spawn  # type: ignore[method-assign]
    if trusted:
        balancer.engine.apply(fleet[0], TrustEvent.HIGH, 1.0)
    if suspect:  # out-voted once, after a change of the fleet re-synced every core
        assert balancer.add_backend("http://127.0.0.1:9010")
        balancer.engine.record_audit(fleet[0], True, 1.0)
    answered = TryResult(fleet[0], Outcome.SUCCESS, None, 0.003)
    for _ in range(n):
        balancer.maybe_audit("GET", b"/work", [], answered)
    return len(started)


def test_the_trust_policy_audits_backends_in_probation_more_often() -> None:
    assert 850 <= _audits_started("trust", trusted=False) <= 1150  # --probation-audit-fraction
    assert 50 <= _audits_started("trust", trusted=True) <= 150  # --audit-fraction 0.05
    assert 50 <= _audits_started("round-robin", trusted=False) <= 150  # baselines: unchanged


def test_the_trust_policy_audits_every_answer_of_a_suspect() -> None:
    assert _audits_started("trust", trusted=True, suspect=True) == 2000  # suspect fraction 1
    assert 50 <= _audits_started("round-robin", trusted=True, suspect=True) <= 150


@given(
    st.dictionaries(
        st.sampled_from("abcdefgh"), st.one_of(st.none(), st.sampled_from([D1, D2, D3]))
    )
)
def test_answers_split_says_what_the_full_comparison_says(answers: dict) -> None:
    assert answers_split(answers) == compare_answers(answers).split


# -- the auditor ---------------------------------------------------------------------------

FIVE = [f"b{i}" for i in range(5)]


def _auditor(fraction: float = 1.0, by_standing: bool = False) -> Auditor:
    """An auditor over a fleet of five backends b0..b4, all up, with real counters."""
    fleet = Fleet(window_s=10.0, resolution_s=0.25)
    for b in FIVE:
        fleet.add(b, pool=None, counters=BackendCounters(), up=True)
    engine = TrustEngine(HeuristicScorer())
    engine.set_backends(FIVE, 0.0)
    return Auditor(
        fleet,
        engine,
        random.Random(7),
        fraction=fraction,
        probation_fraction=0.5,
        suspect_fraction=1.0,
        by_standing=by_standing,
    )


def _prove(a: Auditor, backend: str) -> None:
    a.engine.record_audit(backend, True, 1.0)
    a.engine.record_audit(backend, True, 1.0)
    assert a.engine.is_proven(backend)


def test_the_auditor_asks_two_voters_never_the_answerer_a_proven_liar_or_one_down() -> None:
    a = _auditor()
    _prove(a, "b1")
    a.fleet.set_up(["b0", "b1", "b2", "b3"])  # b4 out of rotation
    peers = [a.draw("GET", "b0") for _ in range(200)]
    assert all(p is not None and len(set(p)) == 2 for p in peers)
    assert set().union(*peers) == {"b2", "b3"}
    assert a.draw("POST", "b0") is None  # only safe methods are asked again
    a.fleet.set_up(["b0", "b1", "b2"])
    assert a.draw("GET", "b0") is None  # fewer than two voters besides the answerer


def test_audits_off_draw_nothing_and_the_fraction_is_the_share_drawn() -> None:
    assert all(_auditor(fraction=0.0).draw("GET", "b0") is None for _ in range(100))
    a = _auditor(fraction=0.1)
    drawn = sum(a.draw("GET", "b0") is not None for _ in range(5000))
    assert 400 <= drawn <= 600


def test_a_split_vote_widens_once_and_is_decided_when_no_answer_to_come_can_change_it() -> None:
    a = _auditor()
    ballot = a.ballot("b0", D1, ["b1", "b2"])
    ballot.vote("b1", D1)
    assert ballot.more() == [] and not ballot.decided  # no split: every answer decides
    ballot.vote("b2", D2)
    more = ballot.more()
    assert sorted(more) == ["b3", "b4"] and ballot.widened and ballot.asked == set(FIVE)
    assert ballot.more() == []  # widened once
    assert not ballot.decided  # 2 of 5 votes agree so far
    ballot.vote("b3", D1)
    assert ballot.decided  # 3 of 5: the two still out cannot change it
    verdict = a.judge(ballot.answers, 2, 5.0, absolute=ballot.widened)
    assert verdict.majority == ["b0", "b1", "b3"] and verdict.odd == ["b2"]


def test_judgement_is_evidence_in_the_window_the_counters_and_the_book() -> None:
    a = _auditor()
    verdict = a.judge({"b0": D1, "b1": D1, "b2": D2, "gone": D1}, 2, 3.0)
    assert verdict.quorum_met and verdict.odd == ["b2"]  # "gone" left the fleet: not recorded
    records = a.fleet.records
    assert [(records[b].counters.audits, records[b].counters.mismatches) for b in FIVE] == [
        (1, 0),
        (1, 0),
        (1, 1),
        (0, 0),
        (0, 0),
    ]
    assert records["b2"].window.stats(3.0).audit_mismatches == 1
    assert records["b0"].window.stats(3.0).audits == 1
    assert a.engine.evidence["b2"].mismatches == 1 and a.engine.evidence.suspects == {"b2"}
    # a suspect's vote counts half: one clear voter now outweighs it
    assert a.vote_weights(["b0", "b2"]) == {"b0": 1.0, "b2": 0.5}
    tie = a.judge({"b0": D1, "b2": D2}, 1, 4.0)
    assert tie.majority == ["b0"] and tie.odd == ["b2"]
    # no agreement charges nobody
    before = a.engine.evidence["b3"].audits
    assert not a.judge({"b3": D1, "b4": D2}, 2, 5.0).quorum_met
    assert a.engine.evidence["b3"].audits == before


def test_under_the_trust_policy_audits_go_to_suspects_and_backends_in_probation() -> None:
    a = _auditor(fraction=0.05, by_standing=True)
    assert a.fraction_of("b0") == 0.5  # a new backend is in probation
    a.engine.apply("b0", TrustEvent.HIGH, 1.0)
    assert a.fraction_of("b0") == 0.05
    a.engine.record_audit("b0", True, 2.0)
    assert a.fraction_of("b0") == 1.0  # a suspect: every answer
    assert a.fraction_of("not-in-the-fleet") == 0.5  # as the engine reports it: probation
    assert _auditor(fraction=0.05).fraction_of("b1") == 0.05  # other policies: the base
