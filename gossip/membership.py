"""Membership states every gossip core uses, and the one table of allowed transitions.

A member is `alive`, `suspect` (missed its deadline; may still refute), `dead` (the
local verdict) or `left` (announced its own departure). Every core changes a member's
state only through `next_state`, so the table below is the whole state machine; a test
walks every (state, event) pair, and the network tests check each observed change
against it.
"""

from __future__ import annotations

from enum import StrEnum


class MemberState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


class MemberEvent(StrEnum):
    """What a core learned about a member."""

    #: news that it lives, newer than what we hold (higher incarnation or heartbeat)
    ALIVE_NEWER = "alive-newer"
    #: a missed deadline, or a peer's accusation
    SUSPECT = "suspect"
    #: the suspicion ran out without refutation (or heartbeat silence reached T_fail)
    TIMEOUT = "timeout"
    #: a peer's death verdict
    DEAD = "dead"
    #: the member said it is leaving
    LEAVE = "leave"


S, E = MemberState, MemberEvent

#: (state, event) -> new state. A pair missing from the table is ignored: a suspicion of
#: a dead member, a timeout of a live one, a death verdict about one that already left.
TRANSITIONS: dict[tuple[MemberState, MemberEvent], MemberState] = {
    (S.ALIVE, E.ALIVE_NEWER): S.ALIVE,
    (S.ALIVE, E.SUSPECT): S.SUSPECT,
    (S.ALIVE, E.DEAD): S.DEAD,
    (S.ALIVE, E.LEAVE): S.LEFT,
    (S.SUSPECT, E.ALIVE_NEWER): S.ALIVE,  # refuted
    (S.SUSPECT, E.SUSPECT): S.SUSPECT,  # another accuser confirms (Lifeguard)
    (S.SUSPECT, E.TIMEOUT): S.DEAD,
    (S.SUSPECT, E.DEAD): S.DEAD,
    (S.SUSPECT, E.LEAVE): S.LEFT,
    (S.DEAD, E.ALIVE_NEWER): S.ALIVE,  # rejoined: restart or healed partition
    (S.DEAD, E.LEAVE): S.LEFT,
    (S.LEFT, E.ALIVE_NEWER): S.ALIVE,  # came back after leaving
}


def next_state(state: MemberState, event: MemberEvent) -> MemberState | None:
    """The state after `event`, or None when the table ignores it."""
    return TRANSITIONS.get((state, event))


def is_down(state: MemberState) -> bool:
    """Counts as failed for agreement: the member is not expected to answer."""
    return state is S.DEAD or state is S.LEFT
