"""The one `TrustCluster` spec: a pydantic model that everything else derives from.

The CRD's openAPIV3Schema (operator), the embedded runtime, the chaos experiments and
the backend's fault flags all come from these classes. Field names are camelCase in
YAML and in the CRD (aliases) and snake_case in Python.
"""

from __future__ import annotations

import random
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "twlb.dev"
API_VERSION = "v1alpha1"
KIND = "TrustCluster"
PLURAL = "trustclusters"


class FaultType(StrEnum):
    """What a backend does wrong (DESIGN.md's fault model)."""

    BENIGN = "benign"
    DELAY = "delay"
    CRASH = "crash"
    ERROR = "error"
    BYZANTINE = "byzantine"
    LIE_LATENCY = "lie-latency"
    FLAPPING = "flapping"


class NodeClass(StrEnum):
    """What the trust model predicts for a backend (extend, never silently rename)."""

    HEALTHY = "healthy"
    DELAY = "delay"
    CRASH = "crash"
    ERROR = "error"
    BYZANTINE = "byzantine"


#: The class a node with a given fault really belongs to (the ground truth label).
FAULT_CLASS: dict[FaultType, NodeClass] = {
    FaultType.BENIGN: NodeClass.HEALTHY,
    FaultType.DELAY: NodeClass.DELAY,
    FaultType.CRASH: NodeClass.CRASH,
    FaultType.ERROR: NodeClass.ERROR,
    FaultType.BYZANTINE: NodeClass.BYZANTINE,
    FaultType.LIE_LATENCY: NodeClass.DELAY,
    FaultType.FLAPPING: NodeClass.ERROR,
}


class PolicyName(StrEnum):
    """Routing policies the balancer offers (`--policy`)."""

    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_CONNECTIONS = "least-connections"
    WEIGHTED_ROUND_ROBIN = "weighted-round-robin"
    CONSISTENT_HASH = "consistent-hash"
    P2C_EWMA = "p2c-ewma"
    OUTLIER_EJECTION = "outlier-ejection"
    TRUST = "trust"
    ORACLE = "oracle"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        protected_namespaces=(),
    )


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class FaultSpec(_Model):
    """One fault and its parameters; the backend reads the same fields as flags/env."""

    type: FaultType = Field(FaultType.BENIGN, description="Fault type.")
    probability: Probability = Field(1.0, description="Chance per request that the fault acts.")
    delay_ms: int = Field(
        5000,
        ge=0,
        le=600_000,
        description="Extra latency for delay (default far above timeouts) and lie-latency.",
    )
    error_status: int = Field(
        500, ge=500, le=599, description="HTTP status an error fault answers."
    )
    period_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="Length of each healthy and faulty period (flapping)."
    )
    flap_type: FaultType = Field(
        FaultType.ERROR, description="The fault active during a flapping node's faulty periods."
    )

    @model_validator(mode="after")
    def _flap_type_is_a_fault(self) -> FaultSpec:
        if self.flap_type in (FaultType.BENIGN, FaultType.FLAPPING):
            raise ValueError("flapType must be a fault other than benign or flapping")
        return self

    @property
    def node_class(self) -> NodeClass:
        """The ground-truth class of a node carrying this fault."""
        if self.probability == 0.0:
            return NodeClass.HEALTHY
        return FAULT_CLASS[self.type]

    def to_env(self, prefix: str = "TWLB_BACKEND_") -> dict[str, str]:
        """Environment variables `twlb backend` reads for this fault (click auto_envvar)."""
        return {
            f"{prefix}FAULT_TYPE": self.type.value,
            f"{prefix}FAULT_PROBABILITY": repr(self.probability),
            f"{prefix}DELAY_MS": str(self.delay_ms),
            f"{prefix}ERROR_STATUS": str(self.error_status),
            f"{prefix}PERIOD_S": repr(self.period_s),
            f"{prefix}FLAP_TYPE": self.flap_type.value,
        }

    def to_args(self) -> list[str]:
        """Command-line flags for `twlb backend` carrying this fault."""
        return [
            "--fault-type",
            self.type.value,
            "--fault-probability",
            repr(self.probability),
            "--delay-ms",
            str(self.delay_ms),
            "--error-status",
            str(self.error_status),
            "--period-s",
            repr(self.period_s),
            "--flap-type",
            self.flap_type.value,
        ]


class FaultMixEntry(FaultSpec):
    """`count` nodes, chosen at random by the cluster's seed, carry this fault."""

    count: int = Field(1, ge=0, le=100, description="How many nodes carry this fault.")


class NodeOverride(_Model):
    """Pin a fault (and optionally a seed) on the node with this index."""

    index: int = Field(ge=0, le=99, description="Node index, 0-based.")
    fault: FaultSpec = Field(default_factory=FaultSpec)
    seed: int | None = Field(
        None, ge=0, description="Node seed; default derived from the cluster's."
    )


class BalancerSpec(_Model):
    """Settings of the cluster's balancer."""

    audit_fraction: Probability = Field(0.05, description="Share of requests cross-checked.")
    window_s: float = Field(5.0, gt=0.0, le=300.0, description="Feature window length, seconds.")
    health_interval_s: float = Field(
        1.0, gt=0.0, le=60.0, description="Active health-check interval."
    )
    retry_budget: Probability = Field(
        0.2, description="Retries allowed as a ratio of live traffic."
    )
    model_config_map: str | None = Field(
        None, description="ConfigMap holding the ONNX trust model (cluster only)."
    )


class TrustClusterSpec(_Model):
    """The desired state of a TrustCluster."""

    backends: int = Field(3, ge=1, le=100, description="Number of backend nodes.")
    seed: int = Field(0, ge=0, description="Seed for fault assignment and node simulation.")
    policy: PolicyName = Field(PolicyName.TRUST, description="The balancer's routing policy.")
    fault_mix: list[FaultMixEntry] = Field(
        default_factory=list,
        max_length=100,
        description="Faults spread over randomly chosen nodes (by seed).",
    )
    nodes: list[NodeOverride] = Field(
        default_factory=list,
        max_length=100,
        description="Faults pinned on given node indices (win over the mix).",
    )
    balancer: BalancerSpec = Field(default_factory=BalancerSpec)
    image: str = Field("twlb:0.1.0", min_length=1, description="Container image (cluster only).")

    @model_validator(mode="after")
    def _fits(self) -> TrustClusterSpec:
        mixed = sum(e.count for e in self.fault_mix)
        if mixed > self.backends:
            raise ValueError(f"faultMix assigns {mixed} faults to only {self.backends} backends")
        seen: set[int] = set()
        for o in self.nodes:
            if o.index >= self.backends:
                raise ValueError(
                    f"nodes[].index {o.index} is out of range for {self.backends} backends"
                )
            if o.index in seen:
                raise ValueError(f"nodes[].index {o.index} appears twice")
            seen.add(o.index)
        return self


class NodeAssignment(_Model):
    """What one node of a cluster is: its name, seed and fault (the ground truth)."""

    index: int
    name: str
    seed: int
    fault: FaultSpec


def assign_faults(spec: TrustClusterSpec, cluster_name: str = "twlb") -> list[NodeAssignment]:
    """Seeded, reproducible fault assignment: same spec and seed, same nodes and faults."""
    rng = random.Random(f"twlb-faults:{spec.seed}")
    faults: list[FaultSpec] = [FaultSpec() for _ in range(spec.backends)]
    pinned = {o.index for o in spec.nodes}
    free = [i for i in range(spec.backends) if i not in pinned]
    rng.shuffle(free)
    for entry in spec.fault_mix:
        fault = FaultSpec.model_validate(entry.model_dump(exclude={"count"}))
        for _ in range(entry.count):
            if not free:
                break
            faults[free.pop()] = fault
    seeds = {o.index: o.seed for o in spec.nodes if o.seed is not None}
    for o in spec.nodes:
        faults[o.index] = o.fault
    return [
        NodeAssignment(
            index=i,
            name=f"{cluster_name}-node-{i}",
            seed=seeds.get(i, spec.seed * 1000 + i),
            fault=faults[i],
        )
        for i in range(spec.backends)
    ]


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None


class TrustCluster(BaseModel):
    """A whole TrustCluster document as found in YAML (apiVersion, kind, metadata, spec)."""

    model_config = ConfigDict(extra="allow")
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMeta
    spec: TrustClusterSpec = Field(default_factory=TrustClusterSpec)

    @model_validator(mode="after")
    def _is_a_trustcluster(self) -> TrustCluster:
        if self.api_version != f"{API_GROUP}/{API_VERSION}":
            raise ValueError(
                f"apiVersion must be {API_GROUP}/{API_VERSION}, got {self.api_version}"
            )
        if self.kind != KIND:
            raise ValueError(f"kind must be {KIND}, got {self.kind}")
        return self


class SpecError(ValueError):
    """A TrustCluster file or document that is not valid; the message names the field."""


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the field path (e.g. `spec.faultMix.0.probability`)."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(document)"
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def parse_trustcluster(doc: Any) -> TrustCluster:
    """Validate a parsed YAML/JSON document as a TrustCluster or raise SpecError."""
    if not isinstance(doc, dict):
        raise SpecError("a TrustCluster document must be a mapping")
    try:
        return TrustCluster.model_validate(doc)
    except ValidationError as err:
        raise SpecError(describe_validation_error(err)) from None


def load_trustcluster(path: str | Path) -> TrustCluster:
    """Read and validate the first TrustCluster in a YAML file."""
    p = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except OSError as err:
        raise SpecError(f"{p}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == KIND:
            try:
                return parse_trustcluster(d)
            except SpecError as err:
                raise SpecError(f"{p}: {err}") from None
    raise SpecError(f"{p}: no document of kind {KIND}")
