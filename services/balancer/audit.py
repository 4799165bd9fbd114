"""Byzantine audits: compare the body digests several backends gave for one request.

The balancer never recomputes an answer (a real balancer cannot verify real work); it
finds wrong answers only by comparing backends with each other. The largest group of
identical digests is the majority when it has at least `quorum` members and is strictly
larger than every other group; the other backends that answered are the odd ones out and
are charged a mismatch. A tie, or a largest group under quorum, is no agreement: nobody
is charged, since nobody can tell which side is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


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


def compare_answers(answers: Mapping[str, str | None], quorum: int = 2) -> AuditResult:
    """Group backends by the digest they answered (None: the try failed) and find a majority."""
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
    top = sizes[0] if sizes else 0
    unique = len(sizes) == 1 or (len(sizes) > 1 and sizes[1] < top)
    if top < quorum or not unique:
        return AuditResult(None, failed=failed, group_sizes=sizes, quorum=quorum)
    digest = next(d for d, g in groups.items() if len(g) == top)
    odd = [b for d, g in groups.items() if d != digest for b in g]
    order = {b: i for i, b in enumerate(answers)}
    odd.sort(key=order.__getitem__)
    return AuditResult(digest, groups[digest], odd, failed, True, sizes, quorum)
