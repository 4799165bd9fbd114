"""SWIM (Das, Gupta, Motivala 2002) with Lifeguard (Dadgar et al. 2018), as HashiCorp
memberlist runs it, as a sans-IO core (the contract of `twlb.protocol`).

Each probe interval a node pings one member (by default the member its position in the
id-ordered live members gives for the current time slot; memberlist's shuffled
round-robin is one setting away, see `SwimConfig`); no ack within the probe timeout
sends `indirect_checks` ping-reqs through other members and a second direct ping (the
place of memberlist's TCP fallback ping); no ack by the end of the (health-scaled) probe
interval makes the target suspect. A suspect is declared dead when its suspicion timer
runs out; the accused refutes by raising its incarnation, and hears of the suspicion
from every probe of it (Lifeguard's buddy system). Facts (alive, suspect, dead, left)
ride piggybacked on every message, each sent retransmit_mult x ceil(log10(N+1)) times,
and on gossip to `gossip_nodes` members every gossip interval while a fact has been
sent fewer than `gossip_transmits` times (memberlist: for all of them). Lifeguard adds: a
local health score (awareness) that grows when our own probes fail without the helpers'
nacks or when we are accused, and stretches our probe interval so an overloaded node
stops accusing healthy peers; and a suspicion timeout that starts at max and shrinks
towards min as independent accusers confirm it. Joins (retried with back-off until a
seed answers) and healed partitions use a full-state `Sync` (memberlist's push-pull;
Serf's reconnect to failed members, remembered after the view forgets them).

Beyond memberlist, a slow member is not convicted for being slow (docs/DESIGN.md
argues it): a node announces its own health multiplier with its incarnation when it
rises (Lifeguard's signals, and its own timers firing late), its probers wait that many more intervals for its ack, its suspicion window is
scaled by it and never under memberlist's once it is above 1, and only accusers that
were healthy themselves confirm a suspicion. A node that finds it was stopped (no event
for `stall_after` intervals: SIGSTOP, a long GC pause) moves every pending deadline on by
the time it lost, so that it convicts nobody for its own pause.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sortedcontainers import SortedList
from twlb.gossip.membership import MemberEvent, MemberState, next_state
from twlb.gossip.messages import Ack, Gossip, Nack, Ping, PingReq, Sync, Update
from twlb.gossip.view import LIVE, Member, MemberView, Roster

from twlb.protocol import ClientRequest, Effects, NodeId

PROBE_SCHEDULES = ("slotted", "shuffled")
SWIM_PROFILES = ("twlb", "memberlist")
#: timers that are deadlines against someone: a stall of our own moves them on
_DEADLINES = frozenset({"probe-timeout", "probe-end", "suspicion", "relay-timeout"})


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """memberlist's DefaultLANConfig, plus Serf's reconnect, except for the choices below
    (each a field; `swim_config("memberlist")` sets memberlist's values for all of them):

    * `probe_schedule="slotted"` (memberlist: "shuffled", a shuffled round-robin that
      each node starts at its own time). Probes start on the boundaries of time slots
      r = floor(t / probe_interval), and the member at position i of the n live members
      in id order probes position (i + 1 + r mod (n - 1)) mod n. With views that agree,
      every live member is probed by exactly one other in every slot and by a new one in
      each of the next n - 1 slots, so a dead member is probed within one interval of its
      death and each further interval brings one more independent accuser; with views
      that disagree it degrades towards random probing, still SWIM. The slots need
      clocks that agree to well within a probe interval: the simulator's virtual time,
      processes on one host (the live agent counts slots in wall-clock time), and hosts
      kept within milliseconds by NTP, as Kubernetes nodes are.
    * `suspicion_min_mult=2` (memberlist: the minimum is `suspicion_mult`, 4) with
      `suspicion_confirmations=2` (memberlist: suspicion_mult - 2 = 2, tied to it), for
      members that announce themselves healthy. The maximum stays memberlist's,
      `suspicion_max_timeout_mult` x 4 x max(1, log10 N) x interval: a lone accuser still
      waits 24 s at N = 10.
    * `health_windows=True` (memberlist: none of it): a member announces its local health
      multiplier h when it rises (raising its incarnation) and a lower one once it has
      held for `health_hold`; its probers wait h - 1 more intervals for its ack, its
      confirmed minimum is h x the minimum above and never under memberlist's once h > 1,
      and a suspicion is confirmed only by accusers whose own multiplier was 1.
    * `gossip_transmits=6` (memberlist: every transmission may be a gossip message): a
      fact goes out in gossip messages for its first six transmissions (two gossip
      intervals to three members) and rides piggybacked on probes for the rest of its
      retransmit limit, so that messages per node stay flat in N under loss.
    With memberlist's values, agreement from the kill cannot beat memberlist's suspicion
    timeout plus one probe interval; docs/gossip.md has the figures and docs/DESIGN.md the
    argument that the shorter window convicts no slow member memberlist would spare.
    """

    profile: str = "twlb"  # "twlb" or "memberlist": which of the two sets this came from
    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    probe_schedule: str = "slotted"  # or "shuffled" (memberlist)
    indirect_checks: int = 3
    #: direct pings sent again after the probe timeout, spread over the rest of the
    #: interval (memberlist sends one over TCP, whose retransmission a UDP-only member
    #: does itself); 0: none
    fallback_pings: int = 2
    suspicion_mult: int = 4
    suspicion_min_mult: float = 2.0  # memberlist: suspicion_mult
    suspicion_max_timeout_mult: int = 6
    suspicion_confirmations: int = 2  # memberlist: suspicion_mult - 2
    health_windows: bool = True  # memberlist: False
    health_hold: float = 30.0  # a lower health is announced once it has lasted this long
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_transmits: int | None = 6  # memberlist: None (no bound but the retransmit limit)
    gossip_to_the_dead: float = 30.0  # dead and left members are gossiped to, then forgotten
    reconnect_timeout: float = 86_400.0  # Serf: how long a forgotten failed member is retried
    retransmit_mult: int = 4
    awareness_max_multiplier: int = 8
    push_pull_interval: float = 30.0
    reconnect_interval: float = 30.0
    max_piggyback: int = 16  # updates per message (memberlist fills a 1,400-byte packet)
    join_seeds: int = 3
    join_retry: float = 0.5  # an unanswered join is retried after this, doubling each time
    stall_after: float = 2.0  # probe intervals without any event: we were stopped
    late_timer: float = 0.5  # a timer handled this late (s) counts against our health
    incarnation: int = 0
    max_members: int = 16384  # living members never grow past this, whatever peers send

    def __post_init__(self) -> None:
        if self.probe_schedule not in PROBE_SCHEDULES:
            raise ValueError(f"probe_schedule must be one of {PROBE_SCHEDULES}")
        if self.profile not in SWIM_PROFILES:
            raise ValueError(f"profile must be one of {SWIM_PROFILES}")

    def _scale(self, n: int) -> float:
        return max(1.0, math.log10(max(1, n))) * self.probe_interval

    def memberlist_suspicion_timeout(self, n: int) -> float:
        """memberlist's minimum: SuspicionMult x max(1, log10 N) x interval (4 s at 10)."""
        return self.suspicion_mult * self._scale(n)

    def suspicion_min(self, n: int) -> float:
        """Ours, once confirmed: suspicion_min_mult x max(1, log10 N) x interval."""
        return self.suspicion_min_mult * self._scale(n)

    def suspicion_max(self, n: int) -> float:
        """A lone accuser's wait, memberlist's: 6 x its minimum (24 s at 10, 72 s at 1,000)."""
        return self.suspicion_max_timeout_mult * self.memberlist_suspicion_timeout(n)

    def suspicion_window(self, n: int, health: int) -> tuple[float, float]:
        """(confirmed minimum, lone maximum) for a member that announced `health`."""
        low, high = self.suspicion_min(n), self.suspicion_max(n)
        if self.health_windows and health > 1:
            low = max(low * health, self.memberlist_suspicion_timeout(n))
            high = max(high, low)
        return low, high

    def retransmit_limit(self, n: int) -> int:
        return self.retransmit_mult * math.ceil(math.log10(n + 1))


def swim_config(profile: str = "twlb", **overrides: Any) -> SwimConfig:
    """A profile's configuration: "twlb" (this project's defaults) or "memberlist"
    (memberlist's DefaultLANConfig and its choices: shuffled probing, a minimum of
    SuspicionMult x max(1, log10 N) intervals with SuspicionMult - 2 confirmations, no
    health windows, gossip for every transmission); `overrides` apply on top, and under
    memberlist the minimum and the confirmations follow an overridden suspicion_mult."""
    if profile == "memberlist":
        mult = int(overrides.get("suspicion_mult", 4))
        base: dict[str, Any] = {
            "profile": "memberlist",
            "probe_schedule": "shuffled",
            "suspicion_min_mult": float(mult),
            "suspicion_confirmations": max(0, mult - 2),
            "health_windows": False,
            "gossip_transmits": None,
        }
        return SwimConfig(**{**base, **overrides})
    if profile != "twlb":
        raise ValueError(f"profile must be one of {SWIM_PROFILES}, got {profile!r}")
    return SwimConfig(**overrides)


@dataclass(slots=True)
class _Suspicion:
    """Lifeguard's dynamic suspicion timer: max with no confirmations, min after k."""

    started: float
    k: int
    low: float
    high: float
    confirmers: set[NodeId] = field(default_factory=set)
    armed: float = math.inf  # the earliest suspicion timer pending for it

    def deadline(self) -> float:
        c = len(self.confirmers) - 1  # the first accuser is no confirmation

        if self.k < 1 or c >= self.k:
            return self.started + self.low
        frac = math.log(c + 1) / math.log(self.k + 1)
        return self.started + max(self.low, self.high - frac * (self.high - self.low))


@dataclass(slots=True)
class _Probe:
    target: NodeId
    seq: int
    health: int  # our own multiplier when the probe began (what its accusation carries)
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    """A ping-req we serve: its requester and sequence number; a nack once timed out,
    but a late ack is still passed on until the relay expires."""

    requester: NodeId
    seq: int
    nacked: bool = False


class SwimNode:
    """One SWIM member. `node_id`s are opaque; the live agent uses "host:port"."""

    protocol = "swim"

    def __init__(
        self,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: SwimConfig | None = None,
    ) -> None:
        self.node_id = node_id
        self.rng = rng
        self.config = config or SwimConfig()
        self.incarnation = self.config.incarnation
        roster = peers if isinstance(peers, Roster) else Roster(peers)
        self.members = MemberView(roster, node_id, self.config.max_members)
        self.awareness = 0
        self._seq = 0
        self._timers: list[tuple[float, int, str, Any]] = []
        self._tick = itertools.count()
        self._probes: dict[int, _Probe] = {}  # running probes by sequence number
        self._busy: tuple[int, float] | None = None  # (seq, until): the probe we wait on
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[NodeId, _Suspicion] = {}
        # one pending fact per node (the newest wins), in a queue ordered by (transmits,
        # age) as memberlist's TransmitLimitedQueue is, so the k least sent cost
        # O(k log n), not a sort of every pending fact per message
        self._broadcasts: dict[NodeId, tuple[Update, tuple[int, int, NodeId]]] = {}
        self._queue: SortedList = SortedList()
        self._enqueued = 0
        # added to `now` to count probe slots in a clock the members share (the live
        # agent: wall-clock time; its `now` is the event loop's monotonic time)
        self.clock_offset = 0.0
        self._left = False
        self._gossip_phase = 0.0
        self._gossip_armed = False
        self._announced = 1  # the health multiplier our incarnation carries
        self._peak = 1  # the highest multiplier since `_peak_since`
        self._peak_since = 0.0
        self._joined = True
        self._join_wait = self.config.join_retry
        self._last_active: float | None = None

    # -- the contract ---------------------------------------------------------------------
    def start(self, now: float) -> Effects:
        cfg = self.config
        self._last_active = now
        self._peak_since = now
        self.members.add(self.node_id, Member(MemberState.ALIVE, self.incarnation, now))
        self._enqueue(Update(self.node_id, MemberState.ALIVE, self.incarnation, self.node_id))
        if cfg.probe_schedule == "slotted":
            self._at(self._slot_start(self._slot(now) + 1), "probe", None)
        else:  # staggered so that nodes started together do not probe in lock step
            self._at(now + self.rng.uniform(0, cfg.probe_interval), "probe", None)
        self._gossip_phase = now + self.rng.uniform(0, cfg.gossip_interval)
        self._gossip_armed = False
        first = self._push_pull_every() * self.rng.uniform(0.5, 1.5)
        self._at(now + first, "push-pull", None)
        self._at(now + cfg.reconnect_interval * self.rng.uniform(0.5, 1.5), "reconnect", None)
        effects = Effects(events=[("member", self.node_id, "alive", self.incarnation)])
        # Join (memberlist's push-pull with a few seeds): they learn of us, and their
        # answer tells a restarted node the verdict it must refute. Unanswered, it is
        # sent again to other seeds, waiting twice as long each time.
        if cfg.join_seeds > 0 and self._join(effects):
            self._joined = False
            self._join_wait = cfg.join_retry
            self._at(now + self._join_wait, "join", None)
        self._arm_gossip(now)
        effects.wake_at = self._timers[0][0]
        return effects

    def on_timer(self, now: float) -> Effects:
        effects = Effects()
        self._observe(now, effects)
        if self._timers and now - self._timers[0][0] >= self.config.late_timer:
            # woken late by a probe timeout or more (an overloaded process: its timers
            # are late as well as its reading): a fault of ours, as a failed probe is
            self._adjust_awareness(1, effects)
        while self._timers and self._timers[0][0] <= now and not self._left:
            _, _, kind, arg = heapq.heappop(self._timers)
            getattr(self, "_on_" + kind.replace("-", "_"))(arg, now, effects)
        self._arm_gossip(now)
        if self._timers and not self._left:
            effects.wake_at = self._timers[0][0]
        return effects

    def on_message(self, src: NodeId, message: Any, now: float) -> Effects:
        effects = Effects()
        if self._left or self._last_active is None:  # not started: nothing to hear with
            return effects
        self._observe(now, effects)
        for update in getattr(message, "updates", ())[: self.config.max_piggyback + 1]:
            self._apply(update, now, effects, src)
        if isinstance(message, Ping):
            if message.target == self.node_id:
                # Our own incarnation first: a prober that suspects us and missed our
                # refutation un-marks us on this ack, as the SWIM paper has it.
                me = self._self_update()
                effects.send.append((src, Ack(message.seq, (me, *self._piggyback()))))
        elif isinstance(message, Ack):
            relay = self._on_ack(message.seq, now)
            if relay is not None:  # we probed for someone else: pass the ack on
                effects.send.append((relay.requester, Ack(relay.seq, self._piggyback())))
        elif isinstance(message, PingReq):
            self._relay(src, message, now, effects)
        elif isinstance(message, Nack):
            probe = self._probes.get(message.seq)
            if probe is not None:
                probe.nacks += 1
        elif isinstance(message, Sync):
            for update in message.states[: self.config.max_members]:
                self._merge_remote(update, now, effects)
            if message.reply:
                effects.send.append((src, Sync(self._full_state(), reply=False)))
            else:
                self._joined = True  # an answer to a join or a push-pull: we are known
        self._arm_gossip(now)
        if self._timers:
            effects.wake_at = self._timers[0][0]
        return effects

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        return Effects()  # gossip serves no client operations

    def persistent_state(self) -> Mapping[str, Any]:
        return {"incarnation": self.incarnation}

    @classmethod
    def recover(
        cls,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: SwimConfig | None,
        state: Mapping[str, Any],
    ) -> SwimNode:
        """A restart that kept its incarnation on disk rejoins one above it; one that did
        not learns its old verdict from the join sync and refutes it."""
        cfg = replace(config or SwimConfig(), incarnation=int(state["incarnation"]) + 1)
        return cls(node_id, peers, rng, cfg)

    # -- leave and views ----------------------------------------------------------------
    def leave(self, now: float) -> Effects:
        """memberlist's Leave: tell live members directly, then fall silent."""
        update = Update(self.node_id, MemberState.LEFT, self.incarnation, self.node_id)
        me = self.members.record(self.node_id)
        assert me is not None
        self.members.set_state(self.node_id, me, MemberState.LEFT)
        self._left = True
        live = [n for n, m in self.members.items() if m.state in LIVE and n != self.node_id]
        return Effects(
            send=[(n, Gossip((update,))) for n in live],
            events=[("member", self.node_id, "left", self.incarnation)],
        )

    def view(self) -> list[tuple[NodeId, MemberState, int]]:
        return sorted((n, m.state, m.incarnation) for n, m in self.members.items())

    def forgotten(self) -> list[tuple[NodeId, MemberState, int]]:
        """Members this node forgot, as their tombstones remember them."""
        return sorted((n, t.state, t.incarnation) for n, t in self.members.tombstones.items())

    def health_multiplier(self) -> int:
        return self.awareness + 1

    def announced_health(self) -> int:
        return self._announced

    # -- timers -----------------------------------------------------------------------
    def _at(self, when: float, kind: str, arg: Any) -> None:
        heapq.heappush(self._timers, (when, next(self._tick), kind, arg))

    def _observe(self, now: float, effects: Effects) -> None:
        """A gap with no event at all (timers fire every slot) means this process was
        stopped: the time lost does not count against anyone, so every pending deadline
        and suspicion moves on by it (probes and gossip resume at once)."""
        last, self._last_active = self._last_active, now
        cfg = self.config
        if last is None or now - last <= cfg.stall_after * cfg.probe_interval:
            return
        lost = now - last - cfg.probe_interval
        self._timers = [
            (t + lost if kind in _DEADLINES else t, tick, kind, arg)
            for t, tick, kind, arg in self._timers
        ]
        heapq.heapify(self._timers)
        for suspicion in self._suspicions.values():
            suspicion.started += lost
            suspicion.armed += lost
        if self._busy is not None:
            self._busy = (self._busy[0], self._busy[1] + lost)
        effects.events.append(("stall", round(lost, 6)))

    def _slot(self, now: float) -> int:
        """The probe slot `now` falls in (a timer due on a boundary may fire a hair early
        in floating point: it still counts as the new slot)."""
        return math.floor((now + self.clock_offset) / self.config.probe_interval + 1e-6)

    def _slot_start(self, slot: int) -> float:
        return slot * self.config.probe_interval - self.clock_offset

    def _on_probe(self, _: Any, now: float, effects: Effects) -> None:
        cfg = self.config
        slotted = cfg.probe_schedule == "slotted"
        slot = self._slot(now)
        following = self._slot_start(slot + 1) if slotted else now + cfg.probe_interval
        self._reap(now, effects)
        self._health_tick(now, effects)
        if self._busy is None or self._busy[1] <= now + 1e-9:
            # A node whose probes Lifeguard stretches over several slots skips slots, and
            # a slot-driven order could then alias onto a few members (every 8th slot of
            # a rotation of 8 is one member): it probes in the shuffled order instead.
            healthy = self.health_multiplier() == 1
            target = self.members.slotted_target(slot) if slotted and healthy else None
            if target is None:
                target = self._next_target()
            if target is not None:
                self._start_probe(target, slot, now, effects)
        self._at(following, "probe", None)

    def _start_probe(self, target: NodeId, slot: int, now: float, effects: Effects) -> None:
        """Ping `target`. We wait on it (no probe of our own meanwhile) for our own health
        multiplier's intervals, Lifeguard's stretch; a target that announced a multiplier
        h gets h - 1 intervals more to answer before it is accused."""
        cfg = self.config
        own = self.health_multiplier()
        extra = self._health_of(target) - 1
        if cfg.probe_schedule == "slotted":
            # on the slot grid, so that a probe's end and the next slot's start are the
            # same float, and the end (scheduled first) runs first
            own_end = self._slot_start(slot + own)
            end = self._slot_start(slot + own + extra)
        else:
            own_end = now + cfg.probe_interval * own
            end = now + cfg.probe_interval * (own + extra)
        self._seq += 1
        self._probes[self._seq] = _Probe(target, self._seq, own)
        self._busy = (self._seq, own_end)
        effects.send.append((target, self._ping(target, self._seq)))
        self._at(now + cfg.probe_timeout, "probe-timeout", self._seq)
        self._at(end, "probe-end", self._seq)

    def _ping(self, target: NodeId, seq: int) -> Ping:
        updates = self._piggyback()
        member = self.members.get(target)
        if member is not None and member.state is MemberState.SUSPECT:
            # Lifeguard's buddy system (memberlist too): a suspect hears of it from
            # every probe, so that it refutes at once, not when gossip finds it
            accused = Update(target, MemberState.SUSPECT, member.incarnation, self.node_id)
            updates = (accused, *updates)
        return Ping(seq, target, updates)

    def _on_probe_timeout(self, seq: int, now: float, effects: Effects) -> None:
        probe = self._probes.get(seq)
        if probe is None:
            return
        chosen = self.members.sample(
            self.rng,
            self.config.indirect_checks,
            lambda n, m: m.state is MemberState.ALIVE,
            exclude=(probe.target,),
        )
        probe.expected_nacks = len(chosen)
        for helper in chosen:
            effects.send.append((helper, PingReq(seq, probe.target, self._piggyback())))
        # memberlist pings over TCP beside the indirect probes; over UDP only, the direct
        # ping is retransmitted instead, so that a lost ping or ack alone accuses nobody
        cfg = self.config
        step = (cfg.probe_interval - cfg.probe_timeout) / max(1, cfg.fallback_pings)
        for i in range(cfg.fallback_pings):
            self._at(now + i * step, "fallback", seq)

    def _on_fallback(self, seq: int, now: float, effects: Effects) -> None:
        probe = self._probes.get(seq)
        if probe is not None:
            effects.send.append((probe.target, self._ping(probe.target, seq)))

    def _on_probe_end(self, seq: int, now: float, effects: Effects) -> None:
        probe = self._probes.pop(seq, None)
        if probe is None:  # answered
            return
        # Lifeguard: missing nacks mean the fault may be ours, not the target's
        missing = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
        self._adjust_awareness(max(0, missing), effects)
        member = self.members.get(probe.target)
        if member is not None:
            # the accusation carries the health we probed with: this probe's own missing
            # nacks (one lost datagram) do not make it a doubtful one
            update = Update(
                probe.target, MemberState.SUSPECT, member.incarnation, self.node_id, probe.health
            )
            self._apply(update, now, effects)

    def _on_relay_timeout(self, seq: int, now: float, effects: Effects) -> None:
        relay = self._relays.get(seq)
        if relay is not None and not relay.nacked:
            relay.nacked = True
            effects.send.append((relay.requester, Nack(relay.seq)))

    def _on_relay_expire(self, seq: int, now: float, effects: Effects) -> None:
        self._relays.pop(seq, None)

    def _on_suspicion(self, node: NodeId, now: float, effects: Effects) -> None:
        suspicion = self._suspicions.get(node)
        if suspicion is None:
            return
        deadline = suspicion.deadline()
        if deadline > now + 1e-9:  # moved later by a stall of ours: wait for it
            if suspicion.armed <= now + 1e-9:
                suspicion.armed = deadline
                self._at(deadline, "suspicion", node)
            return
        member = self.members.get(node)
        assert member is not None
        self._apply(Update(node, MemberState.DEAD, member.incarnation, self.node_id), now, effects)

    def _on_join(self, _: Any, now: float, effects: Effects) -> None:
        if self._joined:
            return
        self._join(effects)
        self._join_wait = min(2 * self._join_wait, self.config.push_pull_interval)
        self._at(now + self._join_wait, "join", None)

    def _join(self, effects: Effects) -> bool:
        seeds = self.members.sample(
            self.rng, self.config.join_seeds, lambda n, m: m.state is not MemberState.LEFT
        )
        hello = (self._self_update(),)
        effects.send.extend((s, Sync(hello, reply=True)) for s in seeds)
        return bool(seeds)

    def _arm_gossip(self, now: float) -> None:
        """memberlist gossips every interval but sends nothing with nothing to say; the
        tick is only scheduled (on the same cadence) while there is something to say in
        a gossip message (a fact sent fewer than `gossip_transmits` times)."""
        if self._gossip_armed or not self._gossip_due() or self._left:
            return
        interval = self.config.gossip_interval
        ticks = max(0, math.floor((now - self._gossip_phase) / interval) + 1)
        self._at(self._gossip_phase + ticks * interval, "gossip", None)
        self._gossip_armed = True

    def _gossip_due(self) -> bool:
        limit = self.config.gossip_transmits
        return bool(self._queue) and (limit is None or self._queue[0][0] < limit)

    def _on_gossip(self, _: Any, now: float, effects: Effects) -> None:
        cfg = self.config
        self._gossip_armed = False
        if not self._gossip_due():
            return

        def reachable(_: NodeId, m: Any) -> bool:
            return m.state in LIVE or (
                m.state is MemberState.DEAD and now - m.changed_at < cfg.gossip_to_the_dead
            )

        for target in self.members.sample(self.rng, cfg.gossip_nodes, reachable):
            if not self._gossip_due():
                break
            effects.send.append((target, Gossip(self._piggyback())))

    def _push_pull_every(self) -> float:
        """memberlist's pushPullScale: the interval grows with log2(N) past 32 nodes."""
        n = len(self.members)
        scale = max(1, math.ceil(math.log2(n) - math.log2(32)) + 1) if n > 32 else 1
        return self.config.push_pull_interval * scale

    def _on_push_pull(self, _: Any, now: float, effects: Effects) -> None:
        self._at(now + self._push_pull_every(), "push-pull", None)
        peer = self.members.sample(self.rng, 1, lambda n, m: m.state is MemberState.ALIVE)
        if peer:
            effects.send.append((peer[0], Sync(self._full_state(), reply=True)))

    def _on_reconnect(self, _: Any, now: float, effects: Effects) -> None:
        """Serf's reconnect: try one failed member now and then, so a healed partition
        learns of it (and it of its verdict, which it then refutes). As in Serf, a node
        tries with probability failed / live, so that the cluster tries each failed member
        about once an interval: every node trying every interval sent N full states of
        N members per interval (10^8 entries a half-minute at 10,000 nodes). A member the
        view has forgotten is still tried from its tombstone, as Serf keeps its failed
        members after memberlist forgets them."""
        self._at(now + self.config.reconnect_interval, "reconnect", None)
        dead = self.members.recorded(MemberState.DEAD)
        dead += [n for n, t in self.members.tombstones.items() if t.state is MemberState.DEAD]
        if dead and self.rng.random() < len(dead) / max(1, self.members.live_count()):
            effects.send.append((self.rng.choice(dead), Sync(self._full_state(), reply=True)))

    def _reap(self, now: float, effects: Effects) -> None:
        """memberlist's resetNodes: members down for GossipToTheDeadTime are forgotten."""
        cfg = self.config
        for node in self.members.down_since(now - cfg.gossip_to_the_dead):
            self.members.reap(node, now)
            self._suspicions.pop(node, None)
            self._forget_broadcast(node)
            effects.events.append(("forgot", node))
        self.members.forget_tombstones(now - cfg.reconnect_timeout)

    # -- probing ------------------------------------------------------------------------
    def _next_target(self) -> NodeId | None:
        return self.members.next_probe_target(self.rng)

    def _on_ack(self, seq: int, now: float) -> _Relay | None:
        """Our own probe answered, or the relay an ack belongs to."""
        probe = self._probes.pop(seq, None)
        if probe is not None:
            self._adjust_awareness(-1, None)
            if self._busy is not None and self._busy[0] == seq:
                self._busy = None  # answered: the next slot may probe again
            return None
        return self._relays.pop(seq, None)

    def _relay(self, src: NodeId, req: PingReq, now: float, effects: Effects) -> None:
        cfg = self.config
        self._seq += 1
        self._relays[self._seq] = _Relay(src, req.seq)
        effects.send.append((req.target, Ping(self._seq, req.target, self._piggyback())))
        # The nack must reach the requester before its probe ends (its ping-reqs left at
        # the probe timeout), or it counts as missing and the requester doubts itself:
        # memberlist waits a whole probe timeout and its nacks land after the deadline.
        nack_after = min(cfg.probe_timeout, 0.8 * (cfg.probe_interval - cfg.probe_timeout))
        self._at(now + nack_after, "relay-timeout", self._seq)
        # a late ack still reaches a requester that waits longer for a slow target
        self._at(now + cfg.probe_interval * cfg.awareness_max_multiplier, "relay-expire", self._seq)

    def _adjust_awareness(self, delta: int, effects: Effects | None) -> None:
        limit = self.config.awareness_max_multiplier - 1
        new = min(limit, max(0, self.awareness + delta))
        if new != self.awareness:
            self.awareness = new
            self._peak = max(self._peak, new + 1)
            if effects is not None:
                effects.events.append(("awareness", new))
                if self.config.health_windows and new + 1 > self._announced:
                    self._announce(new + 1, effects)

    # -- our own health -------------------------------------------------------------------
    def _health_of(self, node: NodeId) -> int:
        if not self.config.health_windows:
            return 1
        member = self.members.get(node)
        health = 1 if member is None else member.health
        return max(1, min(health, self.config.awareness_max_multiplier))

    def _self_update(self) -> Update:
        return Update(
            self.node_id, MemberState.ALIVE, self.incarnation, self.node_id, self._announced
        )

    def _announce(self, health: int, effects: Effects) -> None:
        """Tell the members our health multiplier under a new incarnation (memberlist
        raises the incarnation to change a member's metadata, UpdateNode)."""
        self._announced = health
        self.incarnation += 1
        me = self.members.record(self.node_id)
        assert me is not None
        me.incarnation = self.incarnation
        me.health = health
        self._enqueue(self._self_update())
        effects.events.append(("health", health, self.incarnation))

    def _health_tick(self, now: float, effects: Effects) -> None:
        """A lower multiplier is announced once it has held for `health_hold`, the
        highest seen in that time: the announced one follows the peaks, not each probe."""
        cfg = self.config
        if not cfg.health_windows or now - self._peak_since < cfg.health_hold:
            return
        if self._peak < self._announced:
            self._announce(self._peak, effects)
        self._peak = self.health_multiplier()
        self._peak_since = now

    # -- facts ----------------------------------------------------------------------------
    def _apply(
        self,
        u: Update,
        now: float,
        effects: Effects,
        src: NodeId | None = None,
        confirm: bool = True,
    ) -> None:
        """memberlist's aliveNode / suspectNode / deadNode, through the one table.
        `confirm=False`: a suspicion from a full-state sync, said by no direct prober."""
        if u.node == self.node_id:
            if u.state is not MemberState.ALIVE and u.incarnation >= self.incarnation:
                self._refute(u.incarnation, effects)
            return
        member = self.members.get(u.node)
        if u.state is MemberState.ALIVE:
            if member is None:
                stone = self.members.tombstones.get(u.node)
                if stone is not None and u.incarnation <= stone.incarnation and u.source != u.node:
                    return  # hearsay of a life we saw end (its own word is proof of life)
                fresh = Member(MemberState.ALIVE, u.incarnation, now, u.health)
                if self.members.add(u.node, fresh):
                    effects.events.append(("member", u.node, "alive", u.incarnation))
                    self._enqueue(u)
            elif u.incarnation > member.incarnation:
                member = self.members.record(u.node)
                assert member is not None
                member.incarnation = u.incarnation
                member.health = u.health
                self._suspicions.pop(u.node, None)
                self._change(u.node, member, MemberEvent.ALIVE_NEWER, now, effects, force=True)
                self._enqueue(u)
            return
        if member is None:
            return
        if u.incarnation < member.incarnation:
            if src is not None and src != u.node and member.state is MemberState.ALIVE:
                # A stale accusation still travels, so its sender missed the refutation:
                # answer it with what we know (a correction, beyond memberlist, that
                # keeps a lost refutation from turning into a false death verdict).
                fresh_fact = Update(
                    u.node, MemberState.ALIVE, member.incarnation, u.node, member.health
                )
                effects.send.append((src, Gossip((fresh_fact,))))
            return
        if u.state is MemberState.SUSPECT:
            # An accusation at a newer incarnation of a suspect (the accused refuted, we
            # missed it, and it was accused again) starts a new suspicion, whose accusers
            # do not confirm the old one (memberlist counts them as confirmations, which
            # turned refuted suspicions into false death verdicts at 20% loss here).
            renewed = member.state is MemberState.SUSPECT and u.incarnation > member.incarnation
            if member.state is MemberState.SUSPECT and not renewed:
                suspicion = self._suspicions.get(u.node)
                if (
                    suspicion is not None
                    and confirm
                    and self._confirms(u)
                    and u.source not in suspicion.confirmers
                ):
                    suspicion.confirmers.add(u.source)
                    deadline = suspicion.deadline()
                    if deadline < suspicion.armed:
                        suspicion.armed = deadline
                        self._at(deadline, "suspicion", u.node)
                    self._enqueue(u)
                return
            if member.state is not MemberState.ALIVE and not renewed:
                return
            member = self.members.record(u.node)
            assert member is not None
            member.incarnation = u.incarnation
            self._change(u.node, member, MemberEvent.SUSPECT, now, effects)  # a suspect stays
            self._start_suspicion(u.node, u.source, now)
            self._enqueue(u)
            return
        event = MemberEvent.LEAVE if u.state is MemberState.LEFT else MemberEvent.DEAD
        if next_state(member.state, event) is None or member.state is MemberState.DEAD:
            return
        member = self.members.record(u.node)
        assert member is not None
        member.incarnation = u.incarnation
        self._suspicions.pop(u.node, None)
        self._change(u.node, member, event, now, effects)
        self._enqueue(u)

    def _confirms(self, u: Update) -> bool:
        """Only an accuser that was healthy itself when it accused confirms a suspicion
        (Lifeguard discounts an unhealthy member's probes; this discounts its word)."""
        return not self.config.health_windows or u.health <= 1

    def _merge_remote(self, u: Update, now: float, effects: Effects) -> None:
        """memberlist's mergeState: a remote death verdict is only a suspicion here, and
        a suspicion in a full state is the syncing member's hearsay: it confirms nothing."""
        if u.state is MemberState.DEAD:
            u = Update(u.node, MemberState.SUSPECT, u.incarnation, u.source)
        self._apply(u, now, effects, confirm=u.state is not MemberState.SUSPECT)

    def _start_suspicion(self, node: NodeId, accuser: NodeId, now: float) -> None:
        n = self.members.live_count()
        k = self.config.suspicion_confirmations
        if n - 2 < k:  # too few members to ever confirm (memberlist)
            k = 0
        low, high = self.config.suspicion_window(n, self._health_of(node))
        suspicion = _Suspicion(now, k, low, high, {accuser})
        suspicion.armed = suspicion.deadline()
        self._suspicions[node] = suspicion
        self._at(suspicion.armed, "suspicion", node)

    def _refute(self, accused_at: int, effects: Effects) -> None:
        self._adjust_awareness(1, None)  # Lifeguard: being accused hints at our own health
        if self.config.health_windows:
            self._announced = max(self._announced, self.health_multiplier())
        self.incarnation = max(self.incarnation, accused_at) + 1
        me = self.members.record(self.node_id)
        assert me is not None
        me.incarnation = self.incarnation
        me.health = self._announced
        self._enqueue(self._self_update())
        effects.events.append(("awareness", self.awareness))
        effects.events.append(("refute", self.incarnation))

    def _change(
        self,
        node: NodeId,
        member: Member,
        event: MemberEvent,
        now: float,
        effects: Effects,
        force: bool = False,
    ) -> None:
        new = next_state(member.state, event)
        if new is None:
            return
        if new is not member.state or force:
            self.members.set_state(node, member, new)
            member.changed_at = now
            effects.events.append(("member", node, new.value, member.incarnation))

    # -- dissemination ----------------------------------------------------------------------
    def _enqueue(self, update: Update) -> None:
        self._forget_broadcast(update.node)
        self._enqueued += 1
        key = (0, self._enqueued, update.node)
        self._queue.add(key)
        self._broadcasts[update.node] = (update, key)

    def _forget_broadcast(self, node: NodeId) -> None:
        old = self._broadcasts.pop(node, None)
        if old is not None:
            self._queue.remove(old[1])

    def _piggyback(self) -> tuple[Update, ...]:
        """The facts sent least often so far (the oldest first among equals; memberlist
        sends the newest first, which measured one false death verdict in the tests'
        hour at 20% loss), each counted as one more transmission."""
        queue = self._queue
        if not queue:
            return ()
        limit = self.config.retransmit_limit(len(self.members))
        k = min(self.config.max_piggyback, len(queue))
        chosen = queue[:k]
        del queue[:k]
        updates = []
        for sent, order, node in chosen:
            update = self._broadcasts[node][0]
            updates.append(update)
            if sent + 1 >= limit:
                del self._broadcasts[node]
            else:
                key = (sent + 1, order, node)
                queue.add(key)
                self._broadcasts[node] = (update, key)
        return tuple(updates)

    def _full_state(self) -> tuple[Update, ...]:
        return tuple(
            Update(
                n,
                m.state,
                m.incarnation,
                self.node_id,
                m.health if n != self.node_id else self._announced,
            )
            for n, m in self.members.items()
        )
