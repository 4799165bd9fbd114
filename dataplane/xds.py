"""The xDS protocol's state-of-the-world variant over one ADS stream (sans-IO).

A `Snapshot` holds the resources of each type at a version; an `AdsStream` is one Envoy's
stream: it takes the DiscoveryRequests Envoy sends and the snapshots the control plane
publishes, and returns the DiscoveryResponses to send. The rules it keeps (Envoy's xDS
protocol, state of the world):

- A request whose `response_nonce` is not the nonce of the last response of its type is
  stale (Envoy had not seen that response yet) and changes nothing.
- A request naming the last nonce with that response's `version_info` is an ACK; with
  the previous version and an `error_detail`, a NACK: the version is refused and not sent
  again (the next snapshot of that type is), and the refusal is kept for `status`.
- A first request of a type, or one that changes the resource names asked for, is
  answered with the snapshot's resources of that type at once; otherwise a type is sent
  again only when the snapshot's version of it changes.
- Listeners and clusters are sent whole (wildcard); endpoints and runtime layers only the
  names asked for, and only once asked for.

Versions are the control plane's, prefixed with a token of its process (`Snapshot.boot`),
so Envoy's versions from before a restart never pass for this one's. Nonces count per
stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf.any_pb2 import Any as AnyProto
from twlb.envoy.resources import LISTENER_TYPE, TYPE_ORDER

#: Types Envoy asks for as a whole (an empty name list means all of them).
WILDCARD_TYPES = frozenset({LISTENER_TYPE, "type.googleapis.com/envoy.config.cluster.v3.Cluster"})


@dataclass(frozen=True)
class TypeSnapshot:
    """The resources of one type at one version, by name."""

    version: str
    resources: Mapping[str, AnyProto]


@dataclass
class Snapshot:
    """Every type's resources; `set` bumps a type's version only when its resources
    change, so an unchanged push is not sent."""

    boot: str
    types: dict[str, TypeSnapshot] = field(default_factory=dict)
    _counter: int = 0

    def set(self, type_url: str, resources: Mapping[str, AnyProto]) -> bool:
        """Put `resources` in force for `type_url`; True when that changed anything."""
        old = self.types.get(type_url)
        if old is not None and _same(old.resources, resources):
            return False
        self._counter += 1
        self.types[type_url] = TypeSnapshot(f"{self.boot}-{self._counter}", dict(resources))
        return True

    def version(self, type_url: str) -> str | None:
        t = self.types.get(type_url)
        return None if t is None else t.version


def _same(a: Mapping[str, AnyProto], b: Mapping[str, AnyProto]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].type_url == b[k].type_url and a[k].value == b[k].value for k in a
    )


@dataclass
class _Subscription:
    names: frozenset[str] = frozenset()
    sent_version: str | None = None  # the version of the last response sent
    nonce: str | None = None  # that response's nonce
    acked: str | None = None  # the last version Envoy accepted
    refused: str | None = None  # the last version Envoy refused
    error: str | None = None  # why


class AdsStream:
    """One Envoy's ADS stream: requests and snapshots in, responses out."""

    def __init__(self) -> None:
        self.node_id: str | None = None
        self._subs: dict[str, _Subscription] = {}
        self._nonce = 0

    def on_request(self, request: DiscoveryRequest, snapshot: Snapshot) -> list[DiscoveryResponse]:
        """Envoy's request: what to answer (nothing for an ACK, a NACK or a stale one)."""
        if request.HasField("node") and request.node.id:
            self.node_id = request.node.id
        type_url = request.type_url
        sub = self._subs.get(type_url)
        if sub is None:
            sub = self._subs[type_url] = _Subscription()
        elif request.response_nonce and request.response_nonce != sub.nonce:
            return []  # stale: answers a response Envoy has since been sent a newer one of
        names = frozenset(request.resource_names)
        renamed = names != sub.names
        sub.names = names
        if request.response_nonce and request.response_nonce == sub.nonce:
            if request.HasField("error_detail"):
                sub.refused, sub.error = sub.sent_version, request.error_detail.message
            else:
                sub.acked, sub.error = request.version_info, None
            if not renamed:
                return self._due([type_url], snapshot)
        return self._send(type_url, snapshot)

    def on_snapshot(self, snapshot: Snapshot) -> list[DiscoveryResponse]:
        """A new snapshot: the responses for every subscribed type whose version moved."""
        return self._due(TYPE_ORDER, snapshot)

    def _due(self, type_urls: Iterable[str], snapshot: Snapshot) -> list[DiscoveryResponse]:
        out: list[DiscoveryResponse] = []
        for type_url in type_urls:
            sub = self._subs.get(type_url)
            version = snapshot.version(type_url)
            if sub is None or version is None or version == sub.sent_version:
                continue
            if version == sub.refused:
                continue
            out += self._send(type_url, snapshot)
        return out

    def _send(self, type_url: str, snapshot: Snapshot) -> list[DiscoveryResponse]:
        current = snapshot.types.get(type_url)
        if current is None:
            return []  # nothing of this type yet: answered once the snapshot has it
        sub = self._subs[type_url]
        if type_url in WILDCARD_TYPES or not sub.names:
            chosen = list(current.resources.values())
            if type_url not in WILDCARD_TYPES:
                chosen = []  # endpoints and runtime layers only by name
        else:
            chosen = [current.resources[n] for n in sorted(sub.names) if n in current.resources]
        self._nonce += 1
        sub.sent_version, sub.nonce = current.version, str(self._nonce)
        return [
            DiscoveryResponse(
                version_info=current.version,
                resources=chosen,
                type_url=type_url,
                nonce=sub.nonce,
            )
        ]

    def status(self) -> dict[str, dict[str, str | None]]:
        """Per type: the version sent, the version Envoy accepted, and a refusal."""
        return {
            t: {"sent": s.sent_version, "acked": s.acked, "refused": s.refused, "error": s.error}
            for t, s in self._subs.items()
        }
