"""Proof of lies (sans-IO): a per-backend sequential probability ratio test over audit verdicts.

An audit that finds a backend the odd one out against a majority of agreeing backends is
evidence, and evidence does not fade with time: a backend's statistic moves only when one
of its answers is audited, never because it went quiet.

The test (Wald's SPRT, restarted whenever it accepts "honest"). Each audit of backend b
gives x = 1 (b was the odd one out) or x = 0 (b agreed with the majority). Two hypotheses:

- H0 "honest": b is out-voted only by chance, with probability `honest_mismatch_rate` (eps);
- H1 "liar": b lies on a share `liar_rate` (p) of its answers.

The log-likelihood ratio after n audits with m mismatches is

    LLR = m * ln(p / eps) + (n - m) * ln((1 - p) / (1 - eps))

b is PROVEN a liar when LLR >= A = ln((1 - beta) / alpha), and cleared (H0 accepted,
the test restarts at 0) when LLR <= B = ln(beta / (1 - alpha)), where alpha is the
chance of proving an honest backend a liar in one test and beta the chance of clearing a
liar at rate p. A backend with no open test (CLEAR) keeps LLR at 0: agreeing answers do
not bank credit a liar could later spend on lies.

With the defaults (eps 1e-5, p 0.01, alpha 1e-4, beta 0.01) one mismatch adds
ln(1000) = 6.91, one agreement subtracts 0.00995, A = 9.20 and B = -4.60: the first
mismatch makes a backend SUSPECT, a second one within ~460 agreeing audits proves it.
A liar at any rate above about 0.002 is proven by its second audited lie; an honest
backend needs two chance out-votes inside one test (~1150 audits), which the balancer's
escalated audits (all backends vote when answers split, liars' votes weigh nothing) make
far rarer than eps.

While SUSPECT, a backend's answers are audited at `suspect_audit_fraction` (say s)
instead of the base fraction a. Audits are drawn independently of whether an answer
lies, so the lies a liar delivers before its first audited lie are geometric with mean
(1 - a) / a, and after it, the k - 1 further lies that prove it are each preceded by a
mean (1 - s) / s unaudited ones. The audited lies themselves were delivered too (an audit
checks an answer already sent), so the expected wrong answers before ejection are

    E[wrong] = 1/a + (k - 1)/s       (k = mismatches_to_prove, 2 by default)

whatever the lie rate, and with probability 1 - delta at most
ceil(ln(1/delta) / a) + (k - 1) * ceil(ln(1/delta) / s). `wrong_answers_bound` computes it.

A proven backend is out of rotation for a back-off that doubles with each proven offence
(`backoff_s` * 2**(offences - 1), capped at `max_backoff_s`), counted from its conviction;
when it ends the backend comes back SUSPECT with its statistic one half-mismatch below A,
so a single further audited lie proves it again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Standing(StrEnum):
    CLEAR = "clear"  # no open test: not out-voted since it was last cleared
    SUSPECT = "suspect"  # an open test after a mismatch: audited at the suspect fraction
    PROVEN = "proven"  # proven a liar: out of rotation until its back-off ends


class Verdict(StrEnum):
    """What one audit changed in a backend's standing (returned by `EvidenceBook.record`)."""

    NONE = "none"
    SUSPECTED = "suspected"
    PROVEN = "proven"
    CLEARED = "cleared"


@dataclass(frozen=True)
class EvidenceRule:
    """The SPRT's hypotheses and error rates, and the back-off of proven liars."""

    honest_mismatch_rate: float = 1e-5
    liar_rate: float = 0.01
    false_proof: float = 1e-4
    missed_liar: float = 0.01
    backoff_s: float = 60.0
    max_backoff_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0.0 < self.honest_mismatch_rate < self.liar_rate < 1.0:
            raise ValueError(
                "need 0 < honest_mismatch_rate < liar_rate < 1, got "
                f"{self.honest_mismatch_rate}, {self.liar_rate}"
            )
        if not (0.0 < self.false_proof < 0.5 and 0.0 < self.missed_liar < 0.5):
            raise ValueError(
                f"need error rates in (0, 0.5), got {self.false_proof}, {self.missed_liar}"
            )
        if not 0.0 < self.backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < backoff_s <= max_backoff_s, got {self.backoff_s}, {self.max_backoff_s}"
            )

    @property
    def mismatch_step(self) -> float:
        """LLR added by one audit that finds the backend the odd one out."""
        return math.log(self.liar_rate / self.honest_mismatch_rate)

    @property
    def agree_step(self) -> float:
        """LLR added (negative) by one audit in which the backend agreed with the majority."""
        return math.log((1.0 - self.liar_rate) / (1.0 - self.honest_mismatch_rate))

    @property
    def prove_at(self) -> float:
        """A: the LLR at which a backend is proven a liar."""
        return math.log((1.0 - self.missed_liar) / self.false_proof)

    @property
    def clear_at(self) -> float:
        """B: the LLR at which a suspect is cleared (the test restarts)."""
        return math.log(self.missed_liar / (1.0 - self.false_proof))

    @property
    def mismatches_to_prove(self) -> int:
        """k: mismatches that prove a backend with no agreeing audit between them."""
        return math.ceil(self.prove_at / self.mismatch_step - 1e-12)

    @property
    def readmit_llr(self) -> float:
        """Where a proven backend's statistic restarts when its back-off ends: one more
        mismatch proves it again."""
        return self.prove_at - self.mismatch_step / 2.0

    def backoff(self, offences: int) -> float:
        """Seconds out of rotation after the `offences`-th proven offence."""
        return min(self.max_backoff_s, self.backoff_s * 2.0 ** max(0, offences - 1))

    def wrong_answers_expected(self, audit_fraction: float, suspect_fraction: float) -> float:
        """Expected wrong answers a liar delivers before it is proven (any lie rate above
        about 0.002), for base audit fraction a and suspect fraction s: 1/a + (k-1)/s."""
        _check_fractions(audit_fraction, suspect_fraction)
        return 1.0 / audit_fraction + (self.mismatches_to_prove - 1) / suspect_fraction

    def wrong_answers_bound(
        self, audit_fraction: float, suspect_fraction: float, confidence: float = 0.999
    ) -> int:
        """Wrong answers a liar delivers before it is proven, with probability `confidence`
        (audit latency aside: answers sent while the proving audit is in flight add to it)."""
        _check_fractions(audit_fraction, suspect_fraction)
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        tail = math.log(1.0 / (1.0 - confidence))

        def lies_until_audited(fraction: float) -> int:
            # P(more than n lies until one is audited) = (1 - fraction)**n
            return 1 if fraction >= 1.0 else math.ceil(tail / -math.log1p(-fraction))

        first = lies_until_audited(audit_fraction)
        return first + (self.mismatches_to_prove - 1) * lies_until_audited(suspect_fraction)


def _check_fractions(audit_fraction: float, suspect_fraction: float) -> None:
    if not (0.0 < audit_fraction <= 1.0 and 0.0 < suspect_fraction <= 1.0):
        raise ValueError(
            f"audit fractions must be in (0, 1], got {audit_fraction}, {suspect_fraction}"
        )


@dataclass
class BackendEvidence:
    """The audit evidence against one backend."""

    llr: float = 0.0
    standing: Standing = Standing.CLEAR
    audits: int = 0
    mismatches: int = 0
    offences: int = 0  # proven offences so far (the back-off's exponent)
    proven_at: float | None = None
    out_until: float | None = None  # end of the current back-off (PROVEN only)

    def describe(self, rule: EvidenceRule) -> dict[str, Any]:
        return {
            "standing": self.standing.value,
            "proven": self.standing is Standing.PROVEN,
            "llr": round(self.llr, 4),
            "prove_at": round(rule.prove_at, 4),
            "clear_at": round(rule.clear_at, 4),
            "audits": self.audits,
            "mismatches": self.mismatches,
            "offences": self.offences,
            "proven_at": self.proven_at,
            "backoff_until": self.out_until,
        }


@dataclass
class EvidenceBook:
    """Every backend's audit evidence; fed verdicts and `now`, reads no clock."""

    rule: EvidenceRule = field(default_factory=EvidenceRule)
    _backends: dict[str, BackendEvidence] = field(default_factory=dict)

    def set_backends(self, backends: Iterable[str]) -> None:
        """The full backend list; known ones keep their evidence (a removed backend's is
        forgotten only when it leaves the fleet)."""
        old = self._backends
        self._backends = {b: old.get(b) or BackendEvidence() for b in backends}

    def __getitem__(self, backend: str) -> BackendEvidence:
        return self._backends[backend]

    def __contains__(self, backend: object) -> bool:
        return backend in self._backends

    def standing(self, backend: str) -> Standing:
        e = self._backends.get(backend)
        return Standing.CLEAR if e is None else e.standing

    def is_proven(self, backend: str) -> bool:
        return self.standing(backend) is Standing.PROVEN

    def proven(self) -> list[str]:
        return [b for b, e in self._backends.items() if e.standing is Standing.PROVEN]

    def vote_weight(self, backend: str) -> float:
        """How much `backend`'s answer counts in an audit: a proven liar's not at all, a
        suspect's half, a clear backend's fully."""
        match self.standing(backend):
            case Standing.PROVEN:
                return 0.0
            case Standing.SUSPECT:
                return 0.5
            case _:
                return 1.0

    def record(self, backend: str, mismatch: bool, now: float) -> Verdict:
        """One audit verdict on `backend` (odd one out, or in the majority)."""
        e = self._backends.get(backend)
        if e is None or e.standing is Standing.PROVEN:
            return Verdict.NONE  # a convicted backend's answers prove nothing more
        rule = self.rule
        e.audits += 1
        if mismatch:
            e.mismatches += 1
            e.llr += rule.mismatch_step
        elif e.standing is Standing.CLEAR:
            return Verdict.NONE  # no open test: agreement banks no credit
        else:
            e.llr += rule.agree_step
        if e.llr >= rule.prove_at:
            e.offences += 1
            e.standing = Standing.PROVEN
            e.proven_at = now
            e.out_until = now + rule.backoff(e.offences)
            return Verdict.PROVEN
        if e.llr <= rule.clear_at:
            e.llr = 0.0
            e.standing = Standing.CLEAR
            return Verdict.CLEARED
        if e.standing is Standing.CLEAR:
            e.standing = Standing.SUSPECT
            return Verdict.SUSPECTED
        return Verdict.NONE

    def tick(self, now: float) -> list[str]:
        """End the back-offs that are over; returns the backends released (now SUSPECT)."""
        released = []
        for b, e in self._backends.items():
            if e.standing is Standing.PROVEN and e.out_until is not None and now >= e.out_until:
                e.standing = Standing.SUSPECT
                e.llr = self.rule.readmit_llr
                e.out_until = None
                released.append(b)
        return released

    def describe(self, backend: str) -> dict[str, Any]:
        e = self._backends.get(backend) or BackendEvidence()
        return e.describe(self.rule)
