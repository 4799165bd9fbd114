"""The protocols by name: one factory for the live agent, the simulator and the tests."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from twlb.gossip.heartbeat import HEARTBEAT_PROTOCOLS, HeartbeatConfig, HeartbeatNode
from twlb.gossip.membership import MemberState
from twlb.gossip.swim import SwimConfig, SwimNode

from twlb.protocol import NodeId

PROTOCOLS = (*HEARTBEAT_PROTOCOLS, "swim")

GossipNode = HeartbeatNode | SwimNode
GossipConfig = HeartbeatConfig | SwimConfig


def default_config(protocol: str, **overrides: Any) -> GossipConfig:
    """The protocol's defaults (memberlist's LAN defaults for swim) with overrides."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown gossip protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    base: GossipConfig = SwimConfig() if protocol == "swim" else HeartbeatConfig()
    return replace(base, **overrides)


def make_node(
    protocol: str,
    node_id: NodeId,
    peers: Sequence[NodeId],
    rng: random.Random,
    config: GossipConfig | None = None,
) -> GossipNode:
    config = config or default_config(protocol)
    if protocol == "swim":
        assert isinstance(config, SwimConfig)
        return SwimNode(node_id, peers, rng, config)
    assert isinstance(config, HeartbeatConfig)
    return HeartbeatNode(node_id, peers, rng, config, protocol)


def recover_node(
    protocol: str,
    node_id: NodeId,
    peers: Sequence[NodeId],
    rng: random.Random,
    config: GossipConfig | None,
    state: Mapping[str, Any],
) -> GossipNode:
    """A node restarted from its persistent state (a higher incarnation or generation)."""
    if protocol == "swim":
        return SwimNode.recover(node_id, peers, rng, config, state)  # type: ignore[arg-type]
    return HeartbeatNode.recover(node_id, peers, rng, config, state, protocol)  # type: ignore[arg-type]


def describe(node: GossipNode) -> dict[str, Any]:
    """The JSON a node's `GET /gossip` answers: protocol and members with their state."""
    members = []
    for member, state, version in node.view():
        row: dict[str, Any] = {"node": member, "state": state.value}
        if isinstance(node, SwimNode):
            row["incarnation"] = version
        else:
            row["generation"], row["heartbeat"] = version
        members.append(row)
    return {"protocol": node.protocol, "self": node.node_id, "members": members}


def states_by_count(node: GossipNode) -> dict[str, int]:
    counts = {s.value: 0 for s in MemberState}
    for _, state, _ in node.view():
        counts[state.value] += 1
    return counts


#: Live nodes keep at most this many members: a full-state sync must fit one datagram.
LIVE_MAX_MEMBERS = 512


def config_from_spec(spec: Any) -> GossipConfig:
    """A core's configuration from a TrustCluster's `gossip` section (twlb.spec.GossipSpec):
    memberlist's ratios kept when the probe interval is scaled (probe timeout half of it,
    gossip every fifth of it, push-pull and reconnect every 30 of it)."""
    if spec.protocol == "swim":
        interval = spec.interval_s or 1.0
        return SwimConfig(
            probe_interval=interval,
            probe_timeout=spec.probe_timeout_s or interval / 2,
            suspicion_mult=spec.suspicion_mult,
            gossip_interval=spec.dissemination_interval_s or interval / 5,
            gossip_to_the_dead=30 * interval,
            push_pull_interval=30 * interval,
            reconnect_interval=30 * interval,
            max_members=LIVE_MAX_MEMBERS,
        )
    return HeartbeatConfig(
        interval=spec.interval_s or 0.5, fail_mult=spec.fail_mult, max_members=LIVE_MAX_MEMBERS
    )
