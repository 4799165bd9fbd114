"""Every setting of one backend node, declared once: `twlb backend`'s flags come from here.

The fault is the TrustCluster spec's `FaultSpec` (twlb/spec.py), whose fields are the
fault flags; the rest of the node's settings are `BackendSettings`' fields. Both become
click options through twlb/options.py.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import click
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twlb.options import Flag
from twlb.spec import FaultSpec, GossipSpec
from twlb.vocabulary import Probability

if TYPE_CHECKING:
    from twlb.backend.server import HeadLimits
    from twlb.gossip.service import GossipRun


class BackendSettings(BaseModel):
    """Everything one node needs (flags, environment or code)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=1, le=65535, description="Port to listen on.")
    node_id: str = Field(
        default_factory=socket.gethostname,
        description="Name this node reports in answers and metrics (default: the hostname).",
    )
    seed: int = Field(0, ge=0, description="Seed of faults and simulation.")
    fault: FaultSpec = Field(default_factory=FaultSpec, description="The node's fault.")
    control_token: str | None = Field(
        None,
        description="Bearer token of /control/fault (prefer --control-token-file or the "
        "environment: a flag's value is visible in the process list); without one the "
        "control endpoint is disabled.",
    )
    control_token_file: Annotated[
        Path | None, Flag(type=click.Path(dir_okay=False, path_type=Path))
    ] = Field(
        None,
        description="File holding the bearer token of /control/fault (re-read when it "
        "changes); instead of --control-token.",
    )
    simulation: bool = Field(
        True, description="Simulate the node's load, latency, packet loss, CPU and memory."
    )
    packet_loss: Probability | None = Field(
        None, description="Share of connections dropped, overriding the simulated loss."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["text", "json"] | None = Field(
        None,
        description="Log lines as text or as one JSON object each (default: `twlb "
        "--log-format`, TWLB_LOG_FORMAT, else text).",
    )
    # Limits on a request head (services/backend/server.py), above the balancer's own on
    # what a client sends it, since the balancer adds its forwarding headers.
    max_head_bytes: int = Field(
        80 * 1024,
        ge=1024,
        le=1 << 24,
        description="Largest request line plus headers, counted as bytes arrive; more get 431.",
    )
    max_headers: int = Field(
        128, ge=1, le=10_000, description="Most header lines in a request; more get 431."
    )
    head_timeout_s: Annotated[float, Flag("--head-timeout")] = Field(
        10.0,
        gt=0.0,
        le=600.0,
        description="Seconds from a connection's opening, or a request head's first byte, to "
        "the head's end (trickled bytes do not extend it); later: 408 and the connection "
        "closes.",
    )
    # Gossip failure detection (twlb.gossip): the TrustCluster's `gossip` section, plus
    # where this node is and whom it joins through.
    gossip: GossipSpec = Field(default_factory=GossipSpec, description="Gossip settings.")
    gossip_advertise: str | None = Field(
        None,
        description="HOST:PORT the other nodes reach this node's gossip at (default: --host and the UDP port).",
    )
    gossip_seeds: tuple[str, ...] = Field(
        (),
        max_length=512,
        description="HOST:PORT of a peer to join through; repeat (space-separated in the variable).",
    )

    @field_validator("gossip_advertise", "gossip_seeds")
    @classmethod
    def _gossip_addresses(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        from twlb.gossip.agent import split_address

        for address in (value,) if isinstance(value, str) else value or ():
            split_address(address)  # a ValueError names the malformed one
        return value

    @property
    def head_limits(self) -> HeadLimits:
        """The limits of the node's HTTP server on a request head."""
        from twlb.backend.server import HeadLimits

        return HeadLimits(self.max_head_bytes, self.max_headers, self.head_timeout_s)

    def gossip_run(self) -> GossipRun | None:
        """This node's gossip, or None when it is off (--no-gossip)."""
        from twlb.gossip.service import GossipRun

        if not self.gossip.enabled:
            return None
        udp_port = self.gossip.port or self.port
        advertise = self.gossip_advertise or f"{self.host}:{udp_port}"
        return GossipRun(self.gossip, (self.host, udp_port), advertise, self.gossip_seeds)

    @field_validator("node_id")
    @classmethod
    def _node_id_is_a_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("control_token")
    @classmethod
    def _empty_token_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _one_token_source(self) -> BackendSettings:
        if self.control_token is not None and self.control_token_file is not None:
            raise ValueError("control_token_file and control_token both given: give one")
        return self
