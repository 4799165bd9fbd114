"""Every setting of one balancer, validated in one place (the CLI and tests build this)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import click
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from twlb.balancer.discovery import DiscoveryError, parse_selector
from twlb.balancer.http_server import ServerLimits
from twlb.balancer.upstream import (  # noqa: F401 (IDEMPOTENT_METHODS: re-exported)
    IDEMPOTENT_METHODS,
    BackendURLError,
    UpstreamLimits,
    normalize_backend_url,
)

from twlb.options import Flag
from twlb.spec import BalancerTunables
from twlb.vocabulary import PolicyName, Probability

#: Paths the balancer answers itself; every other path is proxied to a backend.
RESERVED_PATHS: frozenset[str] = frozenset({"/healthz", "/readyz", "/metrics", "/trust"})
#: Every path under this prefix is the balancer's admin API.
ADMIN_PREFIX = "/admin/"

#: Most header lines of a /healthz answer.
HEALTH_MAX_HEADERS = 50

#: `--model` keywords: the trust model that ships in ml/models/ (the default), or none.
SHIPPED_MODEL = "shipped"
HEURISTIC_MODEL = "heuristic"
#: The file `twlb train` writes the trust model to in its --out directory, and the name of
#: the one that ships in ml/models/ (the operator mounts it as MOUNTED_MODEL_FILE).
TRAINED_MODEL_FILE = "trust-svm.onnx"


def shipped_model() -> Path | None:
    """The trust model that ships in ml/models/, if this build has one."""
    from importlib.resources import files

    path = Path(str(files("twlb.ml") / "models" / TRAINED_MODEL_FILE))
    return path if path.is_file() else None


def resolve_model(choice: str | Path | None) -> Path | None:
    """A `--model` value: 'shipped' (the model in ml/models/; the heuristic in a build
    without one), 'heuristic' (None), or an ONNX file, which must exist. The one place a
    model choice is resolved: the settings' validator and every command's --model
    (`ModelChoice`) call it."""
    if choice is None or str(choice) == HEURISTIC_MODEL:
        return None
    if str(choice) == SHIPPED_MODEL:
        return shipped_model()
    path = Path(choice)
    if not path.is_file():
        raise ValueError(f"{choice}: does not exist (give an ONNX file, 'shipped' or 'heuristic')")
    return path


class ModelChoice(click.ParamType):
    """The click type of --model (`twlb balancer`, `up`, `demo`, `bench`): the choice
    resolved by `resolve_model` into an ONNX file, or None for the heuristic."""

    name = "model"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"[{SHIPPED_MODEL}|{HEURISTIC_MODEL}|FILE]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return resolve_model(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class BalancerSettings(BalancerTunables):
    """Every setting of `twlb balancer`: the one declaration of each.

    The command's flags (services/balancer/cli.py, through twlb/options.py) and the
    TrustCluster spec's `balancer` section (twlb/spec.py) are derived from these fields;
    adding a setting is adding a field here (CONTRIBUTING.md, "Add an option").
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on.")
    backends: Annotated[tuple[str, ...], Flag("--backend", param="backend")] = Field(
        default=(),
        description="Backend origin http://host:port (repeatable; space-separated in the "
        "environment).",
    )
    policy: PolicyName = Field(PolicyName.ROUND_ROBIN, description="Routing policy.")
    discover_services: str | None = Field(
        None,
        description="Kubernetes: label selector (k=v,...) of the backend Services to follow; "
        "each one is a backend, http://NAME.NAMESPACE.svc:PORT, from its creation to its "
        "deletion (--backend ones stay).",
    )
    discover_namespace: str | None = Field(
        None, description="Namespace of the discovered Services (default: the pod's own)."
    )
    discover_port: str = Field(
        "http", description="Port of the discovered Services: its name, or its number."
    )
    discover_resync_s: Annotated[float, Flag("--discover-resync")] = Field(
        60.0,
        gt=0.0,
        le=3600.0,
        description="Seconds between full lists of the discovered Services (changes are "
        "watched in between).",
    )
    admin_token: str | None = Field(
        None,
        description="Bearer token of /admin/* (prefer --admin-token-file or the environment: "
        "a flag's value is visible in the process list); unset: the admin API is disabled.",
    )
    admin_token_file: Annotated[
        Path | None, Flag(type=click.Path(dir_okay=False, path_type=Path))
    ] = Field(
        None,
        description="File holding the bearer token of /admin/* (re-read when it changes); "
        "instead of --admin-token.",
    )
    admin_host: str = Field(
        "127.0.0.1",
        description="Address of the admin listener (/admin/*, /trust, /metrics, /readyz, "
        "/healthz).",
    )
    admin_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the admin listener; with it the traffic port proxies every path, "
        "/admin, /trust, /metrics, /readyz and /healthz included. Unset: one listener serves "
        "both.",
    )
    listen_fd: int | None = Field(
        None,
        ge=0,
        description="Serve traffic on this inherited listening socket (a file descriptor) "
        "instead of binding --host/--port: how `twlb up` runs several replicas on one "
        "address.",
    )
    replica_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=253,
        description="This replica's name among the balancer's replicas (default: the hostname).",
    )
    peers: Annotated[tuple[str, ...], Flag("--peer", param="peer")] = Field(
        default=(),
        description="Admin listener http://host:port of another replica to share audit "
        "evidence with (repeatable; space-separated in the environment).",
    )
    peer_dns: str | None = Field(
        None,
        description="HOST:PORT: every address HOST resolves to is a replica's admin listener "
        "(on Kubernetes, a headless Service of the balancer's pods); re-resolved each sync.",
    )
    peer_sync_s: Annotated[float, Flag("--peer-sync")] = Field(
        0.5,
        gt=0.0,
        le=60.0,
        description="Seconds between evidence exchanges with every peer (a proof or a suspicion "
        "is sent at once).",
    )
    evidence_file: Annotated[Path | None, Flag(type=click.Path(dir_okay=False, path_type=Path))] = (
        Field(
            None,
            description="File this replica keeps its own audit evidence in (written as it "
            "changes, read at start): proven liars and their back-offs survive a restart.",
        )
    )
    access_log_sample: Probability = Field(
        1.0,
        description="Share of requests written to the access log, one JSON (or text) line "
        "each (0: none).",
    )
    log_format: Literal["text", "json"] | None = Field(
        None,
        description="Log lines as text or as one JSON object each (default: `twlb "
        "--log-format`, TWLB_LOG_FORMAT, else text).",
    )
    tls_cert_file: Path | None = Field(
        None, description="Certificate chain (PEM) of the traffic listener: it serves HTTPS."
    )
    tls_key_file: Path | None = Field(None, description="Private key (PEM) of --tls-cert-file.")
    backend_ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) that https:// backends' certificates are verified "
        "against (default: the system's).",
    )
    probation_audit_fraction: Probability = Field(
        0.5,
        description="trust policy: share of answers from backends in probation (new, or back "
        "after an ejection) cross-checked, while audits are on (audit fraction > 0).",
    )
    slow_start_s: Annotated[float, Flag("--slow-start")] = Field(
        5.0,
        ge=0.0,
        le=600.0,
        description="trust policy: seconds over which a backend in probation ramps up to its "
        "weight (0: off).",
    )
    latency_weighting: bool = Field(
        True,
        description="trust policy: scale each trust weight by the backend's current peak-EWMA "
        "load against the best candidate's (off: route on trust alone).",
    )
    audit_ignore_fields: Annotated[tuple[str, ...], Flag("--audit-ignore-field")] = Field(
        ("node",),
        description="Top-level JSON field that differs between honest backends (their "
        "identity) and is left out when answers are compared (repeatable).",
    )
    trust_tick_s: float = Field(0.5, gt=0.0, le=60.0, description="Trust update period, seconds.")
    policy_tick_s: float = Field(0.1, gt=0.0, le=10.0, description="Policy tick period, seconds.")
    health_timeout_s: Annotated[float, Flag("--health-timeout")] = Field(
        0.5, gt=0.0, le=60.0, description="Timeout of one health check, seconds."
    )
    healthy_threshold: int = Field(
        2, ge=1, le=100, description="Consecutive passing checks that bring a backend back."
    )
    unhealthy_threshold: int = Field(
        2, ge=1, le=100, description="Consecutive failed checks that take a backend out."
    )
    try_timeout_s: Annotated[float, Flag("--try-timeout")] = Field(
        1.0, gt=0.0, le=600.0, description="Timeout of one upstream try, seconds."
    )
    max_tries: int = Field(
        3, ge=1, le=10, description="Tries per idempotent request, the first included."
    )
    # ---- client-side limits: what one client connection may send or hold (the HTTP
    # server of http_server.py takes them from here, `server_limits`)
    max_body_bytes: int = Field(
        1 << 20,
        ge=0,
        le=1 << 30,
        description="Largest request body; larger ones get 413 and the connection closes.",
    )
    max_request_headers: int = Field(
        100, ge=1, le=10_000, description="Most header lines in a request; more get 431."
    )
    max_head_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=1 << 24,
        description="Largest request line plus headers, counted as bytes arrive; more get 431.",
    )
    head_timeout_s: Annotated[float, Flag("--head-timeout")] = Field(
        10.0,
        gt=0.0,
        le=600.0,
        description="Seconds a client has from the first byte of a request head to its end "
        "(trickled bytes do not extend it); later: 408 and the connection closes.",
    )
    body_timeout_s: Annotated[float, Flag("--body-timeout")] = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="Seconds a client has from the end of a request head to the end of its "
        "body, whatever it trickles; later: 408 and the connection closes.",
    )
    keepalive_timeout_s: Annotated[float, Flag("--keepalive-timeout")] = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="Seconds an idle client connection stays open between requests.",
    )
    keepalive_requests: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="Answers a client connection carries before one closes it (0: no cap; "
        "as nginx's keepalive_requests, 1000 there): clients reconnect, so long-lived "
        "connections spread again over replicas sharing one socket.",
    )
    send_timeout_s: Annotated[float, Flag("--send-timeout")] = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="Seconds an answer may wait in the write buffer of a client that reads "
        "none of it; then the connection is dropped.",
    )
    max_pipelined: int = Field(
        16,
        ge=1,
        le=1024,
        description="Requests of one connection read ahead of the one being answered; "
        "beyond them the connection is not read until answers go out.",
    )
    max_connections: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Most open client connections; past it a new one takes the place of the "
        "connection that has waited longest for its client (408), or gets 503 if none waits.",
    )
    trusted_proxies: Annotated[tuple[str, ...], Flag("--trusted-proxy", param="trusted_proxy")] = (
        Field(
            default=(),
            description="Address or network (CIDR) of a proxy in front of the balancer whose "
            "Forwarded and X-Forwarded-* headers are kept and extended (repeatable; "
            "space-separated in the environment); from any other peer they are replaced.",
        )
    )
    backend_header: bool = Field(
        False,
        description="Name the backend that answered in X-TWLB-Backend and in 502/504 errors "
        "(its URL, an internal address: for debugging and tests).",
    )
    # ---- upstream limits: what one backend's answer may weigh (`upstream_limits`)
    upstream_max_head_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=1 << 24,
        description="Largest answer head a backend may send; more fails the try as a bad "
        "upstream (retried elsewhere, counted against its trust).",
    )
    upstream_max_headers: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Most header lines in a backend's answer; more fail the try.",
    )
    upstream_max_body_bytes: int = Field(
        16 << 20,
        ge=0,
        le=1 << 30,
        description="Largest answer body a backend may send (buffered whole for audits); more "
        "fails the try as a bad upstream, never streamed to the client.",
    )
    memory_budget_bytes: int = Field(
        256 << 20,
        ge=1 << 20,
        le=1 << 40,
        description="Bytes of requests and answers the process may hold in flight (bodies "
        "being received, answers being read from backends, answers a client has not read); "
        "what would pass it is refused with 503.",
    )
    health_max_bytes: int = Field(
        4096,
        ge=256,
        le=1 << 20,
        description="Most bytes of a /healthz answer read (head and body each); more fails the check.",
    )
    health_concurrency: int = Field(
        64, ge=1, le=10_000, description="Most health checks in flight at once."
    )
    seed: int = Field(0, ge=0, description="Seed of random choices.")
    model: Annotated[Path | None, Flag(type=ModelChoice())] = Field(
        SHIPPED_MODEL,
        validate_default=True,
        description="Trust model: 'shipped' (ml/models/trust-svm.onnx), 'heuristic', or an "
        "ONNX file (twlb train), re-read when it changes.",
    )
    oracle_truth: Path | None = Field(
        None,
        description="JSON {backend_url: node_class} for --policy oracle (re-read when it changes).",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level."
    )

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

    @field_validator("memory_budget_bytes")
    @classmethod
    def _budget_holds_one_largest_body(cls, value: int, info: ValidationInfo) -> int:
        largest = max(
            info.data.get("max_body_bytes", 0), info.data.get("upstream_max_body_bytes", 0)
        )
        if value < largest:
            raise ValueError(
                f"must hold at least the largest body the balancer admits, {largest} bytes "
                "(max_body_bytes, upstream_max_body_bytes)"
            )
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = value.split()
        out: list[str] = []
        for item in value or ():
            try:
                out.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or network (e.g. 10.0.0.0/8)"
                ) from None
        return tuple(out)

    @property
    def server_limits(self) -> ServerLimits:
        """What one client connection may send or hold (the HTTP server's limits)."""
        return ServerLimits(
            max_body_bytes=self.max_body_bytes,
            max_head_bytes=self.max_head_bytes,
            max_headers=self.max_request_headers,
            head_timeout_s=self.head_timeout_s,
            body_timeout_s=self.body_timeout_s,
            keepalive_timeout_s=self.keepalive_timeout_s,
            keepalive_requests=self.keepalive_requests,
            send_timeout_s=self.send_timeout_s,
            max_pipelined=self.max_pipelined,
            max_connections=self.max_connections,
        )

    @property
    def upstream_limits(self) -> UpstreamLimits:
        """What one backend's answer may weigh (the upstream pools' limits)."""
        return UpstreamLimits(
            max_head_bytes=self.upstream_max_head_bytes,
            max_headers=self.upstream_max_headers,
            max_body_bytes=self.upstream_max_body_bytes,
        )

    @property
    def health_limits(self) -> UpstreamLimits:
        return UpstreamLimits(
            max_head_bytes=self.health_max_bytes,
            max_headers=HEALTH_MAX_HEADERS,
            max_body_bytes=self.health_max_bytes,
        )

    @field_validator("discover_services")
    @classmethod
    def _selector(cls, value: str | None) -> str | None:
        if value:
            try:
                parse_selector(value)
            except DiscoveryError as err:
                raise ValueError(str(err)) from None
        return value or None

    @field_validator("model", mode="before")
    @classmethod
    def _resolve_model(cls, value: Any) -> Path | None:
        return resolve_model(value)

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _oracle_needs_truth(self) -> BalancerSettings:
        if self.policy is PolicyName.ORACLE and self.oracle_truth is None:
            raise ValueError("policy 'oracle' needs oracle_truth (a JSON file of node classes)")
        return self

    @model_validator(mode="after")
    def _one_token_source(self) -> BalancerSettings:
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("admin_token_file and admin_token both given: give one")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> BalancerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        return self

    @field_validator("peers", mode="before")
    @classmethod
    def _peer_urls(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = value.split()
        out: list[str] = []
        for url in value or ():
            try:
                norm = normalize_backend_url(url)
            except BackendURLError as err:
                raise ValueError(str(err).replace("backend URL", "peer URL")) from None
            if norm not in out:
                out.append(norm)
        return tuple(out)

    @field_validator("peer_dns")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if not value:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value

    @property
    def admin_apart(self) -> bool:
        """Whether the own endpoints have a listener of their own (the traffic port then
        proxies every path)."""
        return self.admin_port is not None

    @property
    def shares_evidence(self) -> bool:
        """Whether this balancer has peer replicas to share audit evidence with."""
        return bool(self.peers or self.peer_dns)
