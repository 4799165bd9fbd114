"""Names the TrustCluster spec and the services' settings share: policies, probabilities,
table sizes.

They live apart from twlb/spec.py because the spec's balancer section is derived from the
balancer's settings (services/balancer/settings.py), which need them too.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field


class PolicyName(StrEnum):
    """Routing policies the balancer offers (`--policy`)."""

    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_CONNECTIONS = "least-connections"
    WEIGHTED_ROUND_ROBIN = "weighted-round-robin"
    CONSISTENT_HASH = "consistent-hash"
    RENDEZVOUS = "rendezvous"
    MAGLEV = "maglev"
    JUMP = "jump"
    BOUNDED_LOAD = "bounded-load"
    P2C_EWMA = "p2c-ewma"
    OUTLIER_EJECTION = "outlier-ejection"
    TRUST = "trust"
    ORACLE = "oracle"


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _prime(n: int) -> int:
    if not is_prime(n):
        raise ValueError(f"must be a prime number, got {n}")
    return n


#: A Maglev lookup-table size: prime (each backend's permutation must reach every slot).
PrimeTableSize = Annotated[int, Field(ge=101, le=10_000_019), AfterValidator(_prime)]
