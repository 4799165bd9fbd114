"""Envoy's configuration as TW-LB serves it (sans-IO): the bootstrap and the xDS resources.

Everything Envoy runs with is built here, as typed protobuf messages of the Envoy API
(`xds-protos`), from a `Layout` (addresses and names) and the balancer's settings; the
control plane (`server.py`) serves them over ADS and the runtime and the operator write
the bootstrap. Nothing here reads a clock or touches a socket.

What Envoy gets:

- the **bootstrap** (static): its node, its admin interface on loopback, the control
  plane as a gRPC cluster (`CONTROL_PLANE`: ADS and the access logs)
  and as an HTTP cluster (`CONTROL_PLANE_HTTP`: TW-LB's own `/trust`, `/healthz`,
  `/metrics`, `/admin/*`), a stats listener that shows only `/stats/prometheus` and
  `/ready` of the admin interface, and ADS for listeners, clusters and the `twlb`
  runtime layer;
- over ADS, the **listener** (`LISTENER`): TW-LB's own paths to the control plane, every
  other request to the backends' cluster with the balancer's retries (idempotent methods,
  another host each time, within the retry budget), and a share of GET requests (the
  runtime key `SAMPLE_KEY`) on a route where TW-LB's sampler (`SAMPLER_FILTER`) copies the
  request's head and the answer, as they pass, into the request's metadata, and the
  sample log (`SAMPLE_LOG`, a gRPC access log of the listener) carries them to TW-LB with
  the status and the upstream host, batched on one stream, never holding the request;
  every upstream try is logged to TW-LB (the router's upstream access log);
- the **cluster** of backends (`BACKENDS`, EDS over ADS), balanced by Envoy's policy
  closest to TW-LB's (`LB_POLICY`);
- its **endpoints** (`endpoints`): the backends in rotation with their weights;
- the **runtime layer** (`runtime`): the sampled share of GET requests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Importing each message module registers its types in the descriptor pool, which
# `ParseDict` needs to resolve "@type" names in typed_config fields.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as als_config_pb2  # noqa: F401
from envoy.extensions.filters.http.dynamic_modules.v3 import dynamic_modules_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.runtime.v3 import rtds_pb2
from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

from twlb.spec import ENVOY_POLICIES
from twlb.vocabulary import PolicyName

#: Resource type URLs of the xDS protocol (ADS multiplexes them on one stream).
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RUNTIME_TYPE = "type.googleapis.com/envoy.service.runtime.v3.Runtime"
#: The order a control plane should push them in (make-before-break: a cluster before
#: the listener that routes to it, its endpoints right after it).
TYPE_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, RUNTIME_TYPE)

#: Names Envoy's configuration uses.
LISTENER = "twlb_ingress"
BACKENDS = "twlb_backends"
CONTROL_PLANE = "twlb_control_plane"
CONTROL_PLANE_HTTP = "twlb_control_plane_http"
ENVOY_ADMIN = "envoy_admin"
RUNTIME_LAYER = "twlb"
#: The runtime key holding the share of GET requests sampled for audits (per million).
SAMPLE_KEY = "twlb.audit.sample"
#: The runtime key holding the share of upstream tries Envoy logs to TW-LB.
LOG_SAMPLE_KEY = "twlb.log.sample"
#: The answer sampler: an HTTP filter from TW-LB's Envoy module (sampler.c, built and
#: found as dataplane/process.py says), on the sampled route only.
SAMPLER_FILTER = "twlb.sampler"
#: The module's name: Envoy loads `lib<name>.so` from the folder its environment's
#: ENVOY_DYNAMIC_MODULES_SEARCH_PATH names.
SAMPLER_MODULE = "twlb_sampler"
#: The access log that carries sampled answers to TW-LB (a gRPC access log of the traffic
#: listener: one long-lived stream, entries batched), and how often Envoy flushes it.
SAMPLE_LOG = "twlb_samples"
SAMPLE_FLUSH_S = 0.02
#: The request metadata namespace the sampler writes, and its two keys: the request's
#: head and the answer's body, each base64 (metadata strings must be UTF-8).
SAMPLE_NS = "twlb"
SAMPLE_HEAD, SAMPLE_ANSWER = "head", "answer"
#: Most bytes of one sampled answer sent to TW-LB (larger answers are not audited).
MAX_SAMPLED_BODY = 1 << 20
#: The gRPC metadata entry in which Envoy shows the control plane its token, on every
#: stream (ADS, the access logs): without it anyone who reaches the gRPC port
#: could read the configuration or feed made-up tries and answers to the trust engine.
XDS_TOKEN_HEADER = "x-twlb-xds-token"
#: What a token may hold (it travels as a gRPC metadata value).
XDS_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/=")
#: TW-LB's own paths, routed to the control plane (as the Python balancer answers them).
OWN_PATHS = ("/healthz", "/metrics", "/trust")
ADMIN_PREFIX = "/admin/"
#: Methods whose requests Envoy may send again (as the Python balancer's retries).
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")

#: Envoy's load-balancing policy for each TW-LB policy it can carry out. Trust: the trust
#: weights (slow-start ramps included) as endpoint weights, and Envoy's weighted least
#: request standing in for the Python policy's latency weighting (both favour the host
#: with fewer requests in flight).
LB_POLICY: Mapping[PolicyName, str] = {
    PolicyName.TRUST: "LEAST_REQUEST",
    PolicyName.ROUND_ROBIN: "ROUND_ROBIN",
    PolicyName.WEIGHTED_ROUND_ROBIN: "ROUND_ROBIN",
    PolicyName.RANDOM: "RANDOM",
    PolicyName.LEAST_CONNECTIONS: "LEAST_REQUEST",
    PolicyName.P2C_EWMA: "LEAST_REQUEST",
    PolicyName.OUTLIER_EJECTION: "ROUND_ROBIN",
}
assert set(LB_POLICY) == ENVOY_POLICIES, "twlb/spec.py's ENVOY_POLICIES lists these policies"
#: Endpoint weight of a trust weight of 1 (Envoy's weights are integers from 1).
WEIGHT_SCALE = 1000
MILLION = 1_000_000


class EnvoyConfigError(ValueError):
    """Settings Envoy cannot be configured with (the message names which)."""


@dataclass(frozen=True)
class Address:
    """A host and port (a name is resolved by Envoy for static clusters)."""

    host: str
    port: int

    def socket(self) -> dict[str, Any]:
        return {"socket_address": {"address": self.host, "port_value": self.port}}


@dataclass(frozen=True)
class Layout:
    """Where everything listens, and the data plane's routing settings."""

    listener: Address  # Envoy's traffic listener
    admin: Address  # Envoy's admin interface (keep it on loopback)
    xds: Address  # the control plane's gRPC port: ADS and the access logs
    api: Address  # the control plane's HTTP API (/trust, /healthz, /metrics, /admin/*)
    stats: Address | None = None  # a listener showing /stats/prometheus and /ready only
    node_id: str = "twlb-envoy"
    cluster: str = "twlb"
    policy: PolicyName = PolicyName.TRUST
    try_timeout_s: float = 1.0
    max_tries: int = 3
    retry_budget: float = 0.2
    connect_timeout_s: float = 0.25
    #: Share of GET requests sent to TW-LB for audits when the runtime layer does not say
    #: (before the first push of the runtime layer).
    sample: float = 0.05
    #: How often Envoy flushes the upstream access logs to TW-LB.
    log_flush_s: float = 0.1
    #: The token Envoy shows the control plane (XDS_TOKEN_HEADER); None: none shown.
    xds_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.policy not in LB_POLICY:
            carried = ", ".join(p.value for p in LB_POLICY)
            raise EnvoyConfigError(
                f"policy {self.policy.value!r} has no Envoy counterpart; an Envoy data plane "
                f"carries out {carried}"
            )
        if not 0.0 <= self.sample <= 1.0:
            raise EnvoyConfigError(f"sample must be in [0, 1], got {self.sample}")
        if self.xds_token is not None:
            check_xds_token(self.xds_token)


def check_xds_token(token: str) -> str:
    """`token` if it can be the control plane's token (EnvoyConfigError naming why not)."""
    if len(token) < 16:
        raise EnvoyConfigError(f"the xDS token must be at least 16 characters, got {len(token)}")
    if not set(token) <= XDS_TOKEN_CHARS:
        raise EnvoyConfigError(
            "the xDS token may hold only letters, digits and - _ . ~ + / = "
            "(it travels as a gRPC metadata value)"
        )
    return token


def _duration(seconds: float) -> str:
    return f"{seconds:.6f}s"


def _message(kind: type[Message], doc: Mapping[str, Any]) -> Message:
    """A typed message from its JSON form; an unknown field or type is an error here, not
    a NACK from Envoy later."""
    return json_format.ParseDict(doc, kind())


#: How soon Envoy opens its ADS stream again after losing the control plane: at most this
#: long after a restarted control plane is back (Envoy's default backs off to 30 s).
ADS_RETRY_BASE_S, ADS_RETRY_MAX_S = 0.25, 1.0


def _grpc(cluster: str, token: str | None, timeout_s: float | None = None) -> dict[str, Any]:
    service: dict[str, Any] = {"envoy_grpc": {"cluster_name": cluster}}
    if token is not None:
        service["initial_metadata"] = [{"key": XDS_TOKEN_HEADER, "value": token}]
    if timeout_s is not None:
        service["timeout"] = _duration(timeout_s)
    return service


#: Circuit breakers high enough never to refuse a sample or a log stream to TW-LB (the
#: defaults, 1,024 requests in flight, would drop samples at a high share).
_OPEN_BREAKERS = {
    "thresholds": [
        {
            "priority": "DEFAULT",
            "max_connections": 100_000,
            "max_pending_requests": 100_000,
            "max_requests": 100_000,
        }
    ]
}


def _static_cluster(name: str, at: Address, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if _is_ip(at.host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "circuit_breakers": _OPEN_BREAKERS,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": at.socket()}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _is_ip(host: str) -> bool:
    parts = host.split(".")
    if len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts):
        return True
    return ":" in host  # an IPv6 literal


def _ads_service(token: str | None) -> dict[str, Any]:
    """The control plane as Envoy's ADS server, reconnected to within ADS_RETRY_MAX_S."""
    service = _grpc(CONTROL_PLANE, token)
    service["envoy_grpc"]["retry_policy"] = {
        "retry_back_off": {
            "base_interval": _duration(ADS_RETRY_BASE_S),
            "max_interval": _duration(ADS_RETRY_MAX_S),
        }
    }
    return service


def _ads() -> dict[str, Any]:
    return {"ads": {}, "resource_api_version": "V3"}


def bootstrap(layout: Layout) -> bootstrap_pb2.Bootstrap:
    """Envoy's bootstrap: what it needs to reach TW-LB and take the rest over ADS."""
    static_listeners = []
    clusters = [
        _static_cluster(CONTROL_PLANE, layout.xds, http2=True),
        _static_cluster(CONTROL_PLANE_HTTP, layout.api),
    ]
    if layout.stats is not None:
        clusters.append(_static_cluster(ENVOY_ADMIN, layout.admin))
        static_listeners.append(_stats_listener(layout.stats))
    doc = {
        "node": {"id": layout.node_id, "cluster": layout.cluster},
        "admin": {"address": layout.admin.socket()},
        "static_resources": {"clusters": clusters, "listeners": static_listeners},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [_ads_service(layout.xds_token)],
                "set_node_on_first_message_only": True,
            },
            "lds_config": _ads(),
            "cds_config": _ads(),
        },
        "layered_runtime": {
            "layers": [
                {
                    "name": RUNTIME_LAYER,
                    "rtds_layer": {"name": RUNTIME_LAYER, "rtds_config": _ads()},
                }
            ]
        },
    }
    return _message(bootstrap_pb2.Bootstrap, doc)


def bootstrap_json(layout: Layout) -> str:
    """The bootstrap as the JSON file Envoy reads (`envoy -c FILE`)."""
    return json_format.MessageToJson(bootstrap(layout), indent=1)


def _hcm(
    stat_prefix: str,
    routes: list[dict[str, Any]],
    filters: list[dict[str, Any]],
    access_log: list[dict[str, Any]] | None = None,
) -> dict:
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [{"name": stat_prefix, "domains": ["*"], "routes": routes}],
            },
            "http_filters": filters,
        },
    }
    if access_log:
        hcm["typed_config"]["access_log"] = access_log
    return hcm


_ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _stats_listener(at: Address) -> dict[str, Any]:
    """A listener that shows two read-only pages of the admin interface: the metrics
    Prometheus scrapes and readiness (the admin interface itself can stop Envoy)."""
    routes = [
        {"match": {"path": path}, "route": {"cluster": ENVOY_ADMIN}}
        for path in ("/stats/prometheus", "/ready")
    ]
    return {
        "name": "twlb_stats",
        "address": at.socket(),
        "filter_chains": [{"filters": [_hcm("stats", routes, [_ROUTER])]}],
    }


#: Every route but the sampled one: the sampler off.
_NO_SAMPLER = {
    SAMPLER_FILTER: {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "disabled": True,
    }
}


def _methods(methods: Iterable[str]) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"safe_regex": {"regex": "|".join(methods)}}}


def _grpc_log(name: str, layout: Layout, flush_s: float, only: dict[str, Any]) -> dict[str, Any]:
    """An access log Envoy streams to the control plane as `name` (entries batched, sent
    every `flush_s`), of the requests the filter `only` lets through."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": only,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
            "HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": name,
                "grpc_service": _grpc(CONTROL_PLANE, layout.xds_token),
                "transport_api_version": "V3",
                "buffer_flush_interval": _duration(flush_s),
                "buffer_size_bytes": 65536,
            },
        },
    }


def listener(layout: Layout) -> listener_pb2.Listener:
    """The traffic listener: TW-LB's own paths to the control plane, the rest to the
    backends, a sampled share of GET requests' answers logged to TW-LB."""
    tries = max(1, layout.max_tries)
    backend_route: dict[str, Any] = {
        "cluster": BACKENDS,
        "timeout": _duration(layout.try_timeout_s * tries),
    }
    retrying = dict(backend_route)
    if tries > 1:
        retrying["retry_policy"] = {
            # 5xx: a 5xx answer, a reset, a refused or failed connection, a per-try timeout
            "retry_on": "5xx",
            "num_retries": tries - 1,
            "per_try_timeout": _duration(layout.try_timeout_s),
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.host."
                        "previous_hosts.v3.PreviousHostsPredicate"
                    },
                }
            ],
            "host_selection_retry_max_attempts": 5,
        }
    own = [
        {
            "match": {"path": path},
            "route": {"cluster": CONTROL_PLANE_HTTP, "timeout": "10s"},
            "typed_per_filter_config": _NO_SAMPLER,
        }
        for path in OWN_PATHS
    ]
    own.append(
        {
            "match": {"prefix": ADMIN_PREFIX},
            "route": {"cluster": CONTROL_PLANE_HTTP, "timeout": "10s"},
            "typed_per_filter_config": _NO_SAMPLER,
        }
    )
    sampled = {
        "match": {
            "prefix": "/",
            "headers": [_methods(["GET"])],
            "runtime_fraction": {
                "default_value": {
                    "numerator": round(layout.sample * MILLION),
                    "denominator": "MILLION",
                },
                "runtime_key": SAMPLE_KEY,
            },
        },
        "route": retrying,
    }
    idempotent = {
        "match": {"prefix": "/", "headers": [_methods(IDEMPOTENT_METHODS)]},
        "route": retrying,
        "typed_per_filter_config": _NO_SAMPLER,
    }
    other = {
        "match": {"prefix": "/"},
        "route": backend_route,
        "typed_per_filter_config": _NO_SAMPLER,
    }
    # Every try while a backend gets few; a share once it gets more (the control plane
    # sets the share through the runtime layer, so its cost is bounded at any rate).
    upstream_log = _grpc_log(
        "twlb_upstream",
        layout,
        layout.log_flush_s,
        {
            "runtime_filter": {
                "runtime_key": LOG_SAMPLE_KEY,
                "percent_sampled": {"numerator": MILLION, "denominator": "MILLION"},
                "use_independent_randomness": True,
            }
        },
    )
    # The sampled answers: TW-LB's sampler on the sampled route copies the head and the
    # answer into the request's metadata as they pass (Envoy never waits for TW-LB, so a
    # control plane that is down loses samples, never requests); the listener's access
    # log sends the requests that have an answer copied, with their status and upstream
    # host, batched on one gRPC stream (one stream per sample cost both sides ten times
    # as much CPU: DESIGN.md). The sampler writes the head (every header as `name NUL
    # value`, one a line) and the answer's body, each base64, as the keys SAMPLE_HEAD and
    # SAMPLE_ANSWER of the namespace SAMPLE_NS; an answer over MAX_SAMPLED_BODY (its
    # configuration) is not kept, so the sample log skips it.
    sampler = {
        "name": SAMPLER_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
            "DynamicModuleFilter",
            "dynamic_module_config": {"name": SAMPLER_MODULE, "do_not_close": True},
            "filter_name": "sampler",
            "filter_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": str(MAX_SAMPLED_BODY),
            },
        },
    }
    sample_log = _grpc_log(
        SAMPLE_LOG,
        layout,
        SAMPLE_FLUSH_S,
        {
            "metadata_filter": {
                "matcher": {
                    "filter": SAMPLE_NS,
                    "path": [{"key": SAMPLE_ANSWER}],
                    "value": {"present_match": True},
                },
                "match_if_key_not_found": False,
            }
        },
    )
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "upstream_log": [upstream_log],
        },
    }
    doc = {
        "name": LISTENER,
        "address": layout.listener.socket(),
        "filter_chains": [
            {
                "filters": [
                    _hcm(
                        "ingress",
                        [*own, sampled, idempotent, other],
                        [sampler, router],
                        access_log=[sample_log],
                    )
                ]
            }
        ],
    }
    return _message(listener_pb2.Listener, doc)


def cluster(layout: Layout) -> cluster_pb2.Cluster:
    """The backends' cluster: endpoints over ADS, Envoy's counterpart of the policy, the
    retry budget, and for `outlier-ejection` Envoy's own outlier detection."""
    doc: dict[str, Any] = {
        "name": BACKENDS,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": _ads()},
        "connect_timeout": _duration(layout.connect_timeout_s),
        "lb_policy": LB_POLICY[layout.policy],
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": 100_000,
                    "max_pending_requests": 100_000,
                    "max_requests": 100_000,
                    "retry_budget": {
                        "budget_percent": {"value": 100.0 * layout.retry_budget},
                        "min_retry_concurrency": 3,
                    },
                }
            ]
        },
        # A host that is removed is not kept for its connections' sake.
        "ignore_health_on_host_removal": True,
    }
    if layout.policy is PolicyName.OUTLIER_EJECTION:
        doc["outlier_detection"] = plain_outlier_detection()
    return _message(cluster_pb2.Cluster, doc)


def plain_outlier_detection() -> dict[str, Any]:
    """Envoy's own outlier detection as a plain Envoy runs it (its defaults: five
    consecutive 5xx, success-rate ejection, 30 s base ejection, at most 10% ejected),
    with the interval at 1 s so that it reacts within the runs TW-LB is compared in."""
    return {"consecutive_5xx": 5, "interval": "1s", "base_ejection_time": "30s"}


@dataclass(frozen=True)
class Endpoint:
    """One backend in rotation: where Envoy reaches it and its weight."""

    host: str
    port: int
    weight: int

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise EnvoyConfigError(f"endpoint weight must be at least 1, got {self.weight}")


def endpoint_weight(weight: float, floor: float = 0.01) -> int:
    """An Envoy endpoint weight (an integer from 1) for a trust weight in [0, 1], kept at
    the policy's minimum trickle `floor` as the Python policy keeps it."""
    return max(1, round(max(floor, min(1.0, weight)) * WEIGHT_SCALE))


def endpoints(items: Iterable[Endpoint]) -> endpoint_pb2.ClusterLoadAssignment:
    """The backends' ClusterLoadAssignment: one locality, every endpoint with its weight."""
    lb = [
        {
            "endpoint": {"address": Address(e.host, e.port).socket()},
            "load_balancing_weight": e.weight,
        }
        for e in items
    ]
    doc: dict[str, Any] = {
        "cluster_name": BACKENDS,
        "endpoints": [{"lb_endpoints": lb}] if lb else [],
    }
    return _message(endpoint_pb2.ClusterLoadAssignment, doc)


def runtime(sample: float, log_sample: float = 1.0) -> rtds_pb2.Runtime:
    """The `twlb` runtime layer: the share of GET requests sampled for audits, and the
    share of upstream tries logged."""
    for key, share in ((SAMPLE_KEY, sample), (LOG_SAMPLE_KEY, log_sample)):
        if not 0.0 <= share <= 1.0:
            raise EnvoyConfigError(f"{key} must be in [0, 1], got {share}")
    layer = {
        # A route's runtime fraction reads a FractionalPercent in struct form (a plain
        # number there would be a percentage); an access log's runtime filter reads a
        # plain number, the numerator over its default's denominator (a million).
        SAMPLE_KEY: {"numerator": round(sample * MILLION), "denominator": "MILLION"},
        LOG_SAMPLE_KEY: round(log_sample * MILLION),
    }
    doc = {"name": RUNTIME_LAYER, "layer": layer}
    return _message(rtds_pb2.Runtime, doc)


def packed(message: Message) -> AnyProto:
    out = AnyProto()
    out.Pack(message)
    return out


def resource_name(message: Message) -> str:
    """The name a resource is requested by (a ClusterLoadAssignment's is its cluster's)."""
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return message.cluster_name
    return message.name  # type: ignore[attr-defined]


def plain_bootstrap(
    listen: Address, admin: Address, backends: Iterable[tuple[str, int]], try_timeout_s: float = 1.0
) -> bootstrap_pb2.Bootstrap:
    """A plain Envoy with no control plane, as a team runs it: a static cluster of the
    backends, round robin, Envoy's own outlier detection, retries of 5xx on another host.
    What trust-steered Envoy is compared with."""
    lb = [{"endpoint": {"address": Address(h, p).socket()}} for h, p in backends]
    route = {
        "cluster": BACKENDS,
        "timeout": _duration(try_timeout_s * 3),
        "retry_policy": {
            "retry_on": "5xx",
            "num_retries": 2,
            "per_try_timeout": _duration(try_timeout_s),
        },
    }
    doc = {
        "node": {"id": "plain-envoy", "cluster": "plain"},
        "admin": {"address": admin.socket()},
        "static_resources": {
            "listeners": [
                {
                    "name": LISTENER,
                    "address": listen.socket(),
                    "filter_chains": [
                        {
                            "filters": [
                                _hcm(
                                    "ingress",
                                    [{"match": {"prefix": "/"}, "route": route}],
                                    [_ROUTER],
                                )
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": BACKENDS,
                    "type": "STATIC",
                    "connect_timeout": "0.25s",
                    "lb_policy": "ROUND_ROBIN",
                    "outlier_detection": plain_outlier_detection(),
                    "load_assignment": {
                        "cluster_name": BACKENDS,
                        "endpoints": [{"lb_endpoints": lb}],
                    },
                }
            ],
        },
    }
    return _message(bootstrap_pb2.Bootstrap, doc)


def static_bootstrap(
    layout: Layout, backends: Iterable[Endpoint], log_sample: float = 1.0
) -> bootstrap_pb2.Bootstrap:
    """The data plane TW-LB serves, made static, for Envoy alone (its own checks, tests
    and benchmarks of what Envoy does without a control plane): the listener, the cluster
    with `backends` as its endpoints, and the runtime layer (`layout.sample` sampled, a
    `log_sample` share of tries logged) as a static layer. The access logs still go to
    `layout.xds`."""
    static = bootstrap_pb2.Bootstrap()
    static.CopyFrom(bootstrap(layout))
    static.static_resources.listeners.append(listener(layout))
    backend_cluster = cluster(layout)
    backend_cluster.type = cluster_pb2.Cluster.STATIC
    backend_cluster.ClearField("eds_cluster_config")
    backend_cluster.load_assignment.CopyFrom(endpoints(backends))
    static.static_resources.clusters.append(backend_cluster)
    static.ClearField("dynamic_resources")
    static.layered_runtime.Clear()
    layer = static.layered_runtime.layers.add(name=RUNTIME_LAYER)
    layer.static_layer.CopyFrom(runtime(layout.sample, log_sample).layer)
    return static
