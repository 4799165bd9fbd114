"""Every setting of one balancer, validated in one place (the CLI and tests build this)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from twlb.balancer.upstream import BackendURLError, normalize_backend_url

from twlb.spec import PolicyName, Probability

#: Paths the balancer answers itself; every other path is proxied to a backend.
RESERVED_PATHS: frozenset[str] = frozenset({"/healthz", "/metrics", "/trust"})
#: Every path under this prefix is the balancer's admin API.
ADMIN_PREFIX = "/admin/"

#: Methods that may be retried on another backend (RFC 9110 idempotent methods).
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class BalancerSettings(BaseModel):
    """Configuration of `twlb balancer` (flags, environment or code)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    backends: tuple[str, ...] = Field(default=(), description="Backend origins http://host:port.")
    policy: PolicyName = PolicyName.ROUND_ROBIN
    admin_token: str | None = Field(None, description="Bearer token of the admin API.")
    audit_fraction: Probability = 0.05
    probation_audit_fraction: Probability = Field(
        0.5,
        description="trust policy: share of answers from backends in probation cross-checked "
        "(at least audit_fraction; only while audits are on).",
    )
    slow_start_s: float = Field(
        5.0,
        ge=0.0,
        le=600.0,
        description="trust policy: slow-start ramp of a backend in probation.",
    )
    latency_weighting: bool = Field(
        True, description="trust policy: scale trust weights by current load."
    )
    audit_ignore_fields: tuple[str, ...] = Field(
        ("node",), description="Top-level JSON fields left out when comparing answers."
    )
    window_s: float = Field(5.0, gt=0.0, le=300.0, description="Feature window length.")
    trust_tick_s: float = Field(0.5, gt=0.0, le=60.0, description="Trust update period.")
    policy_tick_s: float = Field(0.1, gt=0.0, le=10.0, description="Policy tick period.")
    health_interval_s: float = Field(1.0, gt=0.0, le=600.0)
    health_timeout_s: float = Field(0.5, gt=0.0, le=60.0)
    healthy_threshold: int = Field(2, ge=1, le=100, description="Passes to come back.")
    unhealthy_threshold: int = Field(2, ge=1, le=100, description="Failures to leave.")
    try_timeout_s: float = Field(1.0, gt=0.0, le=600.0, description="Timeout of one try.")
    max_tries: int = Field(3, ge=1, le=10, description="Tries per request, first included.")
    retry_budget: float = Field(0.2, ge=0.0, le=10.0, description="Retries / live requests.")
    max_body_bytes: int = Field(1 << 20, ge=0, le=1 << 30)
    seed: int = Field(0, ge=0)
    hash_algorithm: Literal["sha256", "md5"] = "sha256"
    vnodes: int = Field(
        160, ge=1, le=10_000, description="Virtual nodes per consistent-hash backend."
    )
    model: Path | None = Field(None, description="ONNX trust model (hot-reloaded on change).")
    oracle_truth: Path | None = Field(None, description="JSON {backend_url: node_class}.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("backends", mode="before")
    @classmethod
    def _normalize_backends(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = value.split()
        out: list[str] = []
        for url in value or ():
            try:
                norm = normalize_backend_url(url)
            except BackendURLError as err:
                raise ValueError(str(err)) from None
            if norm not in out:
                out.append(norm)
        return tuple(out)

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _oracle_needs_truth(self) -> BalancerSettings:
        if self.policy is PolicyName.ORACLE and self.oracle_truth is None:
            raise ValueError("policy 'oracle' needs oracle_truth (a JSON file of node classes)")
        return self
