"""The messages gossip nodes exchange: immutable values, the same in the simulator and
on the wire (`twlb.gossip.wire` encodes them, bounded).

Heartbeat protocols send a `HeartbeatTable` (the whole table: O(N) per message, as in
van Renesse et al. 1998); under `consensus` each row also carries its node's suspect
list (a row of Ranganathan et al.'s suspect matrix) and a declared failure goes to every
member as a `Verdict`. SWIM sends small probes (`Ping`, `PingReq`, `Ack`, `Nack`) that
carry `Update`s piggybacked, plus a rare full-state `Sync` (memberlist's push-pull) for
joins and healed partitions.
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
    #: consensus: the members `node` suspected at this heartbeat (its row of the matrix)
    suspects: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeartbeatTable:
    sender: str
    round: int  # the sender's round number (its sequence number; sequence-check reads it)
    entries: tuple[HeartbeatEntry, ...]
    join: bool = False  # a (re)started node asks the receiver for its table at once


@dataclass(frozen=True, slots=True)
class Verdict:
    """consensus: `sender` found every member it does not suspect suspecting `node` at
    (generation, heartbeat), and declares it failed (the paper's broadcast)."""

    sender: str
    node: str
    generation: int
    heartbeat: int


@dataclass(frozen=True, slots=True)
class Update:
    """SWIM's disseminated facts: alive/suspect/dead/left about `node` at `incarnation`,
    said by `source` (the accuser, for Lifeguard's independent confirmations).

    `health` is a local health multiplier (Lifeguard's LHM, 1 = healthy): in an alive
    fact, the one `node` announced with this incarnation (it raises its incarnation to
    announce a new one, as memberlist's UpdateNode does for metadata); in a suspicion,
    the accuser's own when it accused."""

    node: str
    state: MemberState
    incarnation: int
    source: str
    health: int = 1


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
Message = HeartbeatTable | Verdict | SwimMessage
