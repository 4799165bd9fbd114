"""The balancer's core: the decisions of one balancer, over its fleet and sans-IO cores.

A `Balancer` holds the fleet (`fleet.py`: one record per backend), the policy, health
tracker, trust engine, auditor (`audit.py`) and retry budget, and drives them with the
clock it is given (`time.monotonic` by default). Its parts by job:

- membership: `add_backend`, `remove_backend` apply a change of the fleet to every core;
- the request path: `route` picks, tries and retries, `maybe_audit` cross-checks an
  answer, `quorum_read` asks until enough backends agree, all through the upstream
  transport it is given (`upstream.BackendPool` by default);
- the decisions the event loops feed, each callable in memory with a time:
  `on_health_check`, `apply_gossip`, `tick`, `update_trust`;
- views: `trust_report` (GET /trust) and `live_view` (the metrics' gauges).

The loops themselves (health checks, gossip polls, the tick, file reloads) are the
`runner.Runner` that `start` sets going and `stop` ends. Tests drive the core in memory
with a fake clock and a fake transport; the HTTP server and the API (`app.py`, `api.py`)
are built around an existing `Balancer`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from twlb.balancer import tls
from twlb.balancer.audit import Auditor, AuditResult, answer_digest, compare_answers
from twlb.balancer.evidence import EvidenceRule
from twlb.balancer.fleet import Fleet
from twlb.balancer.health import HealthTracker
from twlb.balancer.memory import MemoryBudget
from twlb.balancer.metrics import BalancerMetrics, LiveView
from twlb.balancer.oracle import OracleTruthError, load_oracle_truth
from twlb.balancer.policies import make_policy
from twlb.balancer.runner import GOSSIP_VIEW_LIMITS, Pool, Runner
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.settings import IDEMPOTENT_METHODS, BalancerSettings
from twlb.balancer.trust import ChangeKind, EjectionReason, TrustChange, TrustEngine
from twlb.balancer.upstream import (
    BackendPool,
    UpstreamConnectError,
    UpstreamOverBudget,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from twlb.gossip.verdict import GossipVerdicts

from twlb.budget import RetryBudget
from twlb.outcome import CONNECT_ERROR, ERROR, SUCCESS, TIMEOUT, Outcome
from twlb.spec import NodeClass, PolicyName

if TYPE_CHECKING:  # onnxruntime is heavy to import: only a balancer given --model loads it
    from twlb.balancer.model_reload import ModelReloader

log = logging.getLogger("twlb.balancer")
T = TypeVar("T")

#: Seconds without a change of the fleet, beyond one feature window (by then every new
#: backend's window holds all its buckets), after which `fleet_settled` is called.
FLEET_SETTLED_S = 1.0

#: One backend's connection pool, as the core uses it (`upstream.BackendPool`).
Upstream = Pool


@dataclass(slots=True)
class TryResult:
    """One try against one backend."""

    backend: str
    outcome: Outcome
    response: UpstreamResponse | None
    latency_s: float
    detail: str = ""  # why there is no usable answer, when the caller should be told
    # Given up by the balancer itself (its memory budget): says nothing of the backend.
    over_budget: bool = False
    tries: int = 1  # tries the request took, this one included (`route` sets it)


class Balancer:
    """The decisions of one balancer; its request path and its loops drive the cores."""

    def __init__(
        self,
        settings: BalancerSettings,
        *,
        clock: Callable[[], float] = monotonic,
        transport: Callable[[str], Upstream] | None = None,
        health_transport: Callable[[str], Upstream] | None = None,
        gossip_transport: Callable[[str], Upstream] | None = None,
        fleet_settled: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        # Read on every request: plain attributes (a settings model's are slower to read).
        self._try_timeout_s = settings.try_timeout_s
        self._max_tries = settings.max_tries
        # Called from the tick once the fleet has not changed for a feature window plus
        # FLEET_SETTLED_S (the process uses it to take the fleet's objects out of the
        # cyclic collector's generations; see services/balancer/cli.py).
        self.fleet_settled = fleet_settled
        self._fleet_changed_at: float | None = None
        self._next_trust: float | None = None  # the first tick updates trust
        # The clock every core is driven with, and the factory of one backend's upstream
        # connection pool: tests give a fake clock and a transport that lies, stalls, drops.
        self.clock = clock
        # Request and answer bytes in flight, for the whole process (memory.py).
        self.memory = MemoryBudget(settings.memory_budget_bytes)
        # https:// backends are reached with one TLS context (tls.py), made on first use.
        self._tls: ssl.SSLContext | None = None
        self.transport = transport or partial(
            self._pool, limits=settings.upstream_limits, budget=self.memory
        )
        # Health checks go through pools of their own with small caps: a /healthz answer is
        # read to at most health_max_bytes under one deadline that trickled bytes cannot
        # extend (the pool's deadline covers connect, send and the whole answer).
        self.health_transport = health_transport or partial(
            self._pool, max_idle=1, limits=settings.health_limits
        )
        # Gossip views likewise.
        self.gossip_transport = gossip_transport or partial(
            self._pool, max_idle=1, limits=GOSSIP_VIEW_LIMITS
        )
        now = self.clock()
        self.fleet = Fleet(
            window_s=settings.window_s, resolution_s=min(0.25, settings.window_s / 4)
        )
        # The records by URL (the fleet's own mapping): what the request path looks up.
        self._records = self.fleet.records
        self.health = HealthTracker(
            healthy_threshold=settings.healthy_threshold,
            unhealthy_threshold=settings.unhealthy_threshold,
        )
        self.engine = TrustEngine(
            HeuristicScorer(),
            evidence_rule=EvidenceRule(
                backoff_s=settings.liar_backoff_s,
                max_backoff_s=max(settings.liar_backoff_s, 3600.0),
            ),
        )
        self.truth: dict[str, str] = {}
        self._truth_mtime: float | None = None
        if settings.oracle_truth is not None:
            self._reload_truth()
        self.policy = make_policy(
            settings.policy.value,
            seed=settings.seed,
            weights=None,
            hash_algorithm=settings.hash_algorithm,
            vnodes=settings.vnodes,
            balance_factor=settings.balance_factor,
            maglev_table_size=settings.maglev_table_size,
            trust_engine=self.engine,
            truth=self.truth_of,
            latency_weighting=settings.latency_weighting,
            slow_start_s=settings.slow_start_s,
        )
        # The hashing policies route by the request's key (header, else ?key=).
        self.wants_key = self.policy.keyed
        self.budget = RetryBudget(ratio=settings.retry_budget)
        self.rng = random.Random(settings.seed)
        self.auditor = Auditor(
            self.fleet,
            self.engine,
            self.rng,
            fraction=settings.audit_fraction,
            probation_fraction=settings.probation_audit_fraction,
            suspect_fraction=settings.suspect_audit_fraction,
            by_standing=settings.policy is PolicyName.TRUST,
            ignore_fields=settings.audit_ignore_fields,
        )
        self.metrics = BalancerMetrics(self.live_view, self.memory)
        self.model: ModelReloader | None = None
        if settings.model is not None:
            from twlb.balancer.model_reload import ModelReloader

            # Without a model file the documented heuristic scores; with one, the model does,
            # and a changed file is swapped in before a trust update (`reload_files`), or
            # refused, keeping this one.
            self.model = ModelReloader(
                settings.model, on_load=self.engine.set_scorer, registry=self.metrics.registry
            )
            self.model.load_initial()
        for url in settings.backends:  # the fleet it starts with is in rotation
            self.fleet.add(url, self.transport(url), self.metrics.backend(url), up=True)
        self._sync_cores(now)
        self.gossip = GossipVerdicts()
        self._background: set[asyncio.Task] = set()
        # The loop the balancer runs in, kept at start: asyncio.ensure_future() asks for
        # the running loop, a getpid() system call on Python 3.11, and an audit makes
        # three tasks (docs/DESIGN.md, the proxy's hot path).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Runner | None = None
        #: Called with every audit's verdict and the request it audited (`replicas.py`
        #: keeps the requests that exposed a backend, to share with peer replicas).
        self.audit_listeners: list[Callable[[AuditResult, str, bytes, list], None]] = []
        # Readiness (GET /readyz): not while the evidence of peers and of the last run is
        # still being taken in at start, nor while draining, nor without a backend up.
        self.warming = False
        self.draining = False

    @property
    def backends(self) -> list[str]:
        """Every backend's URL, in the order they joined."""
        return self.fleet.urls

    @property
    def up(self) -> list[str]:
        """The backends in rotation by health, in fleet order."""
        return self.fleet.up

    def _pool(self, url: str, **options: Any) -> BackendPool:
        """A connection pool to one backend (TLS for an https:// one)."""
        tls_context = None
        if url.startswith("https://"):
            if self._tls is None:
                self._tls = tls.client_context(self.settings)
            tls_context = self._tls
        return BackendPool(url, tls=tls_context, **options)

    def readiness(self) -> tuple[bool, str]:
        """Whether this balancer should be sent traffic (`/readyz`), and why not."""
        if self.draining:
            return False, "draining: the balancer is stopping"
        if self.warming:
            return False, "taking in the evidence of its peers and of its last run"
        if not self.fleet.up:
            return False, "no backend is up" if self.fleet.urls else "no backends configured"
        return True, "ready"

    def truth_of(self, backend: str) -> NodeClass:
        """The oracle's ground truth; a backend missing from the file counts as healthy."""
        return NodeClass(self.truth.get(backend, NodeClass.HEALTHY))

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Set the loops going (`runner.Runner`) in the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._fleet_changed_at = self.clock()  # the fleet starts: it settles in a window
        self._runner = Runner(self, self.health_transport, self.gossip_transport)
        self._runner.start()

    async def stop(self) -> None:
        """End the loops and the audits still running; close every connection."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.stop()
        background = list(self._background)
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._background.clear()
        self._loop = None  # a balancer driven again later may be in another loop
        for rec in self.fleet:
            rec.pool.close()

    def _task(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        loop = self._loop
        if loop is None:  # driven without start(), as the in-memory tests do
            loop = asyncio.get_running_loop()
        return loop.create_task(coro, name=name)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._keep(self._task(coro, name))

    def _keep(self, task: asyncio.Task) -> None:
        """Hold a reference to `task` until it ends (the loop keeps only weak ones); stop()
        cancels what is left."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- membership
    def add_backend(self, url: str) -> bool:
        """Put a backend into the fleet (normalized URL); False if it is there already."""
        if url in self._records:
            return False
        now = self.clock()
        self.fleet.add(url, self.transport(url), self.metrics.backend(url))
        self._fleet_changed(now)
        if self._runner is not None:
            self._runner.backend_added(url)
        return True

    def remove_backend(self, url: str) -> bool:
        """Take a backend out of the fleet; False if it is not in it."""
        rec = self.fleet.remove(url)
        if rec is None:
            return False
        now = self.clock()
        rec.pool.close()
        self.metrics.forget(url)
        if self._runner is not None:
            self._runner.backend_removed(url)
        self._fleet_changed(now)
        return True

    def _sync_cores(self, now: float) -> None:
        """Give every core the fleet's backend list (each keeps what it knows of those it
        had)."""
        backends = list(self.fleet.urls)
        self.health.set_backends(backends, now)
        self.engine.set_backends(backends, now)
        self.policy.set_backends(backends, now)

    def _fleet_changed(self, now: float) -> None:
        self._fleet_changed_at = now
        self._sync_cores(now)
        self._refresh_up()

    def _refresh_up(self) -> None:
        # The hot path reads the fleet's `up`; it is rebuilt after every health event that
        # can change a state (checks, ticks, failed tries), not on every request.
        left, joined = self.fleet.set_up(self.health.up(self.fleet.urls))
        if left or joined:
            now = self.clock()
            self._publish(
                [
                    *(TrustChange(ChangeKind.EJECTION, b, now, EjectionReason.HEALTH)
                      for b in left),
                    *(TrustChange(ChangeKind.READMISSION, b, now, None, {"by": "health"})
                      for b in joined),
                ]
            )  # fmt: skip

    def _publish(self, changes: list[TrustChange]) -> None:
        """Rotation events as data: one structured log line and a counter each."""
        records = self._records
        for change in changes:
            rec = records.get(change.backend)
            if rec is not None:
                rec.counters.count_change(change)
            log.warning(
                "trust event %s %s", change.kind.value, change.backend,
                extra={"trust_event": change.as_record()},
            )  # fmt: skip

    # ---------------------------------------------------------------- what the loops feed
    def on_health_check(self, backend: str, ok: bool, now: float) -> bool:
        """An active health check of `backend` passed (`ok`) or failed at `now`; False when
        the backend is no longer in the fleet (its checks should end)."""
        rec = self._records.get(backend)
        if rec is None:
            return False
        self.health.on_check(backend, ok, now)
        rec.window.record_health(now, ok)
        if self.health.is_up(backend) != rec.up:
            # Rebuilt only when this backend changed sides: a check is one backend's
            # event, and rebuilding the fleet's list on each of a large fleet's checks
            # (1,000 a second for 1,000 backends) costs a quadratic share of the CPU.
            self._refresh_up()  # logs and counts a change of rotation
        return True

    def apply_gossip(self, answers: dict[str, dict[str, Any] | None], now: float) -> None:
        """One round of gossip views (None: no answer) into verdicts and health."""
        urls = self.fleet.urls
        self.gossip.set_backends(urls)
        for backend, answer in answers.items():
            if backend in self._records:
                self.gossip.on_answer(backend, answer)
        for backend in urls:
            before = self.health.is_up(backend)
            self.health.on_gossip(backend, self.gossip.dead(backend), now)
            after = self.health.is_up(backend)
            if before != after:
                word = "back in rotation" if after else "out of rotation"
                log.warning("backend %s %s: gossip members agree", backend, word)
        self._refresh_up()

    def trust_due(self, now: float) -> bool:
        """Whether the tick at `now` updates trust (every `trust_tick_s`, the first at once)."""
        return self._next_trust is None or now >= self._next_trust

    def tick(self, now: float) -> None:
        """Policy and health ticks, in-flight samples, periodic trust updates, and the
        fleet-settled call once the fleet has not changed for a window."""
        s = self.settings
        self.policy.tick(now)
        self.health.tick(now)
        self._refresh_up()  # logs and counts backends back after their cooldown
        self.fleet.sample_inflight(now)
        if self.trust_due(now):
            self._next_trust = now + s.trust_tick_s
            self.update_trust(now)
        changed = self._fleet_changed_at
        if changed is not None and now - changed >= s.window_s + FLEET_SETTLED_S:
            self._fleet_changed_at = None
            if self.fleet_settled is not None:
                self.fleet_settled()

    def update_trust(self, now: float) -> None:
        """Compute every backend's features over the window and feed the trust engine."""
        began = perf_counter()  # compute time, whatever clock drives the cores
        try:
            features = self.fleet.features(now)
            if features:
                self.engine.update(features, now)
            else:
                self.engine.tick(now)  # back-offs end even before the first window
            self._publish(self.engine.drain_changes())
        finally:
            spent = perf_counter() - began
            self.metrics.trust_tick.observe(spent)
            if spent > self.settings.trust_tick_s:
                self.metrics.trust_tick_overruns += 1

    def reload_files(self) -> None:
        """Re-read the files the balancer follows when they changed: the oracle's truth and
        the trust model (a changed model is swapped in, or refused keeping the one in
        force). The runner calls this before each tick that updates trust."""
        if self.settings.oracle_truth is not None:
            self._reload_truth()
        if self.model is not None:
            self.model.poll()

    def _reload_truth(self) -> None:
        path = self.settings.oracle_truth
        assert path is not None
        try:
            mtime = path.stat().st_mtime
        except OSError as err:
            if self._truth_mtime is None:
                raise OracleTruthError(f"{path}: cannot read: {err.strerror}") from None
            return
        if mtime == self._truth_mtime:
            return
        try:
            truth = load_oracle_truth(path)
        except OracleTruthError:
            if self._truth_mtime is None:
                raise
            log.exception("oracle truth file changed but cannot be used; keeping the old one")
            return
        self.truth = truth
        self._truth_mtime = mtime

    # ---------------------------------------------------------------- evidence
    def export_evidence(self, now: float) -> dict[str, Any]:
        """The fleet's audit evidence as one JSON-ready document, times relative to `now`
        (`evidence.EvidenceBook.export`): what a restarted balancer or a replica imports."""
        return self.engine.evidence.export(now)

    def import_evidence(self, doc: Any, now: float) -> list[str]:
        """Put an evidence document in force for the backends of this fleet it names
        (`TrustEngine.import_evidence`: one proven there is ejected here); returns those.
        ValueError naming what is wrong, with nothing changed, when it is not evidence."""
        taken = self.engine.import_evidence(doc, now)
        self._publish(self.engine.drain_changes())
        return taken

    # ---------------------------------------------------------------- one try
    async def try_backend(
        self, backend: str, method: str, target: bytes, headers: list, body: bytes
    ) -> TryResult:
        """Send one try to `backend` and feed its outcome to every core that learns from it."""
        rec = self._records.get(backend)
        start = self.clock()
        if rec is None:  # removed while the request was being routed
            return TryResult(backend, CONNECT_ERROR, None, 0.0)
        self.policy.on_start(backend, start)
        rec.inflight += 1
        response = None
        detail = ""
        learn = True
        try:
            response = await rec.pool.request(method, target, headers, body, self._try_timeout_s)
            outcome = ERROR if response.status >= 500 else SUCCESS
        except UpstreamOverBudget as err:
            # The balancer's memory budget ran out while the answer arrived: the backend
            # did nothing wrong, so no core learns from the try (another backend's answer
            # may be smaller: it is retried as a failed try is).
            outcome, detail, learn = ERROR, str(err), False
        except UpstreamTimeout:
            outcome = TIMEOUT
        except UpstreamTooLarge as err:
            # A bad upstream: it answered, but over the caps; counted as a 5xx would be.
            outcome, detail = ERROR, str(err)
        except UpstreamConnectError as err:  # why, for the client: refused, TLS, closed
            outcome, detail = CONNECT_ERROR, str(err)
        finally:
            end = self.clock()
            rec.inflight -= 1
        latency = end - start
        if rec.in_fleet:  # not removed while the try was out
            if not learn:  # the policy's count of tries in flight, and nothing else
                self.policy.on_end(backend, end, SUCCESS, latency)
                return TryResult(backend, outcome, None, latency, detail, over_budget=True)
            self.policy.on_end(backend, end, outcome, latency)
            self.health.on_passive(backend, outcome, end)
            if outcome is not SUCCESS:
                # A success only resets the passive run; a failure may take the backend out.
                self._refresh_up()
            rec.window.record_request(end, outcome, latency)
            rec.counters.observe(outcome, latency)
        return TryResult(backend, outcome, response, latency, detail, over_budget=not learn)

    def observe_try(self, backend: str, outcome: Outcome, latency_s: float, now: float) -> bool:
        """A try another proxy sent to `backend` ended at `now` with `outcome` after
        `latency_s`: fed to health, the backend's window and its counters as a try of
        this balancer's own is (`try_backend`). False when the backend is not in the fleet."""
        rec = self._records.get(backend)
        if rec is None:
            return False
        self.health.on_passive(backend, outcome, now)
        if outcome is not SUCCESS:
            self._refresh_up()
        rec.window.record_request(now, outcome, latency_s)
        rec.counters.observe(outcome, latency_s)
        return True

    # ---------------------------------------------------------------- routing
    async def route(
        self, method: str, target: bytes, headers: list, body: bytes, key: str | None
    ) -> tuple[TryResult | None, str]:
        """Pick, try and retry; returns the last try (None if none was sent) and why not."""
        now = self.clock()
        self.budget.record_request(now)
        fleet = self.fleet
        candidates = fleet.up
        if not candidates:
            return None, "no backend is up" if fleet.urls else "no backends configured"
        tried: list[str] = []
        last: TryResult | None = None
        retryable = method in IDEMPOTENT_METHODS
        for attempt in range(self._max_tries):
            if attempt:
                candidates = [b for b in fleet.up if b not in tried]
                if not candidates:
                    break
                if not self.budget.try_withdraw(self.clock()):
                    self.metrics.retries_refused += 1
                    break
                self.metrics.retries += 1
            backend = self.policy.pick(candidates, self.clock(), key)
            if backend is None:
                if last is None:
                    return None, f"policy {self.settings.policy.value} picked no backend"
                break
            last = await self.try_backend(backend, method, target, headers, body)
            last.tries = attempt + 1
            if last.outcome is SUCCESS or not retryable:
                break
            tried.append(backend)
        return last, ""

    # ---------------------------------------------------------------- audits
    def maybe_audit(
        self,
        method: str,
        target: bytes,
        headers: list,
        answered: TryResult,
        on_verdict: Callable[[AuditResult], None] | None = None,
    ) -> bool:
        """Cross-check a 2xx answer this balancer proxied, if the auditor draws it
        (`Auditor.draw`: the backend's audit fraction, two peers); the audit runs after
        the answer is on its way, and `on_verdict` is called with its verdict. True when
        an audit started."""
        peers = self.auditor.draw(method, answered.backend)
        if peers is None:
            return False
        self.start_audit(
            method, target, headers, answered.backend, answered.response, peers, on_verdict
        )
        return True

    def start_audit(
        self,
        method: str,
        target: bytes,
        headers: list,
        backend: str,
        response: UpstreamResponse | None,
        peers: list[str],
        on_verdict: Callable[[AuditResult], None] | None = None,
    ) -> None:
        """Cross-check `response`, the answer `backend` gave to `method target`, with the
        `peers` the auditor drew (`Auditor.draw`), in the background. A caller that must
        decode an answer to audit it (the Envoy control plane) draws first and decodes
        only what is drawn."""
        audit = self._audit(method, target, headers, backend, response, peers, on_verdict)
        self._spawn(audit, "twlb-audit")

    async def replay_audit(
        self, backend: str, method: str, target: bytes, headers: list
    ) -> AuditResult | None:
        """Audit `backend` on a request of one's own choosing: ask it, and two voters
        (widened on a split), what `method target` answers, and judge as any audit. How a
        replica checks a peer's claim against a backend with evidence of its own (the
        requests that exposed it, replayed: replicas.py). None when it cannot be audited
        now (not in the fleet, not an audited method, fewer than two voters besides)."""
        if backend not in self._records or method not in self.auditor.methods:
            return None
        others = self.auditor.voters(exclude={backend})
        if len(others) < 2:
            return None
        peers = self.rng.sample(others, 2)
        asked = await self.try_backend(backend, method, target, headers, b"")
        return await self._audit(method, target, headers, backend, asked.response, peers)

    async def _audit(
        self,
        method: str,
        target: bytes,
        headers: list,
        backend: str,
        response: UpstreamResponse | None,
        peers: list[str],
        on_verdict: Callable[[AuditResult], None] | None = None,
    ) -> AuditResult:
        """Ask the peers what `backend` was asked; the auditor's `Ballot` says whom to ask
        more (every other voter, once the answers split) and when the answers in hand
        decide it (a voter slow to answer, up to its try timeout, does not hold up a
        verdict the others have decided: the liar keeps answering meanwhile)."""
        ignore = self.auditor.ignore
        ballot = self.auditor.ballot(backend, answer_digest(response, ignore), peers)
        pending = {self._try_task(b, method, target, headers) for b in peers}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                t = task.result()
                ballot.vote(t.backend, answer_digest(t.response, ignore))
            more = ballot.more()
            if more:
                pending |= {self._try_task(b, method, target, headers) for b in more}
            if ballot.decided:
                break
        for task in pending:  # answers no longer needed still feed health and windows
            self._keep(task)
        verdict = self._count(ballot.judge(self.clock()))
        for listener in self.audit_listeners:
            listener(verdict, method, target, headers)
        if on_verdict is not None:
            on_verdict(verdict)
        return verdict

    def _try_task(self, backend: str, method: str, target: bytes, headers: list) -> asyncio.Task:
        return self._task(self.try_backend(backend, method, target, headers, b""))

    def judge(
        self, answers: dict[str, str | None], quorum: int, absolute: bool = False
    ) -> AuditResult:
        """The auditor's verdict on `answers` (backend to digest) at this moment, counted."""
        return self._count(self.auditor.judge(answers, quorum, self.clock(), absolute))

    def _count(self, verdict: AuditResult) -> AuditResult:
        """Count a verdict, and log and count the rotation events it caused."""
        audits = self.metrics.audits
        if verdict.quorum_met:
            audits["mismatch" if verdict.odd else "agreed"] += 1
            self._publish(self.engine.drain_changes())
        else:
            audits["no_quorum"] += 1
        return verdict

    async def quorum_read(
        self, method: str, target: bytes, headers: list, body: bytes, quorum: int
    ) -> tuple[TryResult | None, str]:
        """Ask backends until `quorum` agree on the body; never return a minority answer."""
        candidates = list(self.fleet.up)
        if len(candidates) < quorum:
            return None, f"quorum {quorum} needs {quorum} backends up, {len(candidates)} are"
        self.rng.shuffle(candidates)
        now = self.clock()
        self.budget.record_request(now)
        # The policy picks the first askers (a trust policy prefers trusted backends); the
        # rest, in random order, are asked one by one only while there is no agreement.
        first: list[str] = []
        for _ in range(quorum):
            b = self.policy.pick(candidates, now, None) or candidates[0]
            first.append(b)
            candidates.remove(b)
        tries = list(
            await asyncio.gather(
                *(self.try_backend(b, method, target, headers, body) for b in first)
            )
        )
        ignore = self.auditor.ignore
        answers = {t.backend: answer_digest(t.response, ignore) for t in tries}
        while not compare_answers(answers, quorum=quorum).quorum_met and candidates:
            extra = candidates.pop(0)
            t = await self.try_backend(extra, method, target, headers, body)
            tries.append(t)
            answers[t.backend] = answer_digest(t.response, ignore)
        verdict = self.judge(answers, quorum)
        if not verdict.quorum_met:
            return None, f"no {quorum} backends agreed: {verdict.reason}"
        chosen = next(t for t in tries if t.backend == verdict.majority[0])
        return chosen, ""

    # ---------------------------------------------------------------- views
    def live_view(self) -> LiveView:
        urls = self.fleet.urls
        return LiveView(
            trust={b: float(self.engine.weight(b)) for b in urls},
            up={b: self.health.is_up(b) for b in urls},
            features={r.url: r.features for r in self.fleet if r.features is not None},
            held={b: self.engine.is_held(b) for b in urls},
        )

    def trust_report(self) -> dict[str, Any]:
        rows = []
        for rec in self.fleet:
            b = rec.url
            rows.append(
                {
                    "url": b,
                    **self.engine.row(b),  # weight, state, held, proven, evidence, ...
                    "health": self.health.describe(b),
                    "up": self.health.is_up(b),
                    "gossip": self.gossip.verdict(b),
                    "features": rec.features if rec.features is not None else {},
                    "policy": _jsonable(self.policy.describe(b)),
                    "inflight": rec.inflight,
                }
            )
        return {
            "backends": rows,
            "policy": self.settings.policy.value,
            "window_s": self.settings.window_s,
            "audit_fraction": self.settings.audit_fraction,
            "model": self.engine.describe(),
        }


def _jsonable(value: Any) -> Any:
    """Enums, dataclasses and numpy scalars as plain JSON values."""
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=str))
