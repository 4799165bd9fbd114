"""Collect labelled feature windows: run chaos on loopback clusters, record what the balancer sees.

Live mode runs clusters on the embedded runtime (real `twlb backend` and `twlb balancer`
processes): each run draws, from its seed, the cluster's fault assignment, fault
parameters, load and the run-time chaos (faults switched through /control/fault, a node
killed and held down). A local Prometheus scrapes the balancer. At sample instants one
window apart the collector reads every backend's features twice, directly from the
balancer's /trust and through Prometheus's HTTP API, and labels each row with the node's
true class at that moment (the runtime's ground truth). Rows whose window straddles a
change of truth are left out: their label would be a guess.

Attach mode (`--prometheus URL`) reads the windows of a balancer that is already running,
for example in a cluster, from its Prometheus, labelled by polling each backend's
GET /control/fault (a node that does not answer is down: `crash`).

Sample instants are placed two scrape intervals and a little after the balancer's trust
tick (seen by polling /trust), so both sources read the same tick's values: Prometheus
scrapes more often than the trust ticks (0.5 s), so its last sample before the instant
belongs to that tick too.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
from twlb.balancer.features import FEATURE_NAMES
from twlb.balancer.settings import BalancerSettings
from twlb.chaos.run import (
    ChaosEvent,
    ChaosSchedule,
    Log,
    TrustPoller,
    TruthTimeline,
    control_truth,
    driven_load,
    observe_truth,
)
from twlb.ml.dataset import Sample, WindowRow
from twlb.orchestration.prometheus import LocalPrometheus, PrometheusAPI
from twlb.processes.managed import free_port_range

from twlb.options import FiniteFloat, OutputPath, click_option
from twlb.spec import BalancerTunables, FaultSpec, FaultType, TrustCluster

FEATURE_METRIC = "twlb_balancer_feature"
SOURCES = ("balancer", "prometheus")

#: Faults a run may draw, with weights giving each fault class a similar share of windows
#: (kills add crash windows to every run; flapping is left out: its healthy periods carry
#: its label).
DRAWN_FAULTS: dict[FaultType, float] = {
    FaultType.BYZANTINE: 0.3,
    FaultType.ERROR: 0.25,
    FaultType.DELAY: 0.15,
    FaultType.LIE_LATENCY: 0.1,
    FaultType.CRASH: 0.2,
}
#: The instant is placed this long after a trust tick is seen, plus two scrape intervals.
TICK_SETTLE_S = 0.1
POLL_S = 0.05


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class RunPlan:
    """Everything one collection run does, drawn from its seed."""

    run_id: str
    seed: int
    backends: int
    duration_s: float
    window_s: float
    rate: float
    audit_fraction: float
    faults: tuple[FaultSpec, ...]
    events: tuple[ChaosEvent, ...]

    def cluster(self) -> TrustCluster:
        """The TrustCluster this run starts: every node's fault pinned by index."""
        return TrustCluster.model_validate(
            {
                "apiVersion": "twlb.dev/v1alpha1",
                "kind": "TrustCluster",
                "metadata": {"name": self.run_id},
                "spec": {
                    "backends": self.backends,
                    "seed": self.seed,
                    "policy": "round-robin",
                    "nodes": [
                        {"index": i, "fault": f.model_dump(mode="json", by_alias=True)}
                        for i, f in enumerate(self.faults)
                    ],
                    "balancer": {"auditFraction": self.audit_fraction, "windowS": self.window_s},
                },
            }
        )

    def describe(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "seed": self.seed,
            "backends": self.backends,
            "rate": self.rate,
            "audit_fraction": self.audit_fraction,
            "faults": [f.model_dump(mode="json", by_alias=True) for f in self.faults],
            "events": [e.describe() for e in self.events],
        }


def _draw_type(rng: random.Random) -> FaultType:
    return rng.choices(list(DRAWN_FAULTS), weights=list(DRAWN_FAULTS.values()))[0]


def draw_fault(rng: random.Random, fault_type: FaultType) -> FaultSpec:
    """A fault of this type with parameters drawn from the collection ranges."""
    if fault_type is FaultType.CRASH:
        # Per request: at tens of requests per second a node dies within a second.
        return FaultSpec(type=fault_type, probability=round(rng.uniform(0.02, 0.3), 3))
    if fault_type is FaultType.BENIGN:
        return FaultSpec()
    return FaultSpec(
        type=fault_type,
        probability=round(rng.uniform(0.3, 1.0), 3),
        delay_ms=rng.choice([rng.randint(300, 900), rng.randint(1200, 5000)]),
        error_status=rng.choice([500, 502, 503, 504]),
    )


#: Defaults: six backends at a rate drawn per run (the shipped data's first part), with
#: the balancer's own feature window.
WINDOW_S: float = BalancerTunables.model_fields["window_s"].default
BACKENDS = 6
RATE_DRAWN = (120, 260)


def plan_run(
    seed: int,
    backends: int | tuple[int, int] = BACKENDS,
    duration_s: float = 45.0,
    window_s: float = WINDOW_S,
    rate: float | tuple[int, int] | None = None,
    run_id: str | None = None,
) -> RunPlan:
    """Draw one run from its seed: faults on up to half the nodes, then chaos mid-run.
    `backends` and `rate` are fixed values or (low, high) ranges drawn from per run."""
    rng = random.Random(f"twlb-collect:{seed}")
    if isinstance(backends, tuple):
        backends = rng.randint(*backends)
    if backends < 3:
        raise ValueError(f"a run needs at least 3 backends (audits compare three), got {backends}")
    n_faulty = rng.randint(1, max(1, backends // 2))
    faulty = rng.sample(range(backends), n_faulty)
    faults = [FaultSpec() for _ in range(backends)]
    for i in faulty:
        faults[i] = draw_fault(rng, _draw_type(rng))
    healthy = [i for i in range(backends) if i not in faulty]
    events: list[ChaosEvent] = []
    if duration_s >= 3 * window_s and healthy:
        # A healthy node turns faulty, a faulty one recovers, a healthy one is killed.
        switch_at = round(rng.uniform(0.3, 0.45) * duration_s, 1)
        victim = healthy.pop(rng.randrange(len(healthy)))
        events.append(ChaosEvent(switch_at, victim, draw_fault(rng, _draw_type(rng))))
        recovering = [i for i in faulty if faults[i].type is not FaultType.CRASH]
        if recovering:
            events.append(ChaosEvent(switch_at, rng.choice(recovering), FaultSpec()))
        if healthy:
            kill_at = round(rng.uniform(0.5, 0.65) * duration_s, 1)
            events.append(
                ChaosEvent(kill_at, rng.choice(healthy), hold_down_s=round(2.5 * window_s, 1))
            )
    return RunPlan(
        run_id=run_id or f"run-{seed}",
        seed=seed,
        backends=backends,
        duration_s=duration_s,
        window_s=window_s,
        rate=float(rate)
        if isinstance(rate, int | float)
        else float(rng.randint(*(rate or RATE_DRAWN))),
        audit_fraction=round(rng.uniform(0.05, 0.15), 3),
        faults=tuple(faults),
        events=tuple(sorted(events, key=lambda e: e.at_s)),
    )


# --------------------------------------------------------------------------- sampling


def prometheus_reading(
    api: PrometheusAPI, at: float, selector: str = "", lookback_s: float = 5.0
) -> tuple[dict[str, dict[str, float]], float]:
    """Features of the last successful scrape at or before `at` (full rows only), and the
    time of the oldest scrape they come from (0.0 when there is none).

    A range selector returns raw samples, so one failed scrape (whose staleness markers
    would blank an instant query) falls back to the scrape before it.
    """
    query = f"{FEATURE_METRIC}{{{selector}}}[{round(lookback_s * 1000)}ms]"
    out: dict[str, dict[str, float]] = {}
    oldest = float("inf")
    for series in api.query(query, at=at):
        labels = series["metric"]
        if series["values"]:
            ts, value = series["values"][-1]
            out.setdefault(labels["backend"], {})[labels["feature"]] = float(value)
            oldest = min(oldest, float(ts))
    full = {b: f for b, f in out.items() if all(n in f for n in FEATURE_NAMES)}
    return full, (oldest if full else 0.0)


def prometheus_features(
    api: PrometheusAPI, at: float, selector: str = "", lookback_s: float = 5.0
) -> dict[str, dict[str, float]]:
    """backend URL -> features of the last successful scrape at or before `at`."""
    return prometheus_reading(api, at, selector, lookback_s)[0]


def label_rows(
    plan_id: str,
    seed: int,
    t0: float,
    samples: Sequence[Sample],
    readings: Sequence[Mapping[str, Mapping[str, float]]],
    truth: TruthTimeline,
    names: Mapping[str, str],
    window_s: float,
    guard_s: float = 1.0,
) -> list[WindowRow]:
    """Rows of one source: every backend reading whose truth held over its whole window."""
    rows = []
    for sample, reading in zip(samples, readings, strict=True):
        for url, feats in reading.items():
            node = names.get(url, url)
            held = truth.stable(node, sample.at - window_s - guard_s, sample.at)
            if held is None:
                continue
            rows.append(
                WindowRow(
                    run_id=plan_id,
                    seed=seed,
                    node=node,
                    time=round(sample.at - t0, 3),
                    features=tuple(feats[n] for n in FEATURE_NAMES),
                    label=held[0],
                    fault=held[1],
                )
            )
    return rows


# --------------------------------------------------------------------------- live runs


@dataclass
class RunResult:
    plan: RunPlan
    rows: dict[str, list[WindowRow]]  # by source


def run_live(
    plan: RunPlan,
    sources: Sequence[str] = SOURCES,
    workdir: Path | None = None,
    scrape_interval_s: float = 0.15,
    warmup_windows: float = 1.25,
    log: Log = print,
) -> RunResult:
    """Run one planned cluster with load and chaos; rows per source."""
    from twlb.orchestration.runtime import EmbeddedCluster

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="twlb-run-")))
        workdir.mkdir(parents=True, exist_ok=True)
        cluster = EmbeddedCluster(
            plan.cluster(),
            port_base=free_port_range(plan.backends + 2),
            state_dir=workdir / plan.run_id,
            prometheus=False,
            policy="round-robin",
        )
        stack.enter_context(cluster)
        cluster.start_supervisor(0.1)
        truth = TruthTimeline()
        observe_truth(cluster, truth)
        prom = None
        if "prometheus" in sources:
            prom = stack.enter_context(
                LocalPrometheus(
                    cluster.admin_urls,
                    scrape_interval_s,
                    workdir=workdir / plan.run_id / "prometheus",
                )
            )
            _wait_scraping(prom.api)
        names = {n.url: n.name for n in cluster.nodes}
        poller = TrustPoller(cluster.admin_url)
        stack.callback(poller.close)
        stack.enter_context(
            driven_load(cluster.balancer_url, plan.rate, plan.duration_s + 1.0, workdir)
        )
        t0 = time.time()
        # Two scrapes after the tick (one may fail under load), still before the next one.
        settle_s = min(2 * scrape_interval_s + TICK_SETTLE_S, 0.4)
        schedule = ChaosSchedule(cluster, plan.events, log)
        samples: list[Sample] = []
        next_sample = t0 + warmup_windows * plan.window_s
        end = t0 + plan.duration_s
        while time.time() < end:
            now = time.time()
            schedule.apply_due(now - t0)
            observe_truth(cluster, truth, now)
            seen_before = poller.changed_at
            reading = poller.poll()
            if now >= next_sample and poller.changed_at > seen_before:
                # A tick was just seen: read again once scrapes have seen it too. If another
                # tick came in between (a starved loop), wait for the next one instead.
                at = poller.changed_at + settle_s
                time.sleep(max(0.0, at - time.time()))
                if poller.poll() == reading:
                    samples.append(Sample(at, reading, poller.changed_at))
                    next_sample += plan.window_s
            time.sleep(POLL_S)
        scraped = []
        if prom is not None:
            time.sleep(2 * scrape_interval_s)
            kept = []
            for s in samples:
                reading, oldest = prometheus_reading(prom.api, s.at)
                # A scrape started before the tick was seen may hold the previous tick
                # (scrapes delayed or failed under load): leave it out of both sources.
                if oldest >= s.tick_seen_at:
                    kept.append(s)
                    scraped.append(reading)
            if len(kept) < len(samples):
                log(f"  {len(samples) - len(kept)} samples left out: no scrape of their tick")
            samples = kept
        rows: dict[str, list[WindowRow]] = {}
        label = {"plan_id": plan.run_id, "seed": plan.seed, "t0": t0, "samples": samples}
        common = {"truth": truth, "names": names, "window_s": plan.window_s}
        if "balancer" in sources:
            rows["balancer"] = label_rows(**label, readings=[s.direct for s in samples], **common)
        if prom is not None:
            rows["prometheus"] = label_rows(**label, readings=scraped, **common)
        counts = ", ".join(f"{s} {len(r)} rows" for s, r in rows.items())
        log(f"{plan.run_id}: {len(samples)} samples, {counts}")
        return RunResult(plan, rows)


def _wait_scraping(api: PrometheusAPI, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not api.targets_up():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Prometheus at {api.base_url} did not scrape the balancer")
        time.sleep(0.1)


# --------------------------------------------------------------------------- attach mode


def collect_attached(
    prometheus_url: str,
    control_token: str,
    duration_s: float,
    window_s: float,
    run_id: str,
    seed: int,
    segments: int = 1,
    selector: str = "",
    log: Log = print,
) -> list[WindowRow]:
    """Label a running balancer's windows from its Prometheus, `segments` runs in a row.

    Truth is polled from every backend's /control/fault while the runs last; then the
    windows are read back at one-window steps. Segment i is run `{run_id}-{i}` with seed
    `seed + i`, so grouped training can hold some of them out.
    """
    api = PrometheusAPI(prometheus_url)
    # The balancer may still be coming up (a Job applied with the cluster): wait for it.
    deadline = time.time() + duration_s
    while not (backends := sorted(prometheus_features(api, time.time(), selector))):
        if time.time() > deadline:
            raise RuntimeError(
                f"{prometheus_url} held no {FEATURE_METRIC}{{{selector}}} series "
                f"for {duration_s:.0f}s: is the balancer running and scraped?"
            )
        time.sleep(2.0)
    start = time.time()
    log(f"attached: {len(backends)} backends via {prometheus_url}, {segments} x {duration_s}s")
    truth = TruthTimeline()
    with httpx.Client(timeout=1.0) as client:
        while time.time() - start < segments * duration_s:
            now = time.time()
            for b in backends:
                label, fault = control_truth(b, control_token, client)
                truth.observe(b, now, label, fault)
            time.sleep(0.5)
    rows: list[WindowRow] = []
    per_segment = int(duration_s // window_s)
    for i in range(segments):
        t0 = start + i * duration_s
        samples = [Sample(t0 + k * window_s, {}) for k in range(1, per_segment + 1)]
        readings = [prometheus_features(api, s.at, selector) for s in samples]
        rows += label_rows(f"{run_id}-{i}", seed + i, t0, samples, readings, truth, {}, window_s)
    return rows


def collection_metadata(source: str, window_s: float, plans: Sequence[RunPlan]) -> dict[str, str]:
    rates = [p.rate for p in plans] or [0.0]
    audits = [p.audit_fraction for p in plans] or [0.0]
    return {
        "source": source,
        "window_s": repr(window_s),
        "feature_names": json.dumps(list(FEATURE_NAMES)),
        "description": (
            f"{len(plans)} runs of {sorted({p.backends for p in plans})} backends, "
            f"round-robin routing, load {min(rates):.0f}-{max(rates):.0f} req/s, audit "
            f"fraction {min(audits):.2f}-{max(audits):.2f}; faults drawn per run "
            "(delay/lie-latency 300-5000 ms and error/byzantine at probability 0.3-1.0, "
            "crash at 0.02-0.3 per request), one healthy node switched to a fault, one "
            "faulty node recovered and one node killed mid-run."
        ),
        "plans": json.dumps([p.describe() for p in plans]),
    }


# --------------------------------------------------------------------------- the command


class CountOrRange(click.ParamType):
    """A number N, or LO-HI (integers) for a value drawn per run; bounds checked."""

    name = "N|LO-HI"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if not isinstance(value, str):
            return value
        lo_text, sep, hi_text = value.partition("-")
        try:
            numbers = [float(lo_text)] + ([float(hi_text)] if sep else [])
        except ValueError:
            self.fail(f"{value!r} is neither a number nor a range LO-HI", param, ctx)
        if any(not self.low <= n <= self.high for n in numbers):
            self.fail(f"{value!r} is outside {self.low}-{self.high}", param, ctx)
        if not sep:
            n = numbers[0]
            return int(n) if n.is_integer() else n
        lo, hi = numbers
        if not (lo.is_integer() and hi.is_integer() and lo <= hi):
            self.fail(f"range {value!r} needs integers LO <= HI", param, ctx)
        return (int(lo), int(hi))


def _echo(message: str) -> None:
    click.echo(message, err=True)


@click.command("collect")
@click.option(
    "--out",
    type=OutputPath(),
    required=True,
    help="Parquet file to write.",
)
@click.option(
    "--source",
    type=click.Choice(["prometheus", "balancer"]),
    default="prometheus",
    help="Where the written rows are read: Prometheus's HTTP API or the balancer's /trust.",
)
@click.option(
    "--cross-check/--no-cross-check",
    default=True,
    help="Live mode: also read the other source and report whether the rows agree.",
)
@click.option(
    "--runs",
    type=click.IntRange(1, 1000),
    default=12,
    help="Runs to collect (attach mode: consecutive watches of --duration each).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    help="Seed of the first run; run i uses seed+i (fault assignment, chaos, load).",
)
@click.option(
    "--backends",
    type=CountOrRange(3, 30),
    default=str(BACKENDS),
    show_default=True,
    help="Backends per run, or LO-HI to draw per run (e.g. 3-6).",
)
@click.option(
    "--duration",
    type=FiniteFloat(min=1.0, max=3600.0),
    default=45.0,
    help="Seconds per run (live) or seconds to watch (attached).",
)
# The balancer's own --window (its bounds and default); rows are one window apart.
@click_option("window_s", BalancerTunables.model_fields["window_s"])
@click.option(
    "--rate",
    type=CountOrRange(1, 5000),
    default=None,
    help="Requests per second, or LO-HI to draw per run; default drawn per run from "
    f"{RATE_DRAWN[0]}-{RATE_DRAWN[1]}.",
)
@click.option(
    "--scrape-interval",
    type=FiniteFloat(min=0.05, max=0.3),
    default=0.15,
    help="Live mode: scrape interval of the local Prometheus (below the 0.5 s trust tick).",
)
@click.option(
    "--prometheus",
    "prometheus_url",
    default=None,
    help="Attach mode: read a running balancer's windows from this Prometheus (no clusters).",
)
@click.option(
    "--selector",
    default="",
    help='Attach mode: PromQL label matchers narrowing the series, e.g. namespace="twlb".',
)
@click.option(
    "--control-token",
    default=None,
    help="Attach mode: bearer token of the backends' /control/fault (the ground truth).",
)
@click.option("--run-id", default=None, help="Attach mode: run id of the rows.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep cluster logs and state here (default: a temporary directory).",
)
def collect_command(
    out: Path,
    source: str,
    cross_check: bool,
    runs: int,
    seed: int,
    backends: int | tuple[int, int],
    duration: float,
    window_s: float,
    rate: float | tuple[int, int] | None,
    scrape_interval: float,
    prometheus_url: str | None,
    selector: str,
    control_token: str | None,
    run_id: str | None,
    workdir: Path | None,
) -> None:
    """Record labelled feature windows (live chaos runs, or a running balancer's Prometheus)."""
    from twlb.balancer.features import FEATURE_NAMES
    from twlb.ml.dataset import write_rows
    from twlb.orchestration.prometheus import PrometheusUnavailable, find_prometheus

    if prometheus_url is not None:
        if not control_token:
            raise click.UsageError("--prometheus needs --control-token to read the ground truth")
        if source != "prometheus":
            raise click.UsageError("--prometheus reads from Prometheus: drop --source balancer")
        rid = run_id or f"attached-{int(time.time())}"
        try:
            rows = collect_attached(
                prometheus_url, control_token, duration, window_s, rid, seed, runs, selector, _echo
            )
        except (PrometheusUnavailable, RuntimeError, PermissionError) as err:
            raise click.ClickException(str(err)) from None
        meta = {"source": "prometheus", "window_s": repr(window_s), "description": "attached"}
        write_rows(out, rows, FEATURE_NAMES, meta)
        _echo(f"wrote {len(rows)} rows to {out}")
        return
    if control_token or run_id or selector:
        raise click.UsageError("--control-token, --run-id and --selector need --prometheus URL")
    tick = BalancerSettings.model_fields["trust_tick_s"].default
    if window_s < tick:
        raise click.BadParameter(
            f"{window_s:g} s is shorter than the balancer's trust tick ({tick:g} s): rows one "
            "window apart would read the same tick",
            param_hint="--window",
        )
    sources = ["prometheus", "balancer"] if cross_check else [source]
    if "prometheus" in sources:
        try:
            find_prometheus()
        except PrometheusUnavailable as err:
            raise click.UsageError(str(err)) from None
    plans = [plan_run(seed + i, backends, duration, window_s, rate) for i in range(runs)]
    written: list = []
    agree = total = 0
    for plan in plans:
        result = run_live(
            plan,
            sources,
            workdir=workdir,
            scrape_interval_s=scrape_interval,
            log=_echo,
        )
        written += result.rows[source]
        if cross_check:
            other = result.rows["balancer" if source == "prometheus" else "prometheus"]
            mine = result.rows[source]
            same = len(set(mine) & set(other))
            agree += same
            total += max(len(mine), len(other))
    write_rows(out, written, FEATURE_NAMES, collection_metadata(source, window_s, plans))
    counts = Counter(r.label for r in written)
    summary = {"rows": len(written), "runs": runs, "labels": dict(sorted(counts.items()))}
    if cross_check:
        summary["sources_agree"] = f"{agree}/{total}"
    _echo(f"wrote {out}: {json.dumps(summary)}")
