"""Chaos Toolkit probes: measure a TW-LB cluster's steady state, bounded in time.

Every probe is a plain function Chaos Toolkit calls with the experiment's arguments. A
probe aimed at the embedded runtime takes `state_dir` (the `--state-dir` of `twlb up`);
one aimed at a Kubernetes cluster takes the balancer's `url`. Load probes run a short
verified load (`twlb.client.load`, the same code as `twlb load`) with a fixed count and
duration, so no probe can hang; a target that never answers raises ActivityFailed with
a message naming it, which Chaos Toolkit writes into the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from chaoslib.exceptions import ActivityFailed
from twlb.chaos.state import load_cluster
from twlb.client.client import ClientPolicy
from twlb.client.load import LoadPlan, Mode, RunControl, load_policy, run_load
from twlb.client.report import LoadTally, build_report
from twlb.processes.managed import pid_alive

from twlb.spec import NodeClass

#: Chaos Toolkit's logger: what probes say lands in the run's log file.
log = logging.getLogger("chaostoolkit")

#: Per-request timeout of the probes' own HTTP calls (health, trust, control).
HTTP_TIMEOUT_S = 2.0
#: How often trust is read while waiting for an ejection.
TRUST_POLL_S = 0.25
EJECTED = "ejected"


def _target(url: str | None, state_dir: str | None) -> str:
    """Where traffic goes: `url`, else the cluster's balancer."""
    if url:
        return url.rstrip("/")
    return load_cluster(state_dir).balancer_url


def _admin_target(url: str | None, state_dir: str | None) -> str:
    """Where the balancer's own endpoints are: `url` (a balancer serving both), else the
    cluster's admin listener (its traffic port proxies /trust to the backends)."""
    if url:
        return url.rstrip("/")
    return load_cluster(state_dir).admin_url


#: ClientPolicy settings a load probe's `client` may set; `breaker` is a mapping of
#: BreakerConfig settings, or None for a client without a breaker.
CLIENT_SETTINGS = frozenset(ClientPolicy.model_fields)


def _plan(
    url: str,
    requests: int,
    rate: float,
    mode: str,
    seed: int,
    client: Mapping[str, Any] | None = None,
) -> LoadPlan:
    try:
        load_mode = Mode(mode)
    except ValueError:
        raise ActivityFailed(
            f"mode must be one of {[m.value for m in Mode]}, got {mode!r}"
        ) from None
    if requests < 1 or rate <= 0:
        raise ActivityFailed(f"need requests >= 1 and rate > 0, got {requests} and {rate}")
    settings = dict(client or {})
    unknown = set(settings) - CLIENT_SETTINGS
    if unknown:
        raise ActivityFailed(
            f"unknown client settings {sorted(unknown)}; known: {sorted(CLIENT_SETTINGS)}"
        )
    try:
        # `twlb load`'s client, with the experiment's settings over it.
        policy = ClientPolicy.model_validate(load_policy().model_dump() | settings)
        plan = LoadPlan(
            url=url, rate=rate, duration_s=requests / rate, count=requests, mode=load_mode,
            seed=seed, client=policy,
        )  # fmt: skip
    except ValueError as err:
        raise ActivityFailed(f"invalid client settings {client!r}: {err}") from None
    return plan


def _report(plan: LoadPlan, tally: LoadTally) -> dict[str, Any]:
    report = build_report(tally, plan.settings())
    if report["unreachable"] or report["sent"] == 0:
        raise ActivityFailed(
            f"balancer {plan.url} is unreachable: {report['stop_reason']} "
            f"({report['sent']} requests sent, none answered)"
        )
    return report


def verified_load(
    url: str | None = None,
    state_dir: str | None = None,
    requests: int = 300,
    rate: float = 150.0,
    mode: str = "basic",
    seed: int = 0,
    client: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Send `requests` GET /work through the balancer at `rate`, verify every answer, and
    return `twlb load`'s report (sent, correct, wrong, failed, latency_ms, ...). `client`
    overrides the resilient client's settings (see CLIENT_SETTINGS)."""
    plan = _plan(_target(url, state_dir), requests, rate, mode, seed, client)
    report = _report(plan, asyncio.run(run_load(plan)))
    failed = {k: v for k, v in report["failed_by_reason"].items() if v}
    log.info(
        "verified load through %s (%s): %d sent, %d correct, %d wrong, %d failed %s, "
        "%d retries, p95 %s ms",
        plan.url, mode, report["sent"], report["correct"], report["wrong"], report["failed"],
        failed or "", report["retries"], report["latency_ms"]["p95"],
    )  # fmt: skip
    return report


#: What `answer_ratio` can count, as named in `twlb load`'s report.
ANSWERS = ("correct", "wrong", "failed")


def answer_ratio(
    answer: str = "correct",
    url: str | None = None,
    state_dir: str | None = None,
    requests: int = 300,
    rate: float = 150.0,
    mode: str = "basic",
    seed: int = 0,
    client: Mapping[str, Any] | None = None,
) -> float:
    """Share of requests answered `correct` (the right digest), `wrong` (200 with a wrong
    digest) or `failed` (no good answer), over one verified load."""
    if answer not in ANSWERS:
        raise ActivityFailed(f"answer must be one of {list(ANSWERS)}, got {answer!r}")
    report = verified_load(url, state_dir, requests, rate, mode, seed, client)
    return report[answer] / report["sent"]


def latency_ms(
    url: str | None = None,
    state_dir: str | None = None,
    quantile: str = "p95",
    requests: int = 300,
    rate: float = 150.0,
    mode: str = "basic",
    seed: int = 0,
) -> float:
    """A latency quantile (`p50`, `p95`, `p99` or `max`) of correct answers, milliseconds."""
    report = verified_load(url, state_dir, requests, rate, mode, seed)
    value = report["latency_ms"].get(quantile)
    if value is None:
        raise ActivityFailed(f"no {quantile} latency: {report['correct']} correct answers")
    return float(value)


def read_trust(url: str | None = None, state_dir: str | None = None) -> dict[str, Any]:
    """The balancer's `/trust` document."""
    target = _admin_target(url, state_dir)
    try:
        r = httpx.get(target + "/trust", timeout=HTTP_TIMEOUT_S)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as err:
        raise ActivityFailed(f"cannot read trust from {target}/trust: {err}") from None


def backend_matches(backend_url: str, node: str, node_url: str | None = None) -> bool:
    """Whether a balancer's backend URL is this node: its own URL (embedded runtime) or a
    Service named after it (`http://<node>.<namespace>.svc:8080`, Kubernetes)."""
    if node_url is not None and backend_url.rstrip("/") == node_url.rstrip("/"):
        return True
    host = urlsplit(backend_url).hostname or ""
    return host.split(".")[0] == node


def node_trust(node: str, url: str | None = None, state_dir: str | None = None) -> dict[str, Any]:
    """One node's trust row: {"node", "url", "weight", "state"}."""
    node_url = None
    if state_dir:
        found = load_cluster(state_dir).node(node)
        node, node_url = found.name, found.url
    for b in read_trust(url, state_dir)["backends"]:
        if backend_matches(b["url"], node, node_url):
            return {"node": node, "url": b["url"], "weight": b["weight"], "state": b["state"]}
    raise ActivityFailed(f"the balancer has no backend for node {node}")


def live_truth(state_dir: str | None = None) -> dict[str, str]:
    """Each node's true class now: `crash` when its process is gone or silent, else the
    class of the fault its control endpoint says is active."""
    # The collector's reading of truth; imported here so probes load without pyarrow.
    from twlb.chaos.run import control_truth

    cluster = load_cluster(state_dir)
    truth: dict[str, str] = {}
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
        for n in cluster.nodes:
            if n.pid and pid_alive(n.pid):
                truth[n.name] = control_truth(n.url, cluster.control_token, client)[0]
            else:
                truth[n.name] = NodeClass.CRASH.value
    return truth


def faulty_nodes(state_dir: str | None = None) -> list[str]:
    """Names of the nodes whose live fault makes them anything but healthy."""
    return [n for n, c in live_truth(state_dir).items() if c != NodeClass.HEALTHY.value]


def healthy_backends(state_dir: str | None = None) -> int:
    """How many nodes run and answer their health check."""
    cluster = load_cluster(state_dir)
    up = 0
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
        for n in cluster.nodes:
            if not (n.pid and pid_alive(n.pid)):
                continue
            with contextlib.suppress(httpx.HTTPError):
                if client.get(n.url + "/healthz").status_code == 200:
                    up += 1
    return up


def one_process_per_node(state_dir: str | None = None) -> bool:
    """True when every node runs as exactly one `twlb backend` process of this runtime;
    ActivityFailed names the nodes with none or with duplicates."""
    cluster = load_cluster(state_dir)
    counts = {n.name: 0 for n in cluster.nodes}
    try:
        children = psutil.Process(cluster.runtime_pid).children(recursive=True)
    except psutil.Error as err:
        raise ActivityFailed(f"cannot list the runtime's processes: {err}") from None
    for p in children:
        with contextlib.suppress(psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            argv = p.cmdline()
            if "backend" in argv and "--node-id" in argv:
                name = argv[argv.index("--node-id") + 1]
                if name in counts:
                    counts[name] += 1
    wrong = {n: c for n, c in counts.items() if c != 1}
    if wrong:
        raise ActivityFailed(f"nodes without exactly one process: {wrong}")
    return True


async def _watch_under_load(
    trust_url: str,
    plan: LoadPlan,
    within_s: float,
    seen: Callable[[list[dict[str, Any]], float], bool],
) -> bool:
    """Drive `plan`'s load while reading the balancer's trust rows every TRUST_POLL_S until
    `seen(rows, seconds so far)` is true (True) or `within_s` has passed (False). Trust
    moves only on evidence, and without traffic there is none."""
    control = RunControl()
    load = asyncio.get_running_loop().create_task(run_load(plan, control))
    t0 = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
            while time.monotonic() - t0 < within_s:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    rows = (await client.get(trust_url + "/trust")).json()["backends"]
                    if seen(rows, round(time.monotonic() - t0, 3)):
                        return True
                await asyncio.sleep(TRUST_POLL_S)
        return False
    finally:
        control.stop.set()
        await load


async def _eject_watch(
    trust_url: str,
    nodes: Mapping[str, str | None],
    plan: LoadPlan,
    within_s: float,
) -> dict[str, float]:
    """Drive load while polling trust until every node is ejected; seconds per node."""
    ejected: dict[str, float] = {}
    last: dict[str, Any] = {}

    def seen(rows: list[dict[str, Any]], elapsed: float) -> bool:
        for node, node_url in nodes.items():
            for b in rows:
                if backend_matches(b["url"], node, node_url):
                    last[node] = {k: b.get(k) for k in ("weight", "state", "held")}
                    if b["state"] == EJECTED and node not in ejected:
                        ejected[node] = elapsed
        return len(ejected) == len(nodes)

    if not await _watch_under_load(trust_url, plan, within_s, seen):
        missing = {n: last.get(n, "not listed by the balancer") for n in nodes if n not in ejected}
        raise ActivityFailed(f"not ejected within {within_s}s: {missing}")
    return ejected


def fleet_in_rotation(
    state_dir: str | None = None,
    within_s: float = 45.0,
    rate: float = 20.0,
    url: str | None = None,
) -> float:
    """Seconds until the balancer has no backend ejected, while a light verified load gives
    it the evidence to readmit one (an ejected backend that is well again comes back only
    through audits riding on traffic). An experiment's rollback waits on this so that the
    next experiment starts from the whole fleet, not from a node still ejected for a fault
    that is over. ActivityFailed names the backends still ejected after `within_s`."""
    target = _target(url, state_dir)
    plan = LoadPlan(url=target, rate=rate, duration_s=within_s + 1.0, mode=Mode.BASIC)
    took: list[float] = []
    last: dict[str, Any] = {}

    def seen(rows: list[dict[str, Any]], elapsed: float) -> bool:
        last.clear()
        last.update({b["url"]: round(b["weight"], 3) for b in rows if b["state"] == EJECTED})
        if rows and not last:
            took.append(elapsed)
            return True
        return False

    if not asyncio.run(_watch_under_load(_admin_target(url, state_dir), plan, within_s, seen)):
        raise ActivityFailed(f"still ejected after {within_s}s (url: weight): {last}")
    log.info("every backend of %s in rotation after %.1fs", target, took[0])
    return took[0]


def faulty_nodes_ejected(
    state_dir: str | None = None,
    within_s: float = 10.0,
    rate: float = 100.0,
    nodes: Collection[str] | None = None,
    url: str | None = None,
    admin_url: str | None = None,
) -> float:
    """Seconds until the balancer ejected every faulty node (its trust fell below the
    ejection threshold), while a verified load gives it evidence; 0.0 when no node is
    faulty. ActivityFailed when a faulty node is still in rotation after `within_s`.

    Faulty nodes are `nodes` when given, else those whose live fault is not benign. The
    load goes to `url` (default: the local cluster's traffic address), /trust is read from
    `admin_url` (default: the local cluster's admin listener, else `url`)."""
    cluster = load_cluster(state_dir) if state_dir or not url else None
    names = list(nodes) if nodes is not None else faulty_nodes(state_dir)
    if not names:
        return 0.0
    by_name = {n.name: n.url for n in cluster.nodes} if cluster else {}
    target = url.rstrip("/") if url else cluster.balancer_url  # type: ignore[union-attr]
    admin = (admin_url or url or cluster.admin_url).rstrip("/")  # type: ignore[union-attr]
    plan = LoadPlan(url=target, rate=rate, duration_s=within_s + 1.0, mode=Mode.BASIC)
    times = asyncio.run(_eject_watch(admin, {n: by_name.get(n) for n in names}, plan, within_s))
    return max(times.values())
