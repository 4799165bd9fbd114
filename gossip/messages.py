"""The messages gossip nodes exchange: immutable values, the same in the simulator and
on the wire (`twlb.gossip.wire` encodes them, bounded).

Heartbeat protocols send a `HeartbeatTable` (the whole table: O(N) per message, as in
van Renesse et al. 1998). SWIM sends small probes (`Ping`, `PingReq`, `Ack`, `Nack`)
that carry `Update`s piggybacked, plus a rare full-state `Sync` (memberlist's push-pull)
for joins and healed partitions.
"""

from __future__ import annotations

from dataclasses import dataclass

from twlb.gossip.membership import MemberState


@dataclass(frozen=True, slots=True)
class HeartbeatEntry:
    """One row of a heartbeat table. (generation, heartbeat) orders a node's beats: the
    generation is fixed at start, higher after a restart (as Cassandra's gossip does), so
    a restarted node's counter from zero still counts as newer."""

    node: str
    generation: int
    heartbeat: int
    left: bool = False


@dataclass(frozen=True, slots=True)
class HeartbeatTable:
    sender: str
    round: int  # the sender's round number; sequence-check reads the gaps
    entries: tuple[HeartbeatEntry, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """SWIM's disseminated facts: alive/suspect/dead/left about `node` at `incarnation`,
    said by `source` (the accuser, for Lifeguard's independent confirmations)."""

    node: str
    state: MemberState
    incarnation: int
    source: str


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to probe `target` for us (an indirect probe)."""

    seq: int
    target: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """Lifeguard: an indirect prober heard nothing either; the requester's own health
    is fine if nacks arrive, and suspect if they do not."""

    seq: int


@dataclass(frozen=True, slots=True)
class Gossip:
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class Sync:
    """Full state exchange (memberlist's push-pull): `reply` asks for the receiver's."""

    states: tuple[Update, ...]
    reply: bool


SwimMessage = Ping | PingReq | Ack | Nack | Gossip | Sync
Message = HeartbeatTable | SwimMessage
