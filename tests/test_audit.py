"""Audit comparison: majorities, odd ones out, ties and failed tries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twlb.balancer.audit import answers_split, compare_answers

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


def _audits_started(policy: str, trusted: bool, n: int = 2000) -> int:
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
    answered = TryResult(fleet[0], Outcome.SUCCESS, None, 0.003)
    for _ in range(n):
        balancer.maybe_audit("GET", b"/work", [], answered)
    return len(started)


def test_the_trust_policy_audits_backends_in_probation_more_often() -> None:
    assert 850 <= _audits_started("trust", trusted=False) <= 1150  # --probation-audit-fraction
    assert 50 <= _audits_started("trust", trusted=True) <= 150  # --audit-fraction 0.05
    assert 50 <= _audits_started("round-robin", trusted=False) <= 150  # baselines: unchanged


@given(
    st.dictionaries(
        st.sampled_from("abcdefgh"), st.one_of(st.none(), st.sampled_from([D1, D2, D3]))
    )
)
def test_answers_split_says_what_the_full_comparison_says(answers: dict) -> None:
    assert answers_split(answers) == compare_answers(answers).split
