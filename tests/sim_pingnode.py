"""A small sans-IO node for the kernel's own tests and benchmark: it pings every peer on
a jittered period, answers pings with pongs, persists how many pongs it has seen and
answers client requests with that count. It exercises every part of the contract
without depending on any consensus protocol."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twlb.protocol import ClientReply, ClientRequest, Effects


@dataclass(frozen=True, slots=True)
class Ping:
    n: int


@dataclass(frozen=True, slots=True)
class Pong:
    n: int


class PingNode:
    def __init__(
        self, node_id: str, peers: Sequence[str], rng: random.Random, config: Mapping[str, Any]
    ) -> None:
        self.node_id = node_id
        self.peers = list(peers)
        self.rng = rng
        self.period = float(config.get("period", 0.1))
        self.pongs = 0
        self.pings_sent = 0
        self.started_at: list[float] = []
        self.timer_times: list[float] = []
        self.message_times: list[float] = []

    @classmethod
    def recover(cls, node_id, peers, rng, config, state) -> PingNode:
        node = cls(node_id, peers, rng, config)
        node.pongs = state["pongs"]
        return node

    def start(self, now: float) -> Effects:
        self.started_at.append(now)
        return Effects(wake_at=now + self.period * (0.5 + self.rng.random()))

    def on_timer(self, now: float) -> Effects:
        self.timer_times.append(now)
        self.pings_sent += 1
        eff = Effects(send=[(p, Ping(self.pings_sent)) for p in self.peers])
        eff.wake_at = now + self.period * (0.5 + self.rng.random())
        return eff

    def on_message(self, src: str, message: Any, now: float) -> Effects:
        self.message_times.append(now)
        if isinstance(message, Ping):
            return Effects(send=[(src, Pong(message.n))])
        self.pongs += 1
        return Effects(events=[("pong", src, message.n)])

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        return Effects(replies=[ClientReply(request.client, request.seq, True, self.pongs)])

    def persistent_state(self) -> Mapping[str, Any]:
        return {"pongs": self.pongs}


class SilentNode(PingNode):
    """Sends nothing and sets no timer: only receives (for counting deliveries)."""

    def start(self, now: float) -> Effects:
        return Effects()
