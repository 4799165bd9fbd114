"""Two small key-value protocols for testing the runner and its checkers without any
consensus protocol: a correct one (one fixed primary serves everything, the others
redirect to it) and a broken one (every node answers from its own unreplicated copy)."""

from __future__ import annotations

from typing import Any

from twlb.protocol import ClientReply, ClientRequest, Effects, KVStateMachine


class PrimaryKV:
    """node_0 applies every operation; the others redirect clients to it."""

    PRIMARY = "node_0"

    def __init__(self, node_id, peers, rng, config) -> None:
        self.node_id = node_id
        self.sm = KVStateMachine()

    @classmethod
    def recover(cls, node_id, peers, rng, config, state) -> PrimaryKV:
        node = cls(node_id, peers, rng, config)
        node.sm = KVStateMachine.from_snapshot(state["sm"])
        return node

    def start(self, now: float) -> Effects:
        return Effects(events=[("leader", 1)] if self.node_id == self.PRIMARY else [])

    def on_message(self, src: str, message: Any, now: float) -> Effects:
        return Effects()

    def on_timer(self, now: float) -> Effects:
        return Effects()

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        if self.node_id != self.PRIMARY:
            return Effects(
                replies=[
                    ClientReply(
                        request.client,
                        request.seq,
                        False,
                        leader_hint=self.PRIMARY,
                        error="not-leader",
                    )
                ]
            )
        reply = self.sm.apply(request)
        return Effects(replies=[reply], events=[("commit", request.op.kind.value)])

    def persistent_state(self) -> dict[str, Any]:
        return {"sm": self.sm.snapshot()}


class LocalKV(PrimaryKV):
    """Broken on purpose: every node serves from its own copy, nothing is replicated."""

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        return Effects(replies=[self.sm.apply(request)])


class ForgetfulKV(PrimaryKV):
    """Broken on purpose: persists nothing, so a crash of the primary loses acknowledged
    writes. Only a schedule that crashes node_0 exposes it."""

    def persistent_state(self) -> dict[str, Any]:
        return {"sm": KVStateMachine().snapshot()}
