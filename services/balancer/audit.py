"""Byzantine audits: compare the body digests several backends gave for one request.

The balancer never recomputes an answer (a real balancer cannot verify real work); it
finds wrong answers only by comparing backends with each other. Each answer counts with
its voter's weight (its standing: a proven liar's vote weighs nothing, so liars that
agree cannot out-vote the honest). The heaviest group of identical digests is the
majority when it has at least `quorum` voters of positive weight and outweighs every
other group (and, for an `absolute` verdict, weighs more than all the others together);
the other backends that answered are the odd ones out and are charged a mismatch. A tie,
or a heaviest group under quorum, is no agreement: nobody is charged, since nobody can
tell which side is wrong. An audit whose answers split (`split`) is worth widening to
more voters before anyone is charged: colluders can be two of three.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

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
