"""TW-LB as Envoy's control plane (IO shell): ADS and the access logs on one gRPC port,
TW-LB's own HTTP API on another, a `Balancer` deciding behind them.

The `Balancer` (services/balancer/core.py) is the one the Python proxy runs, with its
health checks, gossip polls and trust ticks (`Balancer.start`), but it proxies nothing:

- **Endpoints from verdicts.** `ControlPlane.refresh` turns the balancer's rotation into
  Envoy's endpoints: the backends health keeps in rotation that the trust engine admits,
  each weighted by the trust policy's static weight (trust weight times slow-start ramp,
  `TrustWeighted.static_weights`), or equal weights for policies that do not route on
  trust. `_watch` calls it whenever the rotation or the admitted weights are new objects
  (each change builds new ones; checked every `WATCH_S`) and while a ramp runs, so a
  verdict reaches Envoy (EDS, over ADS) within one check and one push.
- **Every try Envoy sends** is logged by Envoy's router to `StreamAccessLogs`
  (`_observe_entry`), outcome and latency, and feeds the balancer's windows, health and
  counters as its own tries would (`Balancer.observe_try`): trust is scored on Envoy's
  traffic.
- **Audits on Envoy's traffic.** A share of GET requests is routed where TW-LB's
  sampler (sampler.c, a module Envoy loads) copies the request's head and the answer into
  the request's metadata, and the sample log brings them to TW-LB with the status and
  the upstream host, batched on one stream; Envoy never waits. `observe_samples` draws
  each answer at the backend's audit fraction over the share shown (`Auditor.draw`) and
  hands a drawn one, decoded only then, to `Balancer.start_audit`, which re-asks other
  backends and judges by the same evidence rules. The share shown is the largest audit
  fraction any backend needs now (a suspect's is 1), pushed to Envoy as
  the runtime layer `twlb` (RTDS) when it changes.
- **Static stability.** Envoy keeps the last endpoints while the control plane is away.
  The evidence is written to `evidence_file` as it changes and read back at start
  (`Balancer.import_evidence`), so a restarted control plane keeps proven liars out; it
  answers Envoy only after one health interval, once its checks have seen the fleet.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from twlb.balancer.core import Balancer
from twlb.balancer.upstream import REQUEST_DROPPED, UpstreamResponse
from twlb.envoy import resources as res
from twlb.envoy.xds import AdsStream, Snapshot

from twlb.outcome import CONNECT_ERROR, ERROR, SUCCESS, TIMEOUT, Outcome
from twlb.vocabulary import PolicyName

log = logging.getLogger("twlb.envoy")

#: Envoy's logged request method (`RequestMethod`) by name, for the methods it can log.
METHOD_NAME: dict[int, str] = {
    number: name for name, number in base_pb2.RequestMethod.items() if number
}

#: Seconds between checks of the balancer's rotation for a change to push.
WATCH_S = 0.02
#: Seconds between pushes of changed weights while slow-start ramps run.
RAMP_PUSH_S = 0.25
#: Seconds between writes of the evidence file while nothing is proven anew.
EVIDENCE_WRITE_S = 1.0
#: Upstream tries a second per backend Envoy logs to TW-LB (the top of the request rates
#: the shipped model was trained on is 43 a second per node); above it Envoy logs a share.
LOG_TARGET_PER_S = 50.0
#: Seconds over which the logged rate is measured before the share is set again.
LOG_RATE_S = 1.0
#: Logged tries of one backend within a window that set the share at once, before the
#: window ends (a surge: from idle, every try is logged until then).
LOG_SURGE = 2 * LOG_TARGET_PER_S * LOG_RATE_S
#: The smallest share of tries logged (at 1%, 5,000 tries a second per backend give 50).
MIN_LOG_SAMPLE = 0.01


@dataclass(frozen=True)
class Target:
    """Where Envoy reaches one backend, resolved from its URL."""

    host: str
    port: int

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"


def resolve(url: str) -> Target:
    """The address Envoy connects to for a backend URL (a name resolved to its first IPv4
    address: Envoy's endpoints are addresses)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return Target(host, int(port))
    except OSError:
        pass
    infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
    return Target(infos[0][4][0], int(port))


def outcome_of(entry: Any) -> tuple[Outcome, float]:
    """One upstream try as Envoy logged it: how it ended and how long it took (from its
    first byte sent to its last byte received; an unset time reads as zero)."""
    props = entry.common_properties
    first = props.time_to_first_upstream_tx_byte
    last = props.time_to_last_upstream_rx_byte
    latency = last.seconds + last.nanos * 1e-9 - first.seconds - first.nanos * 1e-9
    code = entry.response.response_code.value
    flags = props.response_flags
    if flags.ByteSize():  # any flag set (rare): which one
        if flags.upstream_request_timeout:
            return TIMEOUT, max(0.0, latency)
        if (
            flags.upstream_connection_failure
            or flags.upstream_remote_reset
            or flags.upstream_connection_termination
        ):
            return CONNECT_ERROR, max(0.0, latency)
    if code == 0:
        return CONNECT_ERROR, max(0.0, latency)
    return (ERROR if code >= 500 else SUCCESS), max(0.0, latency)


class ControlPlane:
    """A `Balancer` steering Envoy: ADS and access logs over gRPC."""

    def __init__(
        self,
        balancer: Balancer,
        layout: res.Layout,
        evidence_file: Path | None = None,
        warmup_s: float | None = None,
    ) -> None:
        self.balancer = balancer
        self.layout = layout
        self.policy = balancer.settings.policy
        self.evidence_file = evidence_file
        self.snapshot = Snapshot(boot=secrets.token_hex(3))
        self.streams: dict[AdsStream, asyncio.Queue[Any]] = {}
        self.targets: dict[str, Target] = {}  # backend URL -> address
        self.backend_at: dict[str, str] = {}  # "ip:port" -> backend URL
        self.sample = layout.sample if balancer.settings.audit_fraction else 0.0
        s = balancer.settings
        #: Envoy is answered once the health checks have had one round (a restarted
        #: control plane must not push a fleet it has not looked at).
        self.warmup_s = s.health_interval_s + s.health_timeout_s if warmup_s is None else warmup_s
        self.ready = asyncio.Event()
        self.pushes: list[dict[str, Any]] = []  # the last pushes of endpoints, for /xds
        self.sampled = 0  # sampled answers Envoy logged
        self.audited = 0  # of which audits started
        self.logged = 0  # upstream tries logged
        self.refused = 0  # gRPC calls refused for want of the token
        self.log_sample = 1.0  # the share of upstream tries Envoy logs
        self._log_counts: dict[str, int] = {}
        self._log_busiest = 0  # the largest of _log_counts, kept as they grow
        self._log_since: float | None = None
        self._log_first: float | None = None  # when the window's first entries came
        self._seen: tuple[Any, ...] = ()
        self._last_ramp_push = 0.0
        self._written_proven: frozenset[str] | None = None
        self._tasks: list[asyncio.Task] = []
        self._server: grpc.aio.Server | None = None

    # ---------------------------------------------------------------- the fleet
    def target(self, url: str) -> Target | None:
        t = self.targets.get(url)
        if t is None:
            try:
                t = resolve(url)
            except (OSError, ValueError) as err:
                log.warning("backend %s has no address Envoy can use: %s", url, err)
                return None
            self.targets[url] = t
            self.backend_at[t.key] = url
        return t

    def weights(self, now: float) -> dict[str, float]:
        """The backends Envoy should route to now, with their weights in [0, 1]."""
        b = self.balancer
        up = b.fleet.up
        if self.policy is PolicyName.TRUST:
            static = b.policy.static_weights(now)  # type: ignore[attr-defined]
            return {u: static[u] for u in up if u in static}
        return dict.fromkeys(up, 1.0)

    def endpoints(self, now: float) -> list[res.Endpoint]:
        out = []
        for url, w in self.weights(now).items():
            t = self.target(url)
            if t is not None:
                out.append(res.Endpoint(t.host, t.port, res.endpoint_weight(w)))
        return out

    def wanted_sample(self) -> float:
        """The share of GET requests Envoy should show TW-LB: the largest audit fraction
        any backend in rotation needs now (a suspect's, one in probation's)."""
        b = self.balancer
        if not b.settings.audit_fraction:
            return 0.0
        fraction_of = b.auditor.fraction_of
        return max([b.settings.audit_fraction, *(fraction_of(u) for u in b.fleet.up)])

    def refresh(self, now: float, force: bool = False) -> bool:
        """Put the balancer's current rotation and sample share in the snapshot; push the
        types that changed to every Envoy. True when anything was pushed."""
        eps = self.endpoints(now)
        changed = self.snapshot.set(
            res.ENDPOINT_TYPE, {res.BACKENDS: res.packed(res.endpoints(eps))}
        )
        if changed:
            self.pushes.append(
                {
                    "at": now,
                    "version": self.snapshot.version(res.ENDPOINT_TYPE),
                    "endpoints": {f"{e.host}:{e.port}": e.weight for e in eps},
                }
            )
            del self.pushes[:-50]
        sample = self.wanted_sample()
        if sample != self.sample or force:
            self.sample = sample
        log_sample = self.wanted_log_sample(now)
        if log_sample is not None and (
            (log_sample == 1.0) != (self.log_sample == 1.0)
            or abs(log_sample - self.log_sample) > 0.2 * self.log_sample
        ):
            self.log_sample = log_sample  # changed by more than a fifth: pushed
        layer = res.runtime(self.sample, self.log_sample)
        changed |= self.snapshot.set(res.RUNTIME_TYPE, {res.RUNTIME_LAYER: res.packed(layer)})
        if changed:
            for queue in self.streams.values():
                queue.put_nowait(None)
        return changed

    def _static(self) -> None:
        """The listener and the cluster: built once, from the layout."""
        listener = res.listener(self.layout)
        cluster = res.cluster(self.layout)
        self.snapshot.set(res.LISTENER_TYPE, {res.LISTENER: res.packed(listener)})
        self.snapshot.set(res.CLUSTER_TYPE, {res.BACKENDS: res.packed(cluster)})

    async def _watch(self) -> None:
        """Push whenever the rotation or the weights change (new objects each time), while
        slow-start ramps run (every RAMP_PUSH_S), and when the logged share is due."""
        b = self.balancer
        engine = b.engine
        while True:
            now = b.clock()
            seen = (b.fleet.up, engine.admitted, engine.evidence.suspects.copy())
            due = bool(engine.probation) and now - self._last_ramp_push >= RAMP_PUSH_S
            if due:
                self._last_ramp_push = now
            due |= self._log_due(now)
            old = self._seen
            if (
                due
                or not old
                or seen[0] is not old[0]
                or seen[1] is not old[1]
                or seen[2] != old[2]
            ):
                self._seen = seen
                self.refresh(now)
            self._write_evidence(now)
            await asyncio.sleep(WATCH_S)

    # ---------------------------------------------------------------- evidence
    def load_evidence(self) -> list[str]:
        """Put the evidence file in force (a restart keeps proven liars out)."""
        path = self.evidence_file
        if path is None or not path.exists():
            return []
        try:
            doc = json.loads(path.read_text())
            taken = self.balancer.import_evidence(doc, self.balancer.clock())
        except (OSError, ValueError) as err:
            log.error("evidence file %s not used: %s", path, err)
            return []
        log.warning("evidence of %d backends taken from %s", len(taken), path)
        return taken

    def _write_evidence(self, now: float) -> None:
        path = self.evidence_file
        if path is None:
            return
        engine = self.balancer.engine
        proven = frozenset(u for u in self.balancer.backends if engine.is_proven(u))
        due = getattr(self, "_evidence_due", 0.0)
        if proven == self._written_proven and now < due:
            return
        self._written_proven = proven
        self._evidence_due = now + EVIDENCE_WRITE_S
        doc = self.balancer.export_evidence(now)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
        except OSError as err:
            log.warning("cannot write the evidence file %s: %s", path, err)

    # ---------------------------------------------------------------- what Envoy sends
    def observe_entries(self, entries: Any, now: float) -> None:
        """Envoy's log of upstream tries, fed to the balancer as tries of its own."""
        observe = self.balancer.observe_try
        counts = self._log_counts
        busiest = self._log_busiest
        for entry in entries:
            url = self.backend_of(entry)
            if url is None:
                continue  # TW-LB's own paths, or a backend removed since
            outcome, latency = outcome_of(entry)
            observe(url, outcome, latency, now)
            n = counts[url] = counts.get(url, 0) + 1
            if n > busiest:
                busiest = n
        self._log_busiest = busiest
        self.logged += len(entries)
        if self._log_first is None and counts:
            self._log_first = now

    def backend_of(self, entry: Any) -> str | None:
        """The backend that answered a logged request (None: TW-LB's own paths, or a
        backend removed since)."""
        addr = entry.common_properties.upstream_remote_address.socket_address
        return self.backend_at.get(f"{addr.address}:{addr.port_value}")

    def _log_due(self, now: float) -> bool:
        """Whether the logged rate is to be measured now: the window is over, one backend
        has LOG_SURGE tries logged, or no window has started."""
        since = self._log_since
        return since is None or now - since >= LOG_RATE_S or self._log_busiest >= LOG_SURGE

    def wanted_log_sample(self, now: float) -> float | None:
        """The share of tries Envoy should log so that the busiest backend's are about
        LOG_TARGET_PER_S a second (every try below that); None until a rate is measured.

        The rate is measured over LOG_RATE_S, or sooner once one backend has LOG_SURGE
        tries logged (traffic that jumps from idle is thinned within a flush or two, not
        logged whole for a window). It is measured from the window's start or, if later,
        from one flush before its first entries came (Envoy holds tries up to a flush)."""
        since = self._log_since
        if since is None:
            self._log_since = now
            return None
        if not self._log_due(now):
            return None
        start = since
        if self._log_first is not None:
            start = max(since, self._log_first - self.layout.log_flush_s)
        elapsed = max(now - start, self.layout.log_flush_s)
        busiest = self._log_busiest / elapsed / self.log_sample
        self._log_counts.clear()
        self._log_busiest = 0
        self._log_since = now
        self._log_first = None
        if busiest <= LOG_TARGET_PER_S:
            return 1.0
        return max(MIN_LOG_SAMPLE, LOG_TARGET_PER_S / busiest)

    def observe_samples(self, entries: Any) -> None:
        """Envoy's sample log: each entry a sampled request whose head and answer TW-LB's
        sampler copied into its metadata; each is drawn for an audit and, if drawn, read
        and handed to the auditor."""
        for entry in entries:
            self._observed_answer(entry)

    def _observed_answer(self, entry: Any) -> bool:
        fields = entry.common_properties.metadata.filter_metadata[res.SAMPLE_NS].fields
        head, answer = fields.get(res.SAMPLE_HEAD), fields.get(res.SAMPLE_ANSWER)
        status = entry.response.response_code.value
        url = self.backend_of(entry)
        method = METHOD_NAME.get(entry.request.request_method)
        target = entry.request.path.encode()
        if None in (head, answer, url, method) or not status or not target:
            return False
        b = self.balancer
        peers = b.auditor.draw(method, url, shown=max(self.sample, 1e-9))
        if peers is None:
            self.sampled += 1
            return False  # not drawn: neither the head nor the answer is decoded
        try:
            body = base64.b64decode(answer.string_value, validate=True)
            lines = base64.b64decode(head.string_value, validate=True).split(b"\n")
        except binascii.Error:
            return False
        if len(body) > res.MAX_SAMPLED_BODY:
            return False
        self.sampled += 1
        headers: list[tuple[bytes, bytes]] = []
        for line in lines:
            name, sep, value = line.partition(b"\0")
            name = name.lower()
            if (
                sep
                and name[:1] != b":"
                and name not in REQUEST_DROPPED
                and not name.startswith(b"x-envoy-")
            ):
                headers.append((name, value))
        b.start_audit(method, target, headers, url, UpstreamResponse(status, [], body), peers)
        self.audited += 1
        return True

    # ---------------------------------------------------------------- serving
    async def start(self, host: str, port: int) -> int:
        """Start the balancer's loops and the gRPC server; returns the port bound."""
        for url in self.balancer.backends:
            self.target(url)
        self.load_evidence()
        self._static()
        token = self.layout.xds_token
        server = grpc.aio.server(
            interceptors=[_TokenCheck(self, token)] if token is not None else None,
            options=[
                ("grpc.max_receive_message_length", 16 << 20),
                ("grpc.max_concurrent_streams", 10_000),
            ],
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(self), server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(_AccessLogs(self), server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot listen on {host}:{port}")
        await server.start()
        self._server = server
        self._tasks.append(asyncio.create_task(self._warm_up(), name="twlb-envoy-warmup"))
        return bound

    async def _warm_up(self) -> None:
        await asyncio.sleep(self.warmup_s)
        self.refresh(self.balancer.clock(), force=True)
        self.ready.set()
        log.info(
            "control plane ready: %d backends, endpoints version %s",
            len(self.balancer.backends),
            self.snapshot.version(res.ENDPOINT_TYPE),
        )
        self._tasks.append(asyncio.create_task(self._watch(), name="twlb-envoy-watch"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace=0.5)
        self._write_evidence_now()

    def _write_evidence_now(self) -> None:
        self._written_proven = None
        self._write_evidence(self.balancer.clock())

    def install_api(self, api: Any) -> None:
        """Add `GET /xds` (`status`) to TW-LB's HTTP API."""

        @api.get("/xds")
        async def xds() -> dict[str, Any]:
            return self.status()

    def status(self) -> dict[str, Any]:
        """What `GET /xds` shows: the Envoys connected, what each accepted, the pushes."""
        return {
            "ready": self.ready.is_set(),
            "sample": self.sample,
            "log_sample": self.log_sample,
            "sampled_answers": self.sampled,
            "audits_started": self.audited,
            "upstream_tries_logged": self.logged,
            "calls_refused": self.refused,
            "versions": {t: self.snapshot.version(t) for t in res.TYPE_ORDER},
            "envoys": [{"node": s.node_id, "types": s.status()} for s in self.streams],
            "pushes": self.pushes[-10:],
        }


class _TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call that does not show the control plane's token
    in the metadata entry `XDS_TOKEN_HEADER`: only the Envoy given the bootstrap reads the
    configuration, logs tries or shows answers."""

    def __init__(self, plane: ControlPlane, token: str) -> None:
        self.plane = plane
        self.token = token.encode()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        for key, value in details.invocation_metadata or ():
            if key == res.XDS_TOKEN_HEADER:
                shown = value if isinstance(value, bytes) else value.encode()
                if hmac.compare_digest(shown, self.token):
                    return handler
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        self.plane.refused += 1
        if self.plane.refused == 1:
            log.warning("refused a gRPC call without the xDS token: %s", details.method)
        return _refusing(handler)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"no valid {res.XDS_TOKEN_HEADER}")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that refuses the call."""
    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return kind(
        _refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    async def StreamAggregatedResources(  # noqa: N802 (the gRPC method's name)
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        plane = self.plane
        stream = AdsStream()
        # Envoy's requests, None for "the snapshot changed", _END when Envoy hung up.
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    queue.put_nowait(req)
            finally:
                queue.put_nowait(_END)

        reader = asyncio.create_task(read())
        plane.streams[stream] = queue
        try:
            await plane.ready.wait()
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if item is None:
                    out = stream.on_snapshot(plane.snapshot)
                else:
                    if item.HasField("error_detail"):
                        log.error(
                            "Envoy %s refused %s version %s: %s",
                            stream.node_id,
                            item.type_url,
                            item.version_info,
                            item.error_detail.message,
                        )
                    out = stream.on_request(item, plane.snapshot)
                for response in out:
                    yield response
        finally:
            plane.streams.pop(stream, None)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


_END = object()


class _AccessLogs(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    async def StreamAccessLogs(  # noqa: N802
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        plane = self.plane
        clock = plane.balancer.clock
        samples = False  # which log this stream carries: named in its first message only
        async for message in request_iterator:
            if message.HasField("identifier"):
                samples = message.identifier.log_name == res.SAMPLE_LOG
            if samples:
                plane.observe_samples(message.http_logs.log_entry)
            else:
                plane.observe_entries(message.http_logs.log_entry, clock())
        return als_pb2.StreamAccessLogsResponse()
