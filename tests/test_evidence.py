"""Proof of lies, sans-IO: the SPRT's rule, its bound on wrong answers, proven liars in the
trust engine (ejected first, held out by back-off, not forgiven for quiet), weighted votes,
the colluding fault, and evidence exported and imported."""

from __future__ import annotations

import math
import random
import statistics

import orjson
import pytest
from twlb.backend.faults import FaultAction, FaultInjector
from twlb.balancer.audit import VOTE_WEIGHT, Auditor, compare_answers, widen
from twlb.balancer.evidence import EvidenceBook, EvidenceRule, Standing, Verdict
from twlb.balancer.fleet import Fleet
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.trust import (
    ChangeKind,
    EjectionReason,
    TrustChange,
    TrustEngine,
    TrustEvent,
    TrustState,
)

from twlb.spec import FaultSpec, FaultType, NodeClass

RULE = EvidenceRule()
FLEET = [f"b{i}" for i in range(8)]


def book(*backends: str) -> EvidenceBook:
    b = EvidenceBook(RULE)
    b.set_backends(backends or FLEET)
    return b


# -- the rule ------------------------------------------------------------------------------


def test_rule_derives_its_thresholds_from_the_hypotheses() -> None:
    assert RULE.mismatch_step == pytest.approx(math.log(0.01 / 1e-5))
    assert RULE.agree_step == pytest.approx(math.log(0.99 / (1 - 1e-5)))
    assert RULE.prove_at == pytest.approx(math.log(0.99 / 1e-4))
    assert RULE.clear_at == pytest.approx(math.log(0.01 / (1 - 1e-4)))
    assert RULE.mismatches_to_prove == 2
    assert RULE.readmit_llr + RULE.mismatch_step >= RULE.prove_at


def test_rule_refuses_hypotheses_that_cannot_be_told_apart() -> None:
    with pytest.raises(ValueError, match="honest_mismatch_rate < liar_rate"):
        EvidenceRule(honest_mismatch_rate=0.1, liar_rate=0.05)
    with pytest.raises(ValueError, match="error rates"):
        EvidenceRule(false_proof=0.7)
    with pytest.raises(ValueError, match="backoff"):
        EvidenceRule(backoff_s=0.0)


def test_back_off_doubles_with_each_offence_up_to_its_cap() -> None:
    rule = EvidenceRule(backoff_s=10.0, max_backoff_s=50.0)
    assert [rule.backoff(n) for n in (1, 2, 3, 4)] == [10.0, 20.0, 40.0, 50.0]


def test_bound_is_about_one_over_the_audit_fraction() -> None:
    assert RULE.wrong_answers_expected(0.1, 1.0) == pytest.approx(11.0)
    assert RULE.wrong_answers_expected(0.05, 1.0) == pytest.approx(21.0)
    # 99.9%: ln(1000)/-ln(0.9) = 65.6 lies until one is audited, then one more lie
    assert RULE.wrong_answers_bound(0.1, 1.0) == 66 + 1
    with pytest.raises(ValueError, match="audit fractions"):
        RULE.wrong_answers_bound(0.0, 1.0)


def test_a_readmitted_liar_is_one_audited_lie_from_proof() -> None:
    book = EvidenceBook(EvidenceRule(backoff_s=10.0))
    book.set_backends(["b"])
    for _ in range(RULE.mismatches_to_prove):
        book.record("b", True, 0.0)
    assert book.tick(10.0) == ["b"] and book.standing("b") is Standing.SUSPECT
    assert book.record("b", True, 10.5) is Verdict.PROVEN
    assert RULE.mismatches_to_prove_again == 1
    # at the suspect fraction 1 its first lie is audited; at 0.5, ln(1000)/ln(2) = 9.97
    assert RULE.readmitted_wrong_answers_bound(1.0) == 1
    assert RULE.readmitted_wrong_answers_bound(0.5) == 10


# -- the test ------------------------------------------------------------------------------


def test_two_mismatches_prove_a_liar_and_one_makes_it_suspect() -> None:
    b = book()
    assert b.record("b0", True, 1.0) is Verdict.SUSPECTED
    assert b.standing("b0") is Standing.SUSPECT
    assert b.record("b0", False, 2.0) is Verdict.NONE
    assert b.record("b0", True, 3.0) is Verdict.PROVEN
    e = b["b0"]
    assert (e.standing, e.offences, e.proven_at, e.out_until) == (
        Standing.PROVEN,
        1,
        3.0,
        3.0 + RULE.backoff_s,
    )
    assert VOTE_WEIGHT[b.standing("b0")] == 0.0 and b.record("b0", True, 4.0) is Verdict.NONE


def test_the_suspects_are_one_set_for_good_whatever_the_fleet_does() -> None:
    b = book()
    suspects = b.suspects
    b.record("b0", True, 0.0)
    b.record("b1", True, 0.0)
    b.set_backends(FLEET[1:])  # b0 leaves the fleet
    assert b.suspects is suspects == {"b1"}  # readers may keep it
    b.record("b1", True, 1.0)  # proven: no longer a suspect
    assert suspects == set()


def test_agreement_banks_no_credit_a_liar_could_spend() -> None:
    b = book()
    for t in range(10_000):
        b.record("b0", False, float(t))
    assert b["b0"].llr == 0.0
    b.record("b0", True, 1e4)
    assert b.record("b0", True, 1e4 + 1) is Verdict.PROVEN


def test_a_suspect_that_keeps_agreeing_is_cleared() -> None:
    b = book()
    b.record("b0", True, 0.0)
    needed = math.ceil((RULE.mismatch_step - RULE.clear_at) / -RULE.agree_step)
    verdicts = [b.record("b0", False, 1.0 + i) for i in range(needed)]
    assert verdicts[-1] is Verdict.CLEARED and Verdict.CLEARED not in verdicts[:-1]
    assert (b.standing("b0"), b["b0"].llr) == (Standing.CLEAR, 0.0)


def test_a_proven_liar_is_not_forgiven_for_being_quiet() -> None:
    b = book()
    b.record("b0", True, 0.0)
    b.record("b0", True, 1.0)
    # Nobody audits it; time passes, but not its back-off.
    for t in range(1, 60):
        assert b.tick(1.0 + t * 0.999) == []
        assert b.is_proven("b0")
    assert b.tick(1.0 + RULE.backoff_s) == ["b0"]
    assert b.standing("b0") is Standing.SUSPECT
    # back on probation: one more lie proves it again, and the back-off doubles
    assert b.record("b0", True, 100.0) is Verdict.PROVEN
    assert b["b0"].out_until == 100.0 + 2 * RULE.backoff_s


def _wrong_before_proof(lie_rate: float, audit: float, suspect: float, seed: int) -> int:
    """Answers of one liar until the book proves it: audits drawn independently of lies,
    an audited answer already delivered (as in the balancer)."""
    rng = random.Random(seed)
    b = book("liar")
    wrong = 0
    for n in range(1_000_000):
        lie = rng.random() < lie_rate
        wrong += lie
        fraction = suspect if b.standing("liar") is Standing.SUSPECT else audit
        if rng.random() < fraction and b.record("liar", lie, float(n)) is Verdict.PROVEN:
            return wrong
    raise AssertionError("never proven")


@pytest.mark.parametrize("lie_rate", [1.0, 0.3, 0.1, 0.02])
def test_wrong_answers_before_proof_stay_within_the_bound_at_any_lie_rate(
    lie_rate: float,
) -> None:
    audit, suspect = 0.1, 1.0
    runs = [_wrong_before_proof(lie_rate, audit, suspect, seed) for seed in range(300)]
    # The bound at confidence c is exceeded with probability at most 1 - c: at 99.9%, by
    # a handful of 300 runs at most; at 1 - 1e-6, by none (fixed seeds: no flakes).
    over = sum(n > RULE.wrong_answers_bound(audit, suspect) for n in runs)
    assert over <= 3
    assert max(runs) <= RULE.wrong_answers_bound(audit, suspect, confidence=1 - 1e-6)
    # the mean is about 1/a + (k - 1)/s; 300 geometric draws put it within ~15% of it
    assert statistics.fmean(runs) == pytest.approx(
        RULE.wrong_answers_expected(audit, suspect), rel=0.2
    )


# -- the trust engine ----------------------------------------------------------------------


def engine(**kwargs) -> TrustEngine:
    e = TrustEngine(HeuristicScorer(), **kwargs)
    e.set_backends(FLEET, 0.0)
    return e


def prove(e: TrustEngine, backend: str, now: float) -> None:
    e.record_audit(backend, True, now)
    assert e.record_audit(backend, True, now) is Verdict.PROVEN


def ejected_on_proof(e: TrustEngine, backend: str) -> list[TrustChange]:
    """Assert `backend` is out on proof and the one change since the last drain says so."""
    assert e.is_ejected(backend) and e.is_proven(backend) and backend not in e.admitted
    changes = e.drain_changes()
    assert [(c.kind, c.backend, c.reason) for c in changes] == [
        (ChangeKind.EJECTION, backend, EjectionReason.PROVEN_LIAR)
    ]
    return changes


def test_a_proven_liar_is_ejected_at_once_whatever_its_weight() -> None:
    e = engine()
    e.drain_changes()
    prove(e, "b3", 1.0)
    [change] = ejected_on_proof(e, "b3")
    assert change.as_record()["event"] == "ejection" and change.as_record()["proven"]
    # a perfect score does not bring it back; only the end of its back-off does
    e.apply("b3", TrustEvent.HIGH, 2.0)
    assert e.is_ejected("b3")
    e.tick(1.0 + RULE.backoff_s - 0.001)
    assert e.is_ejected("b3")
    e.tick(1.0 + RULE.backoff_s)
    assert e.state("b3") is TrustState.PROBATION and not e.is_proven("b3")
    assert [c.kind for c in e.drain_changes()] == [ChangeKind.READMISSION]


def test_proven_liars_count_against_the_floor_first_and_the_floor_never_holds_them() -> None:
    e = engine(max_ejected_fraction=0.5)  # four of eight may be out
    for b in ("b0", "b1", "b2"):
        prove(e, b, 1.0)
    prove(e, "b3", 1.0)  # exempt: a fourth liar goes out whatever the floor says
    prove(e, "b4", 1.0)  # and a fifth
    assert sum(e.is_ejected(b) for b in FLEET) == 5
    # the model may eject nothing more: a node it scores low is held, at weight 0
    for b in ("b5",):
        e._backends[b].weight = 0.05
    e.update({}, 2.0)
    assert e.is_held("b5") and not e.is_ejected("b5")
    assert e.admitted["b5"] == 0.0
    kinds = [(c.kind, c.backend) for c in e.drain_changes()]
    assert (ChangeKind.HOLD, "b5") in kinds


def test_the_floor_ejects_the_liar_and_holds_the_node_whose_failures_clients_see() -> None:
    e = engine(max_ejected_fraction=0.25)  # two of eight
    e._backends["b0"].weight = 0.1  # an erroring node the model scores low
    e._backends["b1"].weight = 0.1
    e.update({}, 1.0)
    assert e.is_ejected("b0") and e.is_ejected("b1")
    e._backends["b2"].weight = 0.2  # a liar the model scores low but not lowest
    e.update({}, 2.0)
    assert e.is_held("b2")
    prove(e, "b2", 3.0)
    assert e.is_ejected("b2") and not e.is_held("b2")


# -- weighted votes ------------------------------------------------------------------------


def test_liars_that_agree_cannot_outvote_once_their_votes_weigh_nothing() -> None:
    answers = {"c1": "lie", "c2": "lie", "h": "truth"}
    assert compare_answers(answers).odd == ["h"]  # unweighted, two colluders win
    weighed = compare_answers(answers, weights={"c1": 0.0, "c2": 0.0, "h": 1.0}, quorum=1)
    assert weighed.majority == ["h"] and weighed.odd == ["c1", "c2"]
    assert compare_answers(answers).split


def test_a_widened_audit_needs_an_absolute_majority() -> None:
    answers = {"a": "x", "b": "x", "c": "y", "d": "z"}
    assert compare_answers(answers).quorum_met
    assert not compare_answers(answers, absolute=True).quorum_met
    assert compare_answers({**answers, "e": "x"}, absolute=True).majority == ["a", "b", "e"]


# -- the colluding fault -------------------------------------------------------------------


def colluder(seed: int, group: str = "g", probability: float = 1.0) -> FaultInjector:
    spec = FaultSpec(type=FaultType.COLLUDING, probability=probability, collusion_group=group)
    return FaultInjector(spec, random.Random(seed), 0.0)


def test_colluders_of_one_group_give_the_same_wrong_answer_for_the_same_key() -> None:
    a, b, other = colluder(1), colluder(2), colluder(1, group="h")
    assert a.decide(1.0, "k").action is FaultAction.COLLUDING
    truth = "0" * 64
    assert a.colluded_digest("k", 3, truth) == b.colluded_digest("k", 3, truth) != truth
    assert a.colluded_digest("k", 3, truth) != a.colluded_digest("k2", 3, truth)
    assert a.colluded_digest("k", 3, truth) != other.colluded_digest("k", 3, truth)
    assert FaultSpec(type=FaultType.COLLUDING).node_class is NodeClass.BYZANTINE


def test_colluders_lie_on_the_same_keys_at_their_rate() -> None:
    a, b = colluder(1, probability=0.3), colluder(99, probability=0.3)
    keys = [f"key-{i}" for i in range(4000)]
    lies_a = [a.decide(1.0, k).action is FaultAction.COLLUDING for k in keys]
    assert lies_a == [b.decide(1.0, k).action is FaultAction.COLLUDING for k in keys]
    assert sum(lies_a) / len(keys) == pytest.approx(0.3, abs=0.03)


def test_collusion_group_is_a_backend_flag() -> None:
    spec = FaultSpec(type=FaultType.COLLUDING, collusion_group="ring-1")
    assert "--collusion-group" in spec.to_args() and "ring-1" in spec.to_args()
    with pytest.raises(ValueError, match="collusion_group|collusionGroup"):
        FaultSpec.model_validate({"type": "colluding", "collusionGroup": "bad group!"})


# -- audit where it pays -------------------------------------------------------------------


def auditor(e: TrustEngine, fraction: float = 0.1) -> Auditor:
    fleet = Fleet(window_s=10.0, resolution_s=0.25)
    for b in FLEET:
        fleet.add(b, None, None, up=True)
    rates = dict(probation_fraction=0.5, suspect_fraction=1.0, by_standing=True)
    return Auditor(fleet, e, random.Random(0), fraction=fraction, **rates)


def test_a_suspect_is_audited_at_the_suspect_fraction_until_cleared_or_proven() -> None:
    e = engine()
    e.update({}, 0.0)
    a = auditor(e)
    assert a.fraction_of("b1") == 0.5  # new backends start in probation
    e.apply("b1", TrustEvent.HIGH, 0.5)
    assert a.fraction_of("b1") == 0.1
    e.record_audit("b1", True, 1.0)
    assert a.fraction_of("b1") == 1.0
    assert auditor(e, fraction=0.0).fraction_of("b1") == 0.0  # audits off


def test_a_split_audit_widens_to_the_backends_not_asked_yet_up_to_the_limit() -> None:
    assert widen(["a", "b", "c"], ["a", "d", "b", "e", "f"]) == ["d", "e", "f"]
    assert widen(["a", "b", "c"], [f"n{i}" for i in range(20)]) == [f"n{i}" for i in range(6)]
    assert widen(["a", "b"], ["c", "d"], limit=3) == ["c"]


# -- evidence that outlives its balancer ---------------------------------------------------


def test_exported_evidence_reads_back_with_its_times_moved_to_the_readers_clock() -> None:
    b = book()
    b.record("b0", True, 0.0)
    b.record("b0", True, 1.0)  # proven at 1: out until 1 + backoff
    b.record("b1", True, 2.0)  # a suspect
    doc = orjson.loads(orjson.dumps(b.export(11.0)))  # JSON through and through
    assert doc["format"] == 1 and doc["backends"]["b0"]["backoff_left_s"] == RULE.backoff_s - 10
    assert doc["backends"]["b0"]["proven_s_ago"] == 10.0
    parsed = book().parse(doc, 1000.0)
    assert parsed["b0"].proven_at == 990.0 and parsed["b0"].out_until == 990.0 + RULE.backoff_s
    assert (parsed["b1"].standing, parsed["b1"].llr) == (Standing.SUSPECT, b["b1"].llr)
    assert parsed["b2"] == b["b2"]
    other = book()
    for backend, evidence in parsed.items():
        other.restore(backend, evidence)
    assert other.is_proven("b0") and other.suspects == {"b1"}
    assert other.tick(990.0 + RULE.backoff_s - 0.001) == []
    assert other.tick(990.0 + RULE.backoff_s) == ["b0"]
    assert other.suspects == {"b0", "b1"}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d.update(format=2), "evidence format must be 1"),
        (lambda d: d["rule"].update(liar_rate=0.5), "gathered under rule"),
        (lambda d: d.update(backends=[]), "'backends' must be an object"),
        (lambda d: d["backends"].update(b0=7), "evidence of b0: must be an object"),
        (lambda d: d["backends"]["b0"].update(standing="guilty"), "evidence of b0: standing"),
        (lambda d: d["backends"]["b0"].update(llr=float("nan")), "b0: llr must be a finite"),
        (lambda d: d["backends"]["b0"].update(backoff_left_s=None), "b0: a proven backend"),
        (lambda d: d["backends"]["b0"].update(backoff_left_s=-1), "b0: backoff_left_s must be"),
        (lambda d: d["backends"]["b1"].update(llr=50.0), "b1: a suspect needs"),
        (lambda d: d["backends"]["b2"].update(llr=1.0), "b2: a clear backend"),
        (lambda d: d["backends"]["b2"].update(audits=-1), "b2: audits must be an integer"),
        (lambda d: d["backends"]["b2"].update(mismatches=3), r"b2: mismatches \(3\) exceed"),
    ],
)
def test_evidence_that_this_rule_could_not_have_produced_is_refused_by_name(
    change, error: str
) -> None:
    b = book()
    b.record("b0", True, 0.0)
    b.record("b0", True, 1.0)
    b.record("b1", True, 2.0)
    doc = b.export(3.0)
    change(doc)
    with pytest.raises(ValueError, match=error):
        book().parse(doc, 10.0)


def test_an_imported_back_off_is_cut_to_this_books_longest() -> None:
    b = book()
    b.record("b0", True, 0.0)
    b.record("b0", True, 1.0)
    doc = b.export(1.0)
    doc["backends"]["b0"]["backoff_left_s"] = 1e12
    assert book().parse(doc, 5.0)["b0"].out_until == 5.0 + RULE.max_backoff_s


def test_a_liar_proven_by_one_engine_is_out_of_another_that_imports_the_evidence() -> None:
    first = engine()
    prove(first, "b3", 1.0)
    doc = first.evidence.export(2.0)
    doc["backends"]["not-here"] = doc["backends"]["b0"]
    second = engine()
    second.update({}, 0.0)
    second.drain_changes()
    assert second.import_evidence(doc, 100.0) == FLEET  # not-here is not in this fleet
    ejected_on_proof(second, "b3")
    # out for what was left of its back-off, counted on the importer's clock
    second.tick(100.0 + RULE.backoff_s - 1.0 - 0.001)
    assert second.is_ejected("b3")
    second.tick(100.0 + RULE.backoff_s - 1.0)
    assert second.state("b3") is TrustState.PROBATION


def test_evidence_that_clears_a_backend_readmits_it_and_bad_evidence_changes_nothing() -> None:
    e = engine()
    prove(e, "b3", 1.0)
    clean = engine().evidence.export(2.0)
    broken = {**clean, "backends": {**clean["backends"], "b5": {"standing": "proven"}}}
    with pytest.raises(ValueError, match="evidence of b5"):
        e.import_evidence(broken, 3.0)
    assert e.is_proven("b3") and e.evidence.is_proven("b3")  # nothing changed
    e.drain_changes()
    e.import_evidence(clean, 3.0)
    assert e.state("b3") is TrustState.PROBATION and not e.is_proven("b3")
    assert [c.kind for c in e.drain_changes()] == [ChangeKind.READMISSION]
