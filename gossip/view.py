"""A SWIM node's membership view, sized for the simulator's 10,000 nodes.

Every node of a cluster starts from the same seed list, all alive at incarnation 0. A
view keeps that `Roster` shared (one tuple and one frozenset for the whole cluster)
and stores only the members this node has learned something about, so 10,000 views cost
what they differ in, not 10^8 records. Reads go through `get`; writes through `record`,
which copies a seeded member into this node's own records first. Live samples and the
shuffled probe order draw positions from the roster (rejecting members that are down),
so they cost O(k), not O(N). The slotted probe order needs the live members in id order:
the roster sorts its ids once for the whole cluster and each view keeps only the ids it
holds down (and any members learned beyond the roster) in `SortedList`s, so a member's
live rank and the member at a live rank cost O(log^2 N).

Dead and left members are forgotten (`reap`) once they have been down long enough
(memberlist's GossipToTheDeadTime), and sooner when a newcomer needs the room: the cap
`max_members` counts the living, and a full view makes room by forgetting the member
down the longest. What a view forgot is kept as a tombstone (its last state and
incarnation, at most `max_members` of them, oldest dropped first): a stale fact about
an older life cannot bring it back, and the tombstones of the dead are who Serf's
reconnect still tries after a partition.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from sortedcontainers import SortedList
from twlb.gossip.membership import MemberState, is_down

from twlb.protocol import NodeId


class Roster(Sequence[NodeId]):
    """The seed list a whole cluster shares (a node ignores itself in it). It is trusted
    configuration: `max_members` bounds only what peers add to it."""

    __slots__ = ("ids", "index", "_sorted")

    def __init__(self, ids: Iterable[NodeId]) -> None:
        self.ids = tuple(ids)
        self.index = frozenset(self.ids)
        self._sorted: tuple[NodeId, ...] | None = None

    @property
    def sorted(self) -> tuple[NodeId, ...]:
        """The ids in order, sorted once for every view that shares this roster."""
        if self._sorted is None:
            self._sorted = tuple(sorted(self.index))
        return self._sorted

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self.ids[i]

    def __contains__(self, node: object) -> bool:
        return node in self.index

    def __iter__(self) -> Iterator[NodeId]:
        return iter(self.ids)


@dataclass(slots=True)
class Member:
    state: MemberState
    incarnation: int
    changed_at: float
    health: int = 1  # the local health multiplier it announced with this incarnation


@dataclass(frozen=True, slots=True)
class _Seeded:
    """A member as the seed list made it; frozen, because every view shares it."""

    state: MemberState = MemberState.ALIVE
    incarnation: int = 0
    changed_at: float = 0.0
    health: int = 1


@dataclass(frozen=True, slots=True)
class Tombstone:
    state: MemberState
    incarnation: int
    at: float  # when it was forgotten


SEEDED = _Seeded()
LIVE = (MemberState.ALIVE, MemberState.SUSPECT)


class MemberView:
    def __init__(self, roster: Roster, me: NodeId, max_members: int) -> None:
        self.roster = roster
        self.me = me
        self.max_members = max_members
        self.own: dict[NodeId, Member] = {}
        self.extra: list[NodeId] = []  # members not on the roster, in the order learned
        self._gone: set[NodeId] = set()  # roster members forgotten
        self.tombstones: OrderedDict[NodeId, Tombstone] = OrderedDict()
        self._order_len = 0
        self._order_at = 0
        self._stride = 1
        self._offset = 0
        self._down: SortedList = SortedList()  # members held dead or left, by id
        # every known id in order: the shared roster's until a member beyond it is learned
        self._known: SortedList | None = None

    def __len__(self) -> int:
        """Members known now (alive, suspect, and down ones not yet forgotten)."""
        return len(self.roster) + len(self.extra) - len(self._gone)

    def slots(self) -> int:
        """Positions `at` reads (a forgotten roster member keeps its position, empty)."""
        return len(self.roster) + len(self.extra)

    def get(self, node: NodeId) -> Member | _Seeded | None:
        member = self.own.get(node)
        if member is not None:
            return member
        if node in self.roster.index and node not in self._gone:
            return SEEDED
        return None

    def record(self, node: NodeId) -> Member | None:
        """This node's own, writable record of a known member (None if unknown)."""
        member = self.own.get(node)
        if member is None and self.get(node) is SEEDED:
            member = Member(SEEDED.state, SEEDED.incarnation, SEEDED.changed_at)
            self.own[node] = member
        return member

    def add(self, node: NodeId, member: Member) -> bool:
        """Learn a member. At the cap, the member down the longest is forgotten to make
        room; a view full of living members refuses the newcomer."""
        if self.get(node) is None:
            if len(self) >= self.max_members:
                oldest = self.longest_down()
                if oldest is None:
                    return False
                self.reap(oldest, member.changed_at)
            known = self._materialize()
            if node in self._gone:
                self._gone.discard(node)
            else:
                self.extra.append(node)
            known.add(node)
            self.tombstones.pop(node, None)
        self.own[node] = member
        self._mark(node, member.state)
        return True

    def _materialize(self) -> SortedList:
        """The known ids as this view's own list, once it differs from the roster's."""
        if self._known is None:
            self._known = SortedList(n for n in self.roster.index if n not in self._gone)
        return self._known

    def longest_down(self) -> NodeId | None:
        best: tuple[float, NodeId] | None = None
        for node in self._down:
            if node == self.me:
                continue
            member = self.get(node)
            if member is not None and (best is None or member.changed_at < best[0]):
                best = (member.changed_at, node)
        return None if best is None else best[1]

    def down_since(self, before: float) -> list[NodeId]:
        """Members dead or left since before `before` (what is due to be forgotten)."""
        out = []
        for node in self._down:
            member = self.get(node)
            if node != self.me and member is not None and member.changed_at <= before:
                out.append(node)
        return out

    def reap(self, node: NodeId, now: float) -> None:
        """Forget a member that is down; keep its tombstone."""
        member = self.get(node)
        if member is None or node == self.me:
            return
        self.tombstones[node] = Tombstone(member.state, member.incarnation, now)
        self.tombstones.move_to_end(node)
        while len(self.tombstones) > self.max_members:
            self.tombstones.popitem(last=False)
        known = self._materialize()
        self.own.pop(node, None)
        if node in self._down:
            self._down.remove(node)
        known.discard(node)
        if node in self.roster.index:
            self._gone.add(node)
        else:
            self.extra.remove(node)

    def forget_tombstones(self, before: float) -> None:
        while self.tombstones:
            node, stone = next(iter(self.tombstones.items()))
            if stone.at > before:
                return
            del self.tombstones[node]

    def set_state(self, node: NodeId, member: Member, state: MemberState) -> None:
        """Every state change of a known member goes through here (the down index)."""
        member.state = state
        self._mark(node, state)

    def _mark(self, node: NodeId, state: MemberState) -> None:
        held = node in self._down
        if is_down(state) and not held:
            self._down.add(node)
        elif held and not is_down(state):
            self._down.remove(node)

    def at(self, i: int) -> NodeId:
        cut = len(self.roster)
        return self.roster.ids[i] if i < cut else self.extra[i - cut]

    def items(self) -> Iterator[tuple[NodeId, Member | _Seeded]]:
        for i in range(self.slots()):
            node = self.at(i)
            member = self.get(node)
            if member is not None:
                yield node, member

    def live_count(self) -> int:
        """Members alive or suspect, ourselves included."""
        return len(self) - len(self._down)

    def _rank(self, node: NodeId) -> int:
        """How many known ids sort before `node`."""
        if self._known is not None:
            return self._known.bisect_left(node)
        return bisect.bisect_left(self.roster.sorted, node)

    def _known_at(self, i: int) -> NodeId:
        return self._known[i] if self._known is not None else self.roster.sorted[i]

    def _known_count(self) -> int:
        return len(self._known) if self._known is not None else len(self.roster.sorted)

    def live_rank(self, node: NodeId) -> int:
        """The position of a live `node` among the live members in id order."""
        return self._rank(node) - self._down.bisect_left(node)

    def live_at(self, position: int) -> NodeId:
        """The live member at `position` in id order: the first known id with `position`
        live ids before it and itself not down (a binary search over the known ids)."""
        lo, hi = 0, self._known_count()
        while lo < hi:
            mid = (lo + hi) // 2
            if mid - self._down.bisect_right(self._known_at(mid)) >= position:
                hi = mid
            else:
                lo = mid + 1
        return self._known_at(lo)

    def slotted_target(self, slot: int) -> NodeId | None:
        """The member we probe in time slot `slot`: with the live members in id order and
        ourselves at position i of n, position (i + 1 + slot mod (n - 1)) mod n. Views
        that agree make this a permutation: every live member is probed by exactly one
        other in each slot, and by a different one in each of n - 1 consecutive slots."""
        me = self.get(self.me)
        n = self.live_count()
        if me is None or is_down(me.state) or n < 2:
            return None
        i = self.live_rank(self.me)
        return self.live_at((i + 1 + slot % (n - 1)) % n)

    def recorded(self, *states: MemberState) -> list[NodeId]:
        """Members in `states` among this node's own records (seeded ones are alive)."""
        return [n for n, m in self.own.items() if m.state in states and n != self.me]

    def sample(
        self,
        rng: random.Random,
        k: int,
        accept: Callable[[NodeId, Member | _Seeded], bool],
        exclude: Sequence[NodeId] = (),
    ) -> list[NodeId]:
        """Up to k distinct members other than ourselves that `accept` takes, uniformly;
        by rejection while most are taken, by a scan when few are."""
        size = self.slots()
        chosen: list[NodeId] = []
        for _ in range(4 * k + 16):
            if len(chosen) >= k or size == 0:
                return chosen
            node = self.at(rng.randrange(size))
            if node == self.me or node in chosen or node in exclude:
                continue
            member = self.get(node)
            if member is not None and accept(node, member):
                chosen.append(node)
        rest = [
            n
            for n, m in self.items()
            if n != self.me and n not in chosen and n not in exclude and accept(n, m)
        ]
        chosen += rng.sample(rest, min(k - len(chosen), len(rest)))
        return chosen

    def next_probe_target(self, rng: random.Random) -> NodeId | None:
        """memberlist probes members in a shuffled round-robin order, so that each is
        probed once per cycle; here the cycle is a random affine permutation of the view
        (i -> a*i + b mod N with a prime to N), which needs no per-node list."""
        for _ in range(2):
            while self._order_at < self._order_len:
                i = (self._stride * self._order_at + self._offset) % self._order_len
                self._order_at += 1
                if i >= self.slots():
                    continue
                node = self.at(i)
                if node == self.me:
                    continue
                member = self.get(node)
                if member is not None and member.state in LIVE:
                    return node
            size = self.slots()
            self._order_len, self._order_at = size, 0
            self._offset = rng.randrange(max(1, size))
            self._stride = 1
            if size > 2:
                while True:
                    self._stride = rng.randrange(1, size)
                    if math.gcd(self._stride, size) == 1:
                        break
        return None
