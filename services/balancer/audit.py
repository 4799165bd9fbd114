"""The auditor (sans-IO): which answers to cross-check, whom to ask, how votes count, and
what a verdict proves.

The balancer never recomputes an answer (a real balancer cannot verify real work); it
finds wrong answers only by comparing backends with each other. All of that arithmetic
lives here, in one `Auditor` per balancer:

- Audit fractions. An answer is cross-checked with probability `fraction`; under the
  trust policy (`by_standing`) audits go where they pay: every answer of a suspect (an
  audit found it the odd one out and the evidence has not cleared or proven it yet) at
  `suspect_fraction`, and those of a backend in probation at `probation_fraction`, so a
  backend still lying when it (re)joins is seen soon. Only safe methods are audited
  (`AUDITED_METHODS`): the extra calls must change nothing.
- The choice of peers. Voters are the backends in rotation that are not proven liars;
  an audit first asks two of them, drawn at random.
- Vote-taking. Answers are compared by digest (`answer_digest`: a 2xx body, the
  responder's identity fields left out). Each answer counts with its voter's weight, its
  evidence standing (`VOTE_WEIGHT`: a proven liar's vote weighs nothing, so liars that
  agree cannot out-vote the honest). The heaviest group of identical digests is the
  majority when it has at least `quorum` voters of positive weight and outweighs every
  other group (and, for an `absolute` verdict, all the others together); the other
  backends that answered are the odd ones out. A tie, or a heaviest group under quorum,
  is no agreement: nobody is charged, since nobody can tell which side is wrong. An audit
  whose answers split is widened to every other voter (`MAX_AUDIT_VOTERS` in all) before
  anyone is charged, since colluders can be two of three, and it is decided as soon as
  one group outweighs every vote asked for (`Ballot`).
- Judgement. An agreed verdict is evidence: each voter's window and counters record an
  audit (a mismatch for the odd ones out) and the trust engine's evidence book its
  verdict (`TrustEngine.record_audit`, which ejects a backend the evidence proves).

The auditor decides and the balancer (`core.py`) asks: it sends the tries a `Ballot`
asks for and feeds their answers back. An answer the balancer did not proxy itself (one
observed in another proxy's traffic) is audited the same way: `draw` and `Ballot` take a
backend and a digest, not a try.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from twlb.balancer.evidence import Standing
from twlb.balancer.fleet import Fleet
from twlb.balancer.trust import TrustEngine

#: Audits cross-check only safe methods: the extra calls must not change anything.
AUDITED_METHODS = frozenset({"GET"})

#: How much an answer counts in a vote, by its voter's evidence standing: a proven liar's
#: not at all, a suspect's half, a clear backend's fully.
VOTE_WEIGHT: Mapping[Standing, float] = {
    Standing.CLEAR: 1.0,
    Standing.SUSPECT: 0.5,
    Standing.PROVEN: 0.0,
}

#: Most voters a widened audit asks, the audited answer's backend included (bounds the
#: extra load one split audit can cause).
MAX_AUDIT_VOTERS = 9


@dataclass(frozen=True)
class AuditResult:
    """The verdict of one audit (lists keep the order of the answers given)."""

    agreed_digest: str | None
    majority: list[str] = field(default_factory=list)
    odd: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    quorum_met: bool = False

    group_sizes: list[int] = field(default_factory=list)  # answers per distinct digest
    quorum: int = 2

    @property
    def split(self) -> bool:
        """Whether the answers given were not all identical."""
        return len(self.group_sizes) > 1

    @property
    def reason(self) -> str:
        """Why there is no agreement, in words fit for a 502 body ('' when agreed)."""
        if self.quorum_met:
            return ""
        if not self.group_sizes:
            return f"no backend answered ({len(self.failed)} failed)"
        return (
            f"no majority of at least {self.quorum} identical answers: answer groups "
            f"{self.group_sizes}, {len(self.failed)} failed"
        )


def compare_answers(
    answers: Mapping[str, str | None],
    quorum: int = 2,
    weights: Mapping[str, float] | None = None,
    absolute: bool = False,
) -> AuditResult:
    """Group backends by the digest they answered (None: the try failed) and find a majority.

    `weights` gives each voter's weight (default 1; missing voters weigh 1); `absolute`
    asks the majority to outweigh all other answers together, not only each other group.
    """
    if quorum < 1:
        raise ValueError(f"quorum must be at least 1, got {quorum}")
    groups: dict[str, list[str]] = {}
    failed: list[str] = []
    for backend, digest in answers.items():
        if digest is None:
            failed.append(backend)
        else:
            groups.setdefault(digest, []).append(backend)
    sizes = sorted((len(g) for g in groups.values()), reverse=True)

    def weight(backend: str) -> float:
        return 1.0 if weights is None else max(0.0, float(weights.get(backend, 1.0)))

    mass = {d: sum(weight(b) for b in g) for d, g in groups.items()}
    voters = {d: sum(weight(b) > 0.0 for b in g) for d, g in groups.items()}
    ranked = sorted(mass, key=mass.__getitem__, reverse=True)
    if not ranked:
        return AuditResult(None, failed=failed, group_sizes=sizes, quorum=quorum)
    digest = ranked[0]
    top = mass[digest]
    rest = sum(mass.values()) - top
    unique = len(ranked) == 1 or mass[ranked[1]] < top
    outweighs = top > rest if absolute else True
    if voters[digest] < quorum or top <= 0.0 or not unique or not outweighs:
        return AuditResult(None, failed=failed, group_sizes=sizes, quorum=quorum)
    odd = [b for d, g in groups.items() if d != digest for b in g]
    order = {b: i for i, b in enumerate(answers)}
    odd.sort(key=order.__getitem__)
    return AuditResult(digest, groups[digest], odd, failed, True, sizes, quorum)


def answers_split(answers: Mapping[str, str | None]) -> bool:
    """Whether the answers given (None: a failed try) are not all identical: the same as
    `compare_answers(answers).split`, without grouping and weighing, for the audit loop
    that asks it at every answer."""
    first: str | None = None
    for digest in answers.values():
        if digest is None:
            continue
        if first is None:
            first = digest
        elif digest != first:
            return True
    return False


def widen(
    asked: Collection[str], candidates: Sequence[str], limit: int = MAX_AUDIT_VOTERS
) -> list[str]:
    """The further backends a split audit asks: candidates not asked yet, in their order,
    up to `limit` voters in all."""
    room = max(0, limit - len(asked))
    return [b for b in candidates if b not in asked][:room]


class Answer(Protocol):
    """An HTTP answer as the auditor reads it (`upstream.UpstreamResponse` is one)."""

    status: int
    body: bytes


def answer_digest(response: Answer | None, ignore_fields: frozenset[str]) -> str | None:
    """An audit answer: sha256 of a 2xx body; anything else is no answer.

    Backends put their own identity in answers (the work contract's `node`), so for a JSON
    object the `ignore_fields` are dropped and the rest hashed in a canonical form; other
    bodies are hashed as they are.
    """
    if response is None or not 200 <= response.status < 300:
        return None
    body = response.body
    if ignore_fields and body[:1] == b"{":
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            for name in ignore_fields:
                doc.pop(name, None)
            body = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(body).hexdigest()


class Auditor:
    """Every audit decision of one balancer, over its fleet and trust engine.

    `rng` is the balancer's own (seeded) generator: audits, their peers and quorum reads
    draw from one sequence, so a seed gives the same run.
    """

    def __init__(
        self,
        fleet: Fleet,
        engine: TrustEngine,
        rng: random.Random,
        *,
        fraction: float,
        probation_fraction: float,
        suspect_fraction: float,
        by_standing: bool,
        ignore_fields: Iterable[str] = (),
        methods: frozenset[str] = AUDITED_METHODS,
    ) -> None:
        for name, value in (
            ("fraction", fraction),
            ("probation_fraction", probation_fraction),
            ("suspect_fraction", suspect_fraction),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.fleet = fleet
        self.engine = engine
        self.rng = rng
        # Read on every answer: plain attributes, the raised fractions worked out once.
        self.fraction = fraction
        self.probation_fraction = probation_fraction
        self.suspect_fraction = suspect_fraction
        self._probation_at = max(fraction, probation_fraction)
        self._suspect_at = max(fraction, suspect_fraction)
        self.by_standing = by_standing
        self._book = engine.evidence
        self._records = fleet.records
        self.ignore = frozenset(ignore_fields)
        self.methods = methods
        #: Backends a peer replica holds suspect or proven (replicas.py keeps this set, in
        #: place): audited at the suspect fraction here too, while the claim stands.
        self.watched: set[str] = set()

    # -- where ---------------------------------------------------------------------------

    def fraction_of(self, backend: str) -> float:
        """The share of `backend`'s answers to audit: with audits on and `by_standing`,
        `suspect_fraction` while the evidence holds it a suspect, `probation_fraction`
        while in PROBATION (the larger of each and `fraction`), else `fraction`."""
        base = self.fraction
        if not base or not self.by_standing:
            return base
        if backend in self._book.suspects or backend in self.watched:
            return self._suspect_at
        # A backend the engine does not know (removed while its answer was on its way)
        # counts as in probation, as the engine reports it.
        if backend in self.engine.probation or backend not in self._records:
            return self._probation_at
        return base

    def draw(self, method: str, backend: str, shown: float = 1.0) -> list[str] | None:
        """Whether to audit an answer `backend` gave to `method`: the two peers to ask,
        or None (not drawn, a method not audited, or fewer than two voters besides).

        `shown`: the share of answers the caller is shown (an observer of another proxy's
        traffic sees a sample); the draw is the backend's fraction over it, so that the
        backend's answers are audited at its fraction overall."""
        fraction = self.fraction_of(backend) if self.by_standing else self.fraction
        if shown < 1.0 and fraction:
            fraction = min(1.0, fraction / shown) if shown > 0.0 else 1.0
        if not fraction or method not in self.methods or self.rng.random() >= fraction:
            return None
        others = self.voters(exclude={backend})
        if len(others) < 2:
            return None
        return self.rng.sample(others, 2)

    # -- whom ----------------------------------------------------------------------------

    def voters(self, exclude: Collection[str]) -> list[str]:
        """Backends whose answer may vote in an audit: up, not proven liars."""
        is_proven = self.engine.is_proven
        return [b for b in self.fleet.up if b not in exclude and not is_proven(b)]

    def ballot(self, backend: str, digest: str | None, peers: Sequence[str]) -> Ballot:
        """The vote on an answer `backend` gave (its `digest`), `peers` asked first."""
        return Ballot(self, backend, digest, peers)

    # -- how votes count -----------------------------------------------------------------

    def vote_weights(self, backends: Iterable[str]) -> dict[str, float]:
        """How much each backend's answer counts (`VOTE_WEIGHT` of its standing)."""
        standing = self.engine.evidence.standing
        return {b: VOTE_WEIGHT[standing(b)] for b in backends}

    def decided(self, answers: Mapping[str, str | None], asked: Iterable[str]) -> bool:
        """Whether one group of identical answers already outweighs every vote asked for,
        answered or not (so no answer still to come can change the verdict)."""
        weights = self.vote_weights(asked)
        mass: dict[str, float] = {}
        for backend, digest in answers.items():
            if digest is not None:
                mass[digest] = mass.get(digest, 0.0) + weights.get(backend, 1.0)
        return bool(mass) and max(mass.values()) > sum(weights.values()) / 2.0

    # -- what a verdict proves -----------------------------------------------------------

    def judge(
        self,
        answers: Mapping[str, str | None],
        quorum: int,
        now: float,
        absolute: bool = False,
    ) -> AuditResult:
        """Compare `answers` (backend to digest), each voter weighted by its standing; on
        agreement, record an audit for every voter in the fleet (a mismatch for the odd
        ones out) in its window, its counters and the evidence. The trust engine's
        changes (a backend proven) wait in its `drain_changes`."""
        verdict = compare_answers(
            answers, quorum=quorum, weights=self.vote_weights(answers), absolute=absolute
        )
        if verdict.quorum_met:
            records = self.fleet.records
            record_audit = self.engine.record_audit
            for mismatch, backends in ((False, verdict.majority), (True, verdict.odd)):
                for b in backends:
                    rec = records.get(b)
                    if rec is None:
                        continue  # left the fleet while the audit ran
                    rec.window.record_audit(now, mismatch)
                    rec.counters.audits += 1
                    rec.counters.mismatches += mismatch
                    record_audit(b, mismatch, now)
        return verdict


class Ballot:
    """One audit's vote as its answers come in: the answers so far, the voters asked,
    and whether it was widened.

    The caller asks the voters, feeds each answer to `vote`, asks whom `more` names, and
    stops once `decided` (or when every voter asked has answered); then `judge`s it.
    """

    __slots__ = ("auditor", "answers", "asked", "widened")

    def __init__(
        self, auditor: Auditor, backend: str, digest: str | None, peers: Sequence[str]
    ) -> None:
        self.auditor = auditor
        self.answers: dict[str, str | None] = {backend: digest}
        self.asked: set[str] = {backend, *peers}
        self.widened = False

    def vote(self, backend: str, digest: str | None) -> None:
        """`backend` answered with `digest` (None: it gave no answer)."""
        self.answers[backend] = digest

    def more(self) -> list[str]:
        """The further voters to ask: once the answers in hand split, every voter not
        asked yet, in random order, up to `MAX_AUDIT_VOTERS` in all (once); else none."""
        if self.widened or not answers_split(self.answers):
            return []
        self.widened = True
        auditor = self.auditor
        more = auditor.voters(exclude=self.asked)
        auditor.rng.shuffle(more)
        more = widen(self.asked, more)
        self.asked.update(more)
        return more

    @property
    def decided(self) -> bool:
        """A widened vote that no answer still to come can change. A vote that was not
        widened is decided by all its answers: nobody is charged on a split before the
        others have voted too."""
        return self.widened and self.auditor.decided(self.answers, self.asked)

    def judge(self, now: float) -> AuditResult:
        """The verdict on the answers in hand (an absolute majority once widened)."""
        return self.auditor.judge(self.answers, 2, now, absolute=self.widened)
