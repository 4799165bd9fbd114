"""The one `TrustCluster` spec: a pydantic model that everything else derives from.

The CRD's openAPIV3Schema (operator), the embedded runtime, the chaos experiments and
the backend's fault flags all come from these classes. Field names are camelCase in
YAML and in the CRD (aliases) and snake_case in Python.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from twlb.options import Flag, to_args, to_env
from twlb.vocabulary import PolicyName, PrimeTableSize, Probability

API_GROUP = "twlb.dev"
API_VERSION = "v1alpha1"
KIND = "TrustCluster"
PLURAL = "trustclusters"


class FaultType(StrEnum):
    """What a backend does wrong (docs/DESIGN.md, "Faults")."""

    BENIGN = "benign"
    DELAY = "delay"
    CRASH = "crash"
    ERROR = "error"
    BYZANTINE = "byzantine"
    COLLUDING = "colluding"  # byzantine, agreeing on the same wrong answer with its group
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
    FaultType.COLLUDING: NodeClass.BYZANTINE,
    FaultType.LIE_LATENCY: NodeClass.DELAY,
    FaultType.FLAPPING: NodeClass.ERROR,
}


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        protected_namespaces=(),
    )


#: Shortest flapping period: a shorter one is no period anyone could observe (and one of
#: 5e-324 s overflows the period count).
FLAP_PERIOD_MIN_S = 0.01


class FaultSpec(_Model):
    """One fault and its parameters; `twlb backend`'s fault flags are generated from it."""

    type: Annotated[FaultType, Flag("--fault-type", param="fault_type")] = Field(
        FaultType.BENIGN, description="The active fault."
    )
    probability: Annotated[Probability, Flag("--fault-probability", param="fault_probability")] = (
        Field(1.0, description="Chance per request that the fault acts (0..1).")
    )
    delay_ms: int = Field(
        5000,
        ge=0,
        le=600_000,
        description="Extra latency of delay (default far above timeouts) and lie-latency "
        "faults, milliseconds.",
    )
    error_status: int = Field(
        500, ge=500, le=599, description="HTTP status (5xx) an error fault answers."
    )
    period_s: float = Field(
        10.0,
        ge=FLAP_PERIOD_MIN_S,
        le=3600.0,
        description="Length of each healthy and faulty period of a flapping node, seconds.",
    )
    flap_type: FaultType = Field(
        FaultType.ERROR, description="The fault acting in a flapping node's faulty periods."
    )
    collusion_group: str = Field(
        "colluders",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Colluding faults: nodes of one group give the same wrong answer for the "
        "same key (and lie on the same keys).",
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
        return to_env(self, prefix, exclude=self._not_a_fault())

    def to_args(self) -> list[str]:
        """Command-line flags for `twlb backend` carrying this fault."""
        return to_args(self, exclude=self._not_a_fault())

    def _not_a_fault(self) -> set[str]:
        """Fields a subclass adds (e.g. a mix entry's count) that no backend flag carries."""
        return set(type(self).model_fields) - set(FaultSpec.model_fields)


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


class BalancerTunables(BaseModel):
    """The balancer settings a TrustCluster may set, declared once: `twlb balancer`'s
    settings (services/balancer/settings.py, `BalancerSettings`) inherit these fields, and
    the spec's `balancer` section carries them under camelCase names (`windowS`). To let a
    TrustCluster set another balancer setting, move its field here."""

    audit_fraction: Probability = Field(
        0.05, description="Share of GET requests cross-checked on two more backends."
    )
    suspect_audit_fraction: Probability = Field(
        1.0,
        description="trust policy: share of answers cross-checked from a backend an audit "
        "found the odd one out, until the evidence clears or proves it (while audits are on).",
    )
    liar_backoff_s: Annotated[float, Flag("--liar-backoff")] = Field(
        60.0,
        gt=0.0,
        le=86_400.0,
        description="trust policy: seconds a backend proven a liar stays out of rotation after "
        "its first proven offence; doubled for each further one (up to an hour, or this).",
    )
    window_s: Annotated[float, Flag("--window")] = Field(
        5.0, gt=0.0, le=300.0, description="Feature window, seconds."
    )
    health_interval_s: Annotated[float, Flag("--health-interval")] = Field(
        1.0,
        gt=0.0,
        le=600.0,
        description="Seconds between active health checks of each backend.",
    )
    gossip_poll_s: Annotated[float, Flag("--gossip-poll")] = Field(
        0.5,
        ge=0.0,
        le=60.0,
        description="Seconds between reads of every backend's GET /gossip; a backend all the "
        "others agree is dead leaves the rotation at once (0: ignore gossip).",
    )
    retry_budget: float = Field(
        0.2, ge=0.0, le=10.0, description="Retries allowed as a ratio of live requests."
    )
    drain_s: float = Field(
        10.0,
        ge=0.0,
        le=600.0,
        description="On SIGTERM: seconds a balancer keeps serving the requests in flight, "
        "queued and arriving on open connections (each answer then closes its connection) "
        "after /readyz turns 503 and its listener closes; then what is left gets 503.",
    )
    hash_algorithm: Literal["sha256", "md5"] = Field(
        "sha256", description="Key hash of consistent-hash, rendezvous, maglev, jump, bounded-load."
    )
    vnodes: int = Field(
        160,
        ge=1,
        le=10_000,
        description="Virtual nodes per backend on the ring (consistent-hash, bounded-load).",
    )
    balance_factor: float = Field(
        1.25,
        ge=1.0,
        le=100.0,
        description="bounded-load: no backend carries more than this times the mean load.",
    )
    maglev_table_size: PrimeTableSize = Field(
        65_537,
        description="maglev: slots of the lookup table, a prime well above 100 x the backends; "
        "fixed while backends come and go.",
    )


class BalancerSpec(_Model, BalancerTunables):
    """Settings of the cluster's balancer."""

    replicas: int = Field(
        1,
        ge=1,
        le=16,
        description="Balancer replicas: they share audit evidence, so a liar any of them "
        "proves is out of every one's rotation (`twlb up`: processes on one address; "
        "Kubernetes: a Deployment rolled one pod at a time).",
    )
    model_config_map: str | None = Field(
        None, description="ConfigMap holding the ONNX trust model (cluster only)."
    )


#: Fields of the spec's `balancer` section that are not `twlb balancer` flags.
NOT_BALANCER_FLAGS = frozenset({"model_config_map", "replicas"})


def balancer_args(balancer: BaseModel) -> list[str]:
    """`twlb balancer` flags carrying a spec's balancer settings (cluster-only ones left out)."""
    return to_args(balancer, exclude=NOT_BALANCER_FLAGS)


GossipProtocol = Literal[
    "swim", "random", "round-robin", "binary-round-robin", "sequence-check", "consensus"
]
GossipProfile = Literal["twlb", "memberlist"]


class GossipSpec(_Model):
    """Gossip failure detection among the backends (twlb.gossip). On by default: SWIM
    costs each node about three small UDP datagrams a second whatever N is, and the
    balancer acts on it only when every live member agrees that a node is dead, so a
    wrong verdict needs the whole cluster to be wrong. `twlb backend`'s --gossip-* flags
    are generated from these fields."""

    enabled: Annotated[bool, Flag("--gossip", param="gossip")] = Field(
        True, description="Run gossip failure detection among the backends."
    )
    protocol: Annotated[GossipProtocol, Flag("--gossip-protocol", param="gossip_protocol")] = Field(
        "swim", description="The gossip protocol."
    )
    profile: Annotated[GossipProfile, Flag("--gossip-profile", param="gossip_profile")] = Field(
        "twlb",
        description="swim: this project's settings, or memberlist's exact DefaultLANConfig (shuffled probes, a confirmed suspicion's minimum of suspicionMult x max(1, log10 N) intervals, no health-scaled windows).",
    )
    interval_s: Annotated[float | None, Flag("--gossip-interval", param="gossip_interval")] = Field(
        None,
        ge=0.01,
        le=60,
        description="Probe interval (swim; default 1 s) or gossip round (the others; 0.5 s).",
    )
    probe_timeout_s: Annotated[
        float | None, Flag("--gossip-probe-timeout", param="gossip_probe_timeout")
    ] = Field(None, ge=0.005, le=60, description="swim: wait for a direct ack (default 0.5 s).")
    suspicion_mult: Annotated[
        int, Flag("--gossip-suspicion-mult", param="gossip_suspicion_mult")
    ] = Field(
        4,
        ge=1,
        le=100,
        description="swim: memberlist's SuspicionMult; a lone accuser waits 6x this, in probe intervals x log10 N (profile twlb: a suspicion two healthy members confirmed about a member that announces itself healthy, 2).",
    )
    dissemination_interval_s: Annotated[
        float | None, Flag("--gossip-dissemination-interval", param="gossip_dissemination_interval")
    ] = Field(None, ge=0.005, le=60, description="swim: gossip to 3 members this often (0.2 s).")
    fail_mult: Annotated[float, Flag("--gossip-fail-mult", param="gossip_fail_mult")] = Field(
        3.0, ge=0.5, le=100, description="Heartbeat protocols: T_fail in dissemination rounds."
    )
    forget_after_s: Annotated[
        float | None, Flag("--gossip-forget-after", param="gossip_forget_after")
    ] = Field(
        None,
        ge=0.1,
        le=86_400,
        description="Dead and left members are forgotten this long after their verdict (memberlist's GossipToTheDeadTime; default 30 probe intervals for swim, 60 rounds for the others).",
    )
    port: Annotated[int | None, Flag("--gossip-port", param="gossip_port")] = Field(
        None,
        ge=1,
        le=65535,
        description="UDP port (default: the HTTP port's number locally, 7946 in a cluster).",
    )

    def to_args(self, exclude: Iterable[str] = ()) -> list[str]:
        """The `twlb backend` flags carrying this section."""
        return to_args(self, exclude=exclude)

    def to_env(self, prefix: str, exclude: Iterable[str] = ()) -> dict[str, str]:
        """The same as `twlb backend`'s environment variables."""
        return to_env(self, prefix, exclude=exclude)


class DataPlane(StrEnum):
    """What routes a cluster's traffic: TW-LB's own proxy, or Envoy steered by TW-LB as
    its xDS control plane (docs/envoy.md)."""

    BALANCER = "balancer"
    ENVOY = "envoy"


#: The policies an Envoy data plane carries out (`twlb.envoy.resources.LB_POLICY` maps each
#: to Envoy's load balancer; a test keeps the two in step).
ENVOY_POLICIES: frozenset[PolicyName] = frozenset(
    {
        PolicyName.TRUST,
        PolicyName.ROUND_ROBIN,
        PolicyName.WEIGHTED_ROUND_ROBIN,
        PolicyName.RANDOM,
        PolicyName.LEAST_CONNECTIONS,
        PolicyName.P2C_EWMA,
        PolicyName.OUTLIER_EJECTION,
    }
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
    data_plane: DataPlane = Field(
        DataPlane.BALANCER,
        description="What routes the traffic: balancer (TW-LB's own proxy) or envoy (Envoy, "
        "with TW-LB as its xDS control plane).",
    )
    balancer: BalancerSpec = Field(default_factory=BalancerSpec)
    gossip: GossipSpec = Field(default_factory=GossipSpec)
    image: str = Field("twlb:0.1.0", min_length=1, description="Container image (cluster only).")

    @model_validator(mode="after")
    def _fits(self) -> TrustClusterSpec:
        if self.data_plane is DataPlane.ENVOY and self.policy not in ENVOY_POLICIES:
            carried = ", ".join(sorted(p.value for p in ENVOY_POLICIES))
            raise ValueError(
                f"policy {self.policy.value!r} has no Envoy counterpart (dataPlane: envoy "
                f"carries out {carried})"
            )
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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where a YAML error is and what it is, on one line (PyYAML's own text spans several,
    with a snippet of the file)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return f": {' '.join(str(err).split())}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_trustcluster(path: str | Path) -> TrustCluster:
    """Read and validate the first TrustCluster in a YAML file."""
    p = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d is not None]
    except OSError as err:
        raise SpecError(f"{p}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{p}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML{_yaml_problem(err)}") from None
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == KIND:
            try:
                return parse_trustcluster(d)
            except SpecError as err:
                raise SpecError(f"{p}: {err}") from None
    raise SpecError(f"{p}: no document of kind {KIND}")
