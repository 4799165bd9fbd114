"""Gossip inside a backend node: what `twlb backend` needs to run an agent beside its
HTTP server (the node's identity and seeds, built from its --gossip-* flags), and the
answer of its `GET /gossip`."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import Any

from prometheus_client import CollectorRegistry
from twlb.gossip.agent import GossipAgent, GossipMetrics, split_address
from twlb.gossip.nodes import config_from_spec, make_node

from twlb.spec import GossipSpec


@dataclass(frozen=True)
class GossipRun:
    """One node's gossip: the spec section, its own address (its member id) and seeds."""

    spec: GossipSpec
    bind: tuple[str, int]
    advertise: str  # "host:port" the others reach it at; its member id
    seeds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for address in (self.advertise, *self.seeds):
            split_address(address)  # a ValueError names a malformed one


class GossipService:
    def __init__(self, run: GossipRun, registry: CollectorRegistry, node_name: str) -> None:
        self.run = run
        self.node_name = node_name
        config = config_from_spec(run.spec)
        if run.spec.protocol != "swim":
            # A restarted node's beats must count as newer: its generation is its start
            # time in milliseconds (Cassandra's gossip does the same with seconds).
            config = replace(config, generation=int(time.time() * 1000))
        seeds = [s for s in run.seeds if s != run.advertise]
        rng = random.Random(f"twlb-gossip:{run.advertise}:{time.time_ns()}")
        node = make_node(run.spec.protocol, run.advertise, seeds, rng, config)
        self.agent = GossipAgent(node, run.bind, metrics=GossipMetrics(registry, node_name))

    async def start(self) -> None:
        await self.agent.start()

    async def stop(self) -> None:
        await self.agent.stop(leave=True)

    def describe(self) -> dict[str, Any]:
        return {"node_name": self.node_name, **self.agent.describe()}
