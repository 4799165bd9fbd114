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
so a single further audited lie proves it again: audited at s, it delivers at most
ceil(ln(1/delta) / s) wrong answers after its readmission (one at s = 1), which
`readmitted_wrong_answers_bound` computes.

Evidence outlives the process that gathered it: `EvidenceBook.export` writes every
backend's as one JSON-ready document, its times relative to the moment of export, and
`parse` reads one back under the same rule, refusing data the rule could not have
produced (the trust engine's `import_evidence` puts it in force: a backend proven
elsewhere is ejected here). Deciding whose evidence to take (a restarted balancer's own,
a replica's) is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
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
        first = _lies_until_audited(audit_fraction, confidence)
        rest = (self.mismatches_to_prove - 1) * _lies_until_audited(suspect_fraction, confidence)
        return first + rest

    @property
    def mismatches_to_prove_again(self) -> int:
        """Mismatches that prove a readmitted backend again (its statistic restarts at
        `readmit_llr`): one."""
        return math.ceil((self.prove_at - self.readmit_llr) / self.mismatch_step - 1e-12)

    def readmitted_wrong_answers_bound(
        self, suspect_fraction: float, confidence: float = 0.999
    ) -> int:
        """Wrong answers a liar delivers after its back-off ends, before it is proven again,
        with probability `confidence`: it comes back SUSPECT, audited at the suspect
        fraction s, one audited lie from proof (at s = 1: its first lie; audit latency
        aside, as for `wrong_answers_bound`)."""
        _check_fractions(suspect_fraction)
        return self.mismatches_to_prove_again * _lies_until_audited(suspect_fraction, confidence)


def _lies_until_audited(fraction: float, confidence: float) -> int:
    """Lies delivered until one is audited (that one included), at audit `fraction`, with
    probability `confidence`: P(more than n) = (1 - fraction)**n."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if fraction >= 1.0:
        return 1
    return math.ceil(math.log(1.0 / (1.0 - confidence)) / -math.log1p(-fraction))


def _check_fractions(*fractions: float) -> None:
    if not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(
            f"audit fractions must be in (0, 1], got {', '.join(str(f) for f in fractions)}"
        )


#: Version of the evidence document (`EvidenceBook.export`, `EvidenceBook.parse`).
EVIDENCE_FORMAT = 1

#: The rule's fields an imported statistic depends on: evidence gathered under other
#: hypotheses or error rates cannot be read against this book's thresholds.
_RULE_FIELDS = ("honest_mismatch_rate", "liar_rate", "false_proof", "missed_liar")


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

    def export(self, now: float) -> dict[str, Any]:
        """This evidence as JSON-ready data, its times relative to `now` (a clock's
        readings mean nothing to another process or after a restart)."""
        return {
            "standing": self.standing.value,
            "llr": self.llr,
            "audits": self.audits,
            "mismatches": self.mismatches,
            "offences": self.offences,
            "proven_s_ago": None if self.proven_at is None else max(0.0, now - self.proven_at),
            "backoff_left_s": None if self.out_until is None else max(0.0, self.out_until - now),
        }

    @classmethod
    def imported(cls, doc: Any, now: float, rule: EvidenceRule) -> BackendEvidence:
        """Evidence from `export`'s data, its times made absolute at `now`; ValueError
        naming the field when the data is not evidence this rule could have produced. A
        back-off is cut to the rule's longest (`max_backoff_s`)."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"must be an object, not {type(doc).__name__}")
        try:
            standing = Standing(doc.get("standing"))
        except ValueError:
            raise ValueError(
                f"standing must be one of {[s.value for s in Standing]}, "
                f"not {doc.get('standing')!r}"
            ) from None
        llr = _number(doc, "llr")
        audits, mismatches, offences = (
            _count(doc, k) for k in ("audits", "mismatches", "offences")
        )
        if mismatches > audits:
            raise ValueError(f"mismatches ({mismatches}) exceed audits ({audits})")
        proven_ago = _number(doc, "proven_s_ago", optional=True)
        backoff_left = _number(doc, "backoff_left_s", optional=True)
        match standing:
            case Standing.PROVEN:
                if llr < rule.prove_at or offences < 1 or backoff_left is None:
                    raise ValueError(
                        f"a proven backend needs llr >= {rule.prove_at:.4f}, offences >= 1 "
                        f"and backoff_left_s, got {llr}, {offences}, {backoff_left}"
                    )
            case Standing.SUSPECT:
                if not rule.clear_at < llr < rule.prove_at or backoff_left is not None:
                    raise ValueError(
                        f"a suspect needs {rule.clear_at:.4f} < llr < {rule.prove_at:.4f} "
                        f"and no backoff_left_s, got {llr}, {backoff_left}"
                    )
            case _:
                if llr != 0.0 or backoff_left is not None:
                    raise ValueError(
                        f"a clear backend has llr 0 and no backoff_left_s, got {llr}, {backoff_left}"
                    )
        return cls(
            llr=llr,
            standing=standing,
            audits=audits,
            mismatches=mismatches,
            offences=offences,
            proven_at=None if proven_ago is None else now - proven_ago,
            out_until=None if backoff_left is None else now + min(backoff_left, rule.max_backoff_s),
        )


def _number(doc: Mapping[str, Any], name: str, optional: bool = False) -> Any:
    """`doc[name]` as a float (None when `optional` and absent)."""
    value = doc.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    if optional and value < 0:
        raise ValueError(f"{name} must be >= 0, not {value!r}")
    return float(value)


def _count(doc: Mapping[str, Any], name: str) -> int:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
    return value


@dataclass
class EvidenceBook:
    """Every backend's audit evidence; fed verdicts and `now`, reads no clock."""

    rule: EvidenceRule = field(default_factory=EvidenceRule)
    _backends: dict[str, BackendEvidence] = field(default_factory=dict)
    #: the backends in SUSPECT standing (read on every audited answer: one set lookup)
    suspects: set[str] = field(default_factory=set)

    def set_backends(self, backends: Iterable[str]) -> None:
        """The full backend list; known ones keep their evidence (a removed backend's is
        forgotten only when it leaves the fleet)."""
        old = self._backends
        self._backends = {b: old.get(b) or BackendEvidence() for b in backends}
        self.suspects.intersection_update(self._backends)  # in place: one set for good

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

    def _stand(self, backend: str, e: BackendEvidence, standing: Standing) -> None:
        e.standing = standing
        if standing is Standing.SUSPECT:
            self.suspects.add(backend)
        else:
            self.suspects.discard(backend)

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
            self._stand(backend, e, Standing.PROVEN)
            e.proven_at = now
            e.out_until = now + rule.backoff(e.offences)
            return Verdict.PROVEN
        if e.llr <= rule.clear_at:
            e.llr = 0.0
            self._stand(backend, e, Standing.CLEAR)
            return Verdict.CLEARED
        if e.standing is Standing.CLEAR:
            self._stand(backend, e, Standing.SUSPECT)
            return Verdict.SUSPECTED
        return Verdict.NONE

    def tick(self, now: float) -> list[str]:
        """End the back-offs that are over; returns the backends released (now SUSPECT)."""
        released = []
        for b, e in self._backends.items():
            if e.standing is Standing.PROVEN and e.out_until is not None and now >= e.out_until:
                self._stand(b, e, Standing.SUSPECT)
                e.llr = self.rule.readmit_llr
                e.out_until = None
                released.append(b)
        return released

    def describe(self, backend: str) -> dict[str, Any]:
        e = self._backends.get(backend) or BackendEvidence()
        return e.describe(self.rule)

    # -- export and import ---------------------------------------------------------------

    def export(self, now: float) -> dict[str, Any]:
        """Every backend's evidence as one JSON-ready document, times relative to `now`:
        what a restarted balancer or another replica reads back with `parse`."""
        rule = self.rule
        return {
            "format": EVIDENCE_FORMAT,
            "rule": {name: getattr(rule, name) for name in _RULE_FIELDS},
            "backends": {b: e.export(now) for b, e in self._backends.items()},
        }

    def parse(self, doc: Any, now: float) -> dict[str, BackendEvidence]:
        """The evidence of an `export` document, by backend, times made absolute at `now`;
        ValueError naming what is wrong (nothing is put in force here: see `restore`)."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"an evidence document is an object, not {type(doc).__name__}")
        if doc.get("format") != EVIDENCE_FORMAT:
            raise ValueError(
                f"evidence format must be {EVIDENCE_FORMAT}, not {doc.get('format')!r}"
            )
        theirs = doc.get("rule")
        ours = {name: getattr(self.rule, name) for name in _RULE_FIELDS}
        if theirs != ours:
            raise ValueError(f"evidence gathered under rule {theirs!r}, this book's is {ours!r}")
        backends = doc.get("backends")
        if not isinstance(backends, Mapping):
            raise ValueError("evidence 'backends' must be an object of backend URL to evidence")
        parsed: dict[str, BackendEvidence] = {}
        for backend, data in backends.items():
            try:
                parsed[str(backend)] = BackendEvidence.imported(data, now, self.rule)
            except ValueError as err:
                raise ValueError(f"evidence of {backend}: {err}") from None
        return parsed

    def extend(self, backend: str, out_until: float, offences: int) -> bool:
        """Keep a backend proven here out until `out_until` when that is later than its
        own back-off's end, and count at least `offences` (a peer replica's longer word
        for a liar this book proved itself: sharing.py); False when nothing changed (not
        proven here, or its own back-off is as long)."""
        e = self._backends.get(backend)
        if e is None or e.standing is not Standing.PROVEN or e.out_until is None:
            return False
        changed = False
        if out_until > e.out_until + 0.01:
            e.out_until = out_until
            changed = True
        if offences > e.offences:
            e.offences = offences
            changed = True
        return changed

    def restore(self, backend: str, evidence: BackendEvidence) -> None:
        """Put `evidence` in force for `backend`, a backend of the book (KeyError if not):
        the trust engine's `import_evidence` calls this and acts on proof it carries."""
        if backend not in self._backends:
            raise KeyError(backend)
        self._backends[backend] = evidence
        self._stand(backend, evidence, evidence.standing)
