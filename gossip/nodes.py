"""The protocols by name: one factory for the live agent, the simulator and the tests."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from twlb.gossip.heartbeat import HEARTBEAT_PROTOCOLS, HeartbeatConfig, HeartbeatNode
from twlb.gossip.membership import MemberState
from twlb.gossip.swim import SWIM_PROFILES, SwimConfig, SwimNode, swim_config

from twlb.protocol import NodeId

PROTOCOLS = (*HEARTBEAT_PROTOCOLS, "swim")

GossipNode = HeartbeatNode | SwimNode
GossipConfig = HeartbeatConfig | SwimConfig


def default_config(protocol: str, profile: str = "twlb", **overrides: Any) -> GossipConfig:
    """The protocol's defaults with overrides; for swim, the profile's (`twlb`, or
    `memberlist`: memberlist's DefaultLANConfig and its choices, `swim.swim_config`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown gossip protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    if profile not in SWIM_PROFILES:
        raise ValueError(f"unknown gossip profile {profile!r}; one of {', '.join(SWIM_PROFILES)}")
    if protocol == "swim":
        return swim_config(profile, **overrides)
    return replace(HeartbeatConfig(), **overrides)


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
    """The JSON a node's `GET /gossip` answers: protocol and members with their state;
    members it has forgotten follow with their last state and `"forgotten": true` (so
    that a reader still sees them down)."""
    members = []
    for rows, forgotten in ((node.view(), False), (node.forgotten(), True)):
        for member, state, version in rows:
            row: dict[str, Any] = {"node": member, "state": state.value}
            if isinstance(node, SwimNode):
                row["incarnation"] = version
            else:
                row["generation"], row["heartbeat"] = version
            if forgotten:
                row["forgotten"] = True
            members.append(row)
    answer = {"protocol": node.protocol, "self": node.node_id, "members": members}
    if isinstance(node, SwimNode):
        answer["profile"] = node.config.profile
        answer["health"] = node.health_multiplier()
    return answer


def states_by_count(node: GossipNode) -> dict[str, int]:
    counts = {s.value: 0 for s in MemberState}
    for _, state, _ in node.view():
        counts[state.value] += 1
    return counts


#: Live nodes keep at most this many living members: a full-state sync must fit one
#: datagram (and as many tombstones of members they forgot).
LIVE_MAX_MEMBERS = 512


def config_from_spec(spec: Any) -> GossipConfig:
    """A core's configuration from a TrustCluster's `gossip` section (twlb.spec.GossipSpec):
    memberlist's ratios kept when the probe interval is scaled (probe timeout half of it,
    gossip every fifth of it, push-pull, reconnect, forgetting the dead and the hold of a
    lower health every 30 of it)."""
    forget = spec.forget_after_s
    if spec.protocol == "swim":
        interval = spec.interval_s or 1.0
        return swim_config(
            spec.profile,
            probe_interval=interval,
            probe_timeout=spec.probe_timeout_s or interval / 2,
            suspicion_mult=spec.suspicion_mult,
            gossip_interval=spec.dissemination_interval_s or interval / 5,
            gossip_to_the_dead=forget if forget is not None else 30 * interval,
            health_hold=30 * interval,
            push_pull_interval=30 * interval,
            reconnect_interval=30 * interval,
            max_members=LIVE_MAX_MEMBERS,
        )
    interval = spec.interval_s or 0.5
    return HeartbeatConfig(
        interval=interval,
        fail_mult=spec.fail_mult,
        reap_after=forget if forget is not None else 60 * interval,
        reconnect_interval=20 * interval,
        max_members=LIVE_MAX_MEMBERS,
    )
