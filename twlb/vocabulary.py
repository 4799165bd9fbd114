"""Names the TrustCluster spec and the services' settings share: policies, probabilities.

They live apart from twlb/spec.py because the spec's balancer section is derived from the
balancer's settings (services/balancer/settings.py), which need them too.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field


class PolicyName(StrEnum):
    """Routing policies the balancer offers (`--policy`)."""

    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_CONNECTIONS = "least-connections"
    WEIGHTED_ROUND_ROBIN = "weighted-round-robin"
    CONSISTENT_HASH = "consistent-hash"
    RENDEZVOUS = "rendezvous"
    MAGLEV = "maglev"
    BOUNDED_LOAD = "bounded-load"
    P2C_EWMA = "p2c-ewma"
    OUTLIER_EJECTION = "outlier-ejection"
    TRUST = "trust"
    ORACLE = "oracle"


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
