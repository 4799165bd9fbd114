"""The Envoy control plane without Envoy: the xDS state machine (versions, nonces, ACK and
NACK), the resources Envoy is given (checked by Envoy itself, `envoy --mode validate`),
and the control plane's decisions on a `Balancer` over a fake fleet in memory: endpoints
from trust weights and slow start, a backend out of the endpoints once health, gossip or
proof takes it out, the sample share a suspect raises, sampled answers audited, Envoy's
log entries read into outcomes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
from pathlib import Path

import pytest
from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as entry_pb2
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.protobuf import json_format
from google.rpc import status_pb2
from test_balancer_core import HONEST, LIAR, make_balancer
from twlb.envoy import resources as res
from twlb.envoy.process import envoy_binary, envoy_environment
from twlb.envoy.server import ControlPlane, outcome_of
from twlb.envoy.xds import AdsStream, Snapshot

from twlb.outcome import Outcome
from twlb.vocabulary import PolicyName

assert accesslog_pb2  # registers the access log types the entries use

LAYOUT = res.Layout(
    listener=res.Address("127.0.0.1", 10000),
    admin=res.Address("127.0.0.1", 9901),
    xds=res.Address("127.0.0.1", 18000),
    api=res.Address("127.0.0.1", 8080),
    stats=res.Address("0.0.0.0", 9902),
)


# ------------------------------------------------------------------------- the protocol
def _snapshot(boot: str = "a") -> Snapshot:
    snap = Snapshot(boot=boot)
    snap.set(res.LISTENER_TYPE, {res.LISTENER: res.packed(res.listener(LAYOUT))})
    snap.set(res.ENDPOINT_TYPE, {res.BACKENDS: res.packed(res.endpoints([]))})
    return snap


def _request(type_url: str, version: str = "", nonce: str = "", names=(), error: str = ""):
    req = DiscoveryRequest(
        type_url=type_url, version_info=version, response_nonce=nonce, resource_names=names
    )
    if error:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def test_first_request_is_answered_an_ack_is_not_and_a_new_version_is_pushed() -> None:
    snap, stream = _snapshot(), AdsStream()
    [first] = stream.on_request(_request(res.ENDPOINT_TYPE, names=[res.BACKENDS]), snap)
    assert first.version_info == "a-2" and len(first.resources) == 1
    ack = _request(res.ENDPOINT_TYPE, first.version_info, first.nonce, [res.BACKENDS])
    assert stream.on_request(ack, snap) == []
    assert stream.status()[res.ENDPOINT_TYPE]["acked"] == "a-2"
    assert stream.on_snapshot(snap) == []  # nothing moved
    eps = [res.Endpoint("127.0.0.1", 8001, 1000)]
    assert snap.set(res.ENDPOINT_TYPE, {res.BACKENDS: res.packed(res.endpoints(eps))})
    assert not snap.set(res.ENDPOINT_TYPE, {res.BACKENDS: res.packed(res.endpoints(eps))})
    [pushed] = stream.on_snapshot(snap)
    assert pushed.version_info == "a-3" and pushed.nonce != first.nonce


def test_a_nack_is_kept_and_that_version_not_sent_again() -> None:
    snap, stream = _snapshot(), AdsStream()
    [first] = stream.on_request(_request(res.LISTENER_TYPE), snap)
    nack = _request(res.LISTENER_TYPE, "", first.nonce, error="bad listener")
    assert stream.on_request(nack, snap) == []
    status = stream.status()[res.LISTENER_TYPE]
    assert status["refused"] == first.version_info and status["error"] == "bad listener"
    assert stream.on_snapshot(snap) == []  # the refused version is not sent again
    snap.set(res.LISTENER_TYPE, {})
    assert [r.version_info for r in stream.on_snapshot(snap)] == ["a-3"]


def test_a_stale_nonce_changes_nothing_and_a_restart_answers_whatever_envoy_holds() -> None:
    snap, stream = _snapshot(), AdsStream()
    [first] = stream.on_request(_request(res.LISTENER_TYPE), snap)
    snap.set(res.LISTENER_TYPE, {})
    [second] = stream.on_snapshot(snap)
    stale = _request(res.LISTENER_TYPE, first.version_info, first.nonce)
    assert stream.on_request(stale, snap) == []
    # A control plane restarted (another boot token): Envoy reconnects naming the old
    # version, and is sent this one's state at once.
    fresh = AdsStream()
    reconnect = _request(res.LISTENER_TYPE, second.version_info)
    [answer] = fresh.on_request(reconnect, _snapshot("b"))
    assert answer.version_info.startswith("b-")


def test_endpoints_are_sent_only_by_name() -> None:
    snap, stream = _snapshot(), AdsStream()
    [unnamed] = stream.on_request(_request(res.ENDPOINT_TYPE), snap)
    assert len(unnamed.resources) == 0
    [named] = stream.on_request(_request(res.ENDPOINT_TYPE, names=[res.BACKENDS]), snap)
    assert len(named.resources) == 1


# ------------------------------------------------------------------------- the resources
@pytest.mark.parametrize("policy", list(res.LB_POLICY))
def test_envoy_accepts_the_configuration_of_every_policy_it_carries(
    policy: PolicyName, tmp_path: Path
) -> None:
    """The bootstrap, with the listener, cluster and endpoints served over ADS put in as
    static resources, passes `envoy --mode validate` (Envoy's own parser and checks)."""
    layout = res.Layout(**{**LAYOUT.__dict__, "policy": policy})
    boot = res.bootstrap(layout)
    static = res.static_bootstrap(layout, [res.Endpoint("127.0.0.1", 8001, 5)])
    for name, doc in (("boot", boot), ("static", static)):
        path = tmp_path / f"{name}.json"
        path.write_text(json_format.MessageToJson(doc))
        out = subprocess.run(
            [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **envoy_environment(tmp_path)},
        )
        assert out.returncode == 0, (name, out.stdout[-2000:], out.stderr[-2000:])


def test_a_policy_envoy_cannot_run_is_refused_by_name() -> None:
    with pytest.raises(res.EnvoyConfigError, match="'maglev' has no Envoy counterpart"):
        res.Layout(**{**LAYOUT.__dict__, "policy": PolicyName.MAGLEV})


def test_weights_keep_the_minimum_trickle_and_the_sample_is_a_fraction_per_million() -> None:
    assert res.endpoint_weight(0.0) == 10 and res.endpoint_weight(1.0) == 1000
    assert res.endpoint_weight(0.5) == 500 and res.endpoint_weight(7.0) == 1000
    layer = json_format.MessageToDict(res.runtime(0.05, 0.25))["layer"]
    assert layer == {
        res.SAMPLE_KEY: {"numerator": 50000.0, "denominator": "MILLION"},
        res.LOG_SAMPLE_KEY: 250000.0,
    }
    with pytest.raises(res.EnvoyConfigError):
        res.runtime(1.5)


# ------------------------------------------------------------------------- the decisions
def _plane(kinds: list[str], **settings: object) -> tuple[ControlPlane, object, list[str]]:
    settings = {"policy": PolicyName.TRUST, **settings}
    b, fleet, urls = make_balancer(kinds, **settings)
    layout = res.Layout(**{**LAYOUT.__dict__, "policy": settings["policy"]})
    plane = ControlPlane(b, layout)
    plane._static()
    return plane, fleet, urls


def _hosts(plane: ControlPlane) -> dict[str, int]:
    return {f"{e.host}:{e.port}": e.weight for e in plane.endpoints(plane.balancer.clock())}


async def test_endpoints_follow_health_gossip_and_proof() -> None:
    plane, fleet, (a, b, c, d) = _plane([HONEST, HONEST, HONEST, LIAR], audit_fraction=0.5)
    bal = plane.balancer
    assert set(_hosts(plane)) == {
        "10.0.0.1:8000",
        "10.0.0.2:8000",
        "10.0.0.3:8000",
        "10.0.0.4:8000",
    }
    # Health: two failed checks take `a` out.
    now = bal.clock()
    bal.on_health_check(a, False, now)
    bal.on_health_check(a, False, now)
    assert "10.0.0.1:8000" not in _hosts(plane)
    # Gossip: every other member calls `b` dead.
    fleet.dead = {b}
    bal.apply_gossip({u: fleet.gossip_view(u) for u in (a, b, c, d)}, bal.clock())
    assert "10.0.0.2:8000" not in _hosts(plane)
    # Proof: the liar's answers, out-voted twice by the honest ones.
    fleet.dead = set()
    bal.apply_gossip({u: fleet.gossip_view(u) for u in (a, b, c, d)}, bal.clock())
    for _ in range(2):
        bal.judge({d: "lie", a: "ok", b: "ok", c: "ok"}, 2)
    assert bal.engine.is_proven(d)
    assert "10.0.0.4:8000" not in _hosts(plane)


async def test_slow_start_ramps_the_endpoint_weights_and_equal_weights_for_round_robin() -> None:
    plane, _, urls = _plane([HONEST, HONEST], slow_start_s=5.0)
    bal = plane.balancer
    bal.update_trust(bal.clock())
    weights = _hosts(plane)
    # A fleet that starts together ramps together: equal weights, each its trust weight.
    assert len(set(weights.values())) == 1
    rr, _, _ = _plane([HONEST, HONEST], policy=PolicyName.ROUND_ROBIN)
    assert set(_hosts(rr).values()) == {1000}


async def test_a_suspect_raises_the_sample_share_and_sampled_answers_are_audited() -> None:
    plane, fleet, (a, b, c, liar) = _plane(
        [HONEST, HONEST, HONEST, LIAR], audit_fraction=0.1, probation_audit_fraction=0.1
    )
    bal = plane.balancer
    assert plane.wanted_sample() == pytest.approx(0.1)
    plane.refresh(bal.clock())
    # The liar's answer, as Envoy's sample log brings it.
    body = b'{"node": "x", "result": "lie"}'
    plane.sample = 0.1  # shown 10% of answers: the audit is drawn at 0.1 / 0.1
    started = plane._observed_answer(_sampled(body, "10.0.0.4", 8000))
    assert started and plane.sampled == 1 and plane.audited == 1
    await asyncio.gather(*bal._background)
    assert bal.engine.evidence.standing(liar).value == "suspect"
    # A suspect's answers are all audited: Envoy must show TW-LB every GET now.
    assert plane.wanted_sample() == pytest.approx(1.0)
    assert plane.refresh(bal.clock())
    assert plane.sample == 1.0
    # The re-asks carried the request's own headers, not Envoy's pseudo-headers.
    assert [(b"accept", b"*/*")] in fleet.headers


def _sampled(
    body: bytes, host: str, port: int, status: int = 200, path: str = "/work?key=k"
) -> entry_pb2.HTTPAccessLogEntry:
    """A sampled GET as Envoy's sample log brings it: the head and the answer TW-LB's
    sampler put in the request's metadata (base64), the status and the upstream host."""
    e = entry_pb2.HTTPAccessLogEntry()
    e.request.request_method = base_pb2.GET
    e.request.path = path
    e.response.response_code.value = status
    addr = e.common_properties.upstream_remote_address.socket_address
    addr.address, addr.port_value = host, port
    head = b"\n".join(
        k + b"\0" + v
        for k, v in (
            (b":authority", b"envoy"), (b":path", path.encode()), (b":method", b"GET"),
            (b"accept", b"*/*"), (b"x-envoy-expected-rq-timeout-ms", b"3000"),
        )
    )  # fmt: skip
    meta = e.common_properties.metadata.filter_metadata[res.SAMPLE_NS]
    meta.update({
        res.SAMPLE_HEAD: base64.b64encode(head).decode(),
        res.SAMPLE_ANSWER: base64.b64encode(body).decode(),
    })  # fmt: skip
    return e


async def test_a_sample_that_is_not_whole_is_not_audited() -> None:
    plane, _, _ = _plane([HONEST, HONEST, HONEST, LIAR], audit_fraction=1.0)
    plane.refresh(plane.balancer.clock())  # the backends' addresses known
    good = _sampled(b"{}", "10.0.0.4", 8000)
    cases = []
    for mutate in (
        lambda e: e.common_properties.metadata.filter_metadata[res.SAMPLE_NS].fields.pop(
            res.SAMPLE_ANSWER
        ),  # the answer was over the sampler's cap
        lambda e: e.common_properties.metadata.filter_metadata[res.SAMPLE_NS].update(
            {res.SAMPLE_ANSWER: "not base64!"}
        ),
        lambda e: e.common_properties.upstream_remote_address.socket_address.__setattr__(
            "port_value", 9
        ),  # not a backend (TW-LB's own paths, a backend removed since)
        lambda e: e.response.response_code.__setattr__("value", 0),  # no answer at all
    ):
        e = entry_pb2.HTTPAccessLogEntry()
        e.CopyFrom(good)
        mutate(e)
        cases.append(e)
    plane.observe_samples(cases)
    assert plane.sampled == 0
    plane.observe_samples([good])
    assert plane.sampled == 1 and plane.audited == 1
    await asyncio.gather(*plane.balancer._background)


async def test_a_readmitted_liar_is_shown_in_full_and_proven_by_its_first_shown_lie() -> None:
    """A proven liar's back-off ends: it comes back SUSPECT at the slow-start floor, the
    refresh that puts it in Envoy's endpoints raises the share to the suspect fraction
    (every answer shown, every one audited), and its first shown lie proves it again."""
    plane, fleet, (a, b, c, liar) = _plane(
        [HONEST, HONEST, HONEST, LIAR], audit_fraction=0.2, liar_backoff_s=10.0
    )
    bal = plane.balancer
    for _ in range(bal.engine.evidence.rule.mismatches_to_prove):
        bal.judge({liar: "lie", a: "ok", b: "ok", c: "ok"}, 2)
    plane.refresh(bal.clock())
    out = plane.sample  # the honest backends' share (they are in probation: 0.5)
    assert "10.0.0.4:8000" not in _hosts(plane) and out < 1.0
    fleet.clock.now += 10.5  # the back-off is over
    bal.update_trust(bal.clock())
    assert bal.engine.evidence.standing(liar).value == "suspect"
    assert plane.refresh(bal.clock())
    floor = bal.engine.probation_weight * bal.policy.slow_start_floor  # type: ignore[attr-defined]
    assert _hosts(plane)["10.0.0.4:8000"] == res.endpoint_weight(floor)
    assert plane.sample == 1.0  # pushed with the endpoints that readmit it
    lie = b'{"node": "x", "result": "lie"}'
    assert plane._observed_answer(_sampled(lie, "10.0.0.4", 8000))
    await asyncio.gather(*bal._background)
    row = bal.engine.evidence.describe(liar)
    assert row["proven"] and row["offences"] == 2, row
    plane.refresh(bal.clock())
    assert "10.0.0.4:8000" not in _hosts(plane) and plane.sample == out


def test_log_entries_read_as_outcomes() -> None:
    def entry(code: int, **flags: bool) -> entry_pb2.HTTPAccessLogEntry:
        e = entry_pb2.HTTPAccessLogEntry()
        e.response.response_code.value = code
        e.common_properties.time_to_first_upstream_tx_byte.FromMilliseconds(1)
        e.common_properties.time_to_last_upstream_rx_byte.FromMilliseconds(13)
        for name, value in flags.items():
            setattr(e.common_properties.response_flags, name, value)
        return e

    assert outcome_of(entry(200)) == (Outcome.SUCCESS, pytest.approx(0.012))
    assert outcome_of(entry(503))[0] is Outcome.ERROR
    assert outcome_of(entry(0, upstream_request_timeout=True))[0] is Outcome.TIMEOUT
    assert outcome_of(entry(0, upstream_connection_failure=True))[0] is Outcome.CONNECT_ERROR
    assert outcome_of(entry(503, upstream_remote_reset=True))[0] is Outcome.CONNECT_ERROR


async def test_a_verdict_is_pushed_to_every_envoy_within_one_watch() -> None:
    plane, _, (a, b, c, liar) = _plane([HONEST, HONEST, HONEST, LIAR])
    bal = plane.balancer
    plane.refresh(bal.clock())
    stream = AdsStream()
    eds = _request(res.ENDPOINT_TYPE, names=[res.BACKENDS])
    [first] = stream.on_request(eds, plane.snapshot)
    queue: asyncio.Queue = asyncio.Queue()
    plane.streams[stream] = queue
    watch = asyncio.create_task(plane._watch())
    try:
        await asyncio.sleep(0.05)
        while not queue.empty():
            queue.get_nowait()
        for _ in range(2):
            bal.judge({liar: "lie", a: "ok", b: "ok", c: "ok"}, 2)
        await asyncio.wait_for(queue.get(), timeout=10 * 0.02)
        [pushed] = stream.on_snapshot(plane.snapshot)
    finally:
        watch.cancel()
    cla = res.endpoints([])
    pushed.resources[0].Unpack(cla)
    hosts = {e.endpoint.address.socket_address.port_value for e in cla.endpoints[0].lb_endpoints}
    assert len(cla.endpoints[0].lb_endpoints) == 3 and pushed.version_info != first.version_info
    assert hosts == {8000}


def _tries(n: int, url: str) -> list:
    """`n` upstream tries to the backend at `url`, as Envoy logs them: answered 200."""
    out = []
    host, port = url.removeprefix("http://").split(":")
    for _ in range(n):
        e = entry_pb2.HTTPAccessLogEntry()
        e.response.response_code.value = 200
        addr = e.common_properties.upstream_remote_address.socket_address
        addr.address, addr.port_value = host, int(port)
        out.append(e)
    return out


def test_envoy_logs_every_try_of_a_quiet_fleet_and_a_share_of_a_busy_ones() -> None:
    """The logged share keeps the busiest backend's logged tries near LOG_TARGET_PER_S."""
    from twlb.envoy.server import LOG_RATE_S, LOG_TARGET_PER_S, MIN_LOG_SAMPLE

    plane, _, urls = _plane([HONEST, HONEST])
    bal = plane.balancer
    assert plane.wanted_log_sample(bal.clock()) is None  # starts measuring

    plane.target(urls[0])
    plane.target(urls[1])
    plane.observe_entries(_tries(20, urls[0]), bal.clock())
    bal.clock.now += LOG_RATE_S
    assert plane.wanted_log_sample(bal.clock()) == 1.0  # 20 a second: every try
    plane.observe_entries(_tries(int(4 * LOG_TARGET_PER_S), urls[0]), bal.clock())
    plane.observe_entries(_tries(10, urls[1]), bal.clock())
    bal.clock.now += LOG_RATE_S
    assert plane.refresh(bal.clock())  # the busiest at 4x the target: pushed
    assert plane.log_sample == pytest.approx(0.25)
    layer = json_format.MessageToDict(plane.snapshot.types[res.RUNTIME_TYPE].resources[
        res.RUNTIME_LAYER])["layer"]  # fmt: skip
    assert layer[res.LOG_SAMPLE_KEY] == 250000
    # Measured at that share, the busiest backend's logged rate is its rate times 0.25.
    plane.observe_entries(_tries(int(LOG_TARGET_PER_S), urls[0]), bal.clock())
    bal.clock.now += LOG_RATE_S
    assert plane.wanted_log_sample(bal.clock()) == pytest.approx(0.25)
    assert bal.fleet.get(urls[0]).counters.outcomes[Outcome.SUCCESS] > 0
    # However busy the fleet, at least MIN_LOG_SAMPLE of tries are logged: a share of a
    # thousand times the target would be 0.25/1000, below the floor.
    plane.observe_entries(_tries(int(250 * LOG_TARGET_PER_S), urls[0]), bal.clock())
    bal.clock.now += LOG_RATE_S
    assert plane.wanted_log_sample(bal.clock()) == MIN_LOG_SAMPLE


def test_envoy_thins_the_log_within_a_flush_of_a_surge() -> None:
    """Traffic that jumps from idle is not logged whole until the window ends: once one
    backend has LOG_SURGE tries logged, the share is set from the rate since the surge's
    first flush, and pushed."""
    from twlb.envoy.server import LOG_RATE_S, LOG_SURGE, LOG_TARGET_PER_S

    plane, _, urls = _plane([HONEST, HONEST])
    bal = plane.balancer
    flush = plane.layout.log_flush_s
    for url in urls:
        plane.target(url)
    first = urls[0]
    assert plane.wanted_log_sample(bal.clock()) is None  # the window starts, idle
    bal.clock.now += 0.7  # 3,000 a second start 0.6 s in; Envoy flushes them 0.1 s later
    plane.observe_entries(_tries(int(LOG_SURGE) - 1, first), bal.clock())
    assert plane.wanted_log_sample(bal.clock()) is None  # not yet a surge: the window runs
    plane.observe_entries(_tries(300 - int(LOG_SURGE) + 1, first), bal.clock())
    bal.clock.now += 0.02  # the control plane's next look
    assert plane.refresh(bal.clock())
    # 300 tries in 0.12 s (one flush before the first came, to now): 2,500 a second.
    assert plane.log_sample == pytest.approx(LOG_TARGET_PER_S / 2500)
    # Measured anew from here, at that share: the same rate keeps the same share.
    plane.observe_entries(_tries(int(2500 * plane.log_sample * LOG_RATE_S), first), bal.clock())
    bal.clock.now += LOG_RATE_S
    assert plane.wanted_log_sample(bal.clock()) == pytest.approx(plane.log_sample)
    # However soon a surge is looked at, its rate is taken over at least one flush.
    bal.clock.now += LOG_RATE_S
    assert plane.wanted_log_sample(bal.clock()) == 1.0  # idle again: every try
    plane.log_sample = 1.0
    plane.observe_entries(_tries(int(LOG_SURGE), first), bal.clock())
    assert plane.wanted_log_sample(bal.clock()) == pytest.approx(
        LOG_TARGET_PER_S / (LOG_SURGE / flush)
    )


# ------------------------------------------------------------------------- the token
def _grpc_services(doc: object) -> list[dict]:
    """Every gRPC service a piece of Envoy's configuration names."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "grpcService":
                found.append(value)
            elif key == "grpcServices":
                found += value
            else:
                found += _grpc_services(value)
    elif isinstance(doc, list):
        for value in doc:
            found += _grpc_services(value)
    return found


def test_every_grpc_stream_envoy_opens_shows_the_token() -> None:
    token = "t0-K" * 6
    layout = res.Layout(**{**LAYOUT.__dict__, "xds_token": token})
    services = _grpc_services(json_format.MessageToDict(res.bootstrap(layout)))
    services += _grpc_services(json_format.MessageToDict(res.listener(layout)))
    assert len(services) == 3  # ADS, the upstream access log, the sample log
    for service in services:
        assert service["initialMetadata"] == [{"key": res.XDS_TOKEN_HEADER, "value": token}]
    assert token not in repr(layout)
    for bad, why in (("short", "at least 16"), ("x" * 20 + " y", "only letters")):
        with pytest.raises(res.EnvoyConfigError, match=why):
            res.Layout(**{**LAYOUT.__dict__, "xds_token": bad})


async def test_a_grpc_call_without_the_token_is_refused() -> None:
    import grpc
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

    token = "s3cret-" * 4
    b, _, _ = make_balancer([HONEST, HONEST], policy=PolicyName.TRUST)
    plane = ControlPlane(b, res.Layout(**{**LAYOUT.__dict__, "xds_token": token}), warmup_s=60)
    port = await plane.start("127.0.0.1", 0)
    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.log_name = "twlb_upstream"
    message.http_logs.log_entry.add().response.response_code.value = 200
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            for metadata in ((), ((res.XDS_TOKEN_HEADER, "s3cret-" * 3 + "x"),)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.StreamAccessLogs(iter([message]), metadata=metadata, timeout=10)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert plane.refused == 2 and plane.logged == 0
            await stub.StreamAccessLogs(
                iter([message]), metadata=((res.XDS_TOKEN_HEADER, token),), timeout=10
            )
            assert plane.logged == 1
    finally:
        await plane.stop()


def test_an_envoy_started_elsewhere_needs_the_token_given() -> None:
    from twlb.processes.managed import twlb_argv

    base = twlb_argv("envoy", "--backend", "http://127.0.0.1:9", "--print-bootstrap")
    run = subprocess.run(base, capture_output=True, text=True, timeout=60, env={"PATH": ""})
    assert run.returncode == 2, run.stderr
    assert "need --xds-token" in run.stderr and "Traceback" not in run.stderr
    short = subprocess.run([*base, "--xds-token", "short"], capture_output=True, text=True,
                           timeout=60, env={"PATH": ""})  # fmt: skip
    assert short.returncode == 2 and "at least 16" in short.stderr, short.stderr
    token = "given-" + "k" * 20
    ok = subprocess.run(base, capture_output=True, text=True, timeout=60,
                        env={"PATH": "", "TWLB_ENVOY_XDS_TOKEN": token})  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    ads = json_format.Parse(ok.stdout, bootstrap_pb2.Bootstrap()).dynamic_resources.ads_config
    [meta] = ads.grpc_services[0].initial_metadata
    assert (meta.key, meta.value) == (res.XDS_TOKEN_HEADER, token)
