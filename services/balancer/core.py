"""The balancer's core: all live state of one balancer, driving the sans-IO cores.

A `Balancer` holds the fleet, one upstream pool per backend, the policy, health tracker,
feature windows, trust engine and retry budget, and drives them with the clock it is
given (`time.monotonic` by default). It routes with retries, audits and answers quorum
reads through the upstream transport it is given (`upstream.BackendPool` by default), so
tests can run it in memory with a fake transport and a fake clock. The HTTP server and
the API (`app.py`, `api.py`) are built around an existing `Balancer`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson
from twlb.balancer.audit import AuditResult, answers_split, compare_answers, widen
from twlb.balancer.evidence import EvidenceRule
from twlb.balancer.features import FleetWindows
from twlb.balancer.health import HealthTracker
from twlb.balancer.memory import MemoryBudget
from twlb.balancer.metrics import BackendCounters, BalancerMetrics, LiveView
from twlb.balancer.oracle import OracleTruthError, load_oracle_truth
from twlb.balancer.policies import make_policy
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.settings import IDEMPOTENT_METHODS, BalancerSettings
from twlb.balancer.trust import ChangeKind, EjectionReason, TrustChange, TrustEngine
from twlb.balancer.upstream import (
    BackendPool,
    UpstreamConnectError,
    UpstreamError,
    UpstreamLimits,
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

#: Caps on one backend's /gossip answer (a membership view of up to ~1,000 members).
GOSSIP_VIEW_LIMITS = UpstreamLimits(
    max_head_bytes=16 * 1024, max_headers=50, max_body_bytes=1 << 20
)

#: Audits cross-check only safe methods: the extra calls must not change anything.
AUDITED_METHODS = frozenset({"GET"})

#: Seconds without a change of the fleet, beyond one feature window (by then every new
#: backend's window holds all its buckets), after which `fleet_settled` is called.
FLEET_SETTLED_S = 1.0


class Upstream(Protocol):
    """One backend's connection pool, as the core uses it (`upstream.BackendPool`)."""

    async def request(
        self, method: str, target: bytes, headers: list, body: bytes, timeout: float
    ) -> UpstreamResponse: ...

    def close(self) -> None: ...


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


class Balancer:
    """All live state of one balancer; the server's I/O drives its sans-IO cores."""

    def __init__(
        self,
        settings: BalancerSettings,
        *,
        clock: Callable[[], float] = monotonic,
        transport: Callable[[str], Upstream] | None = None,
        health_transport: Callable[[str], Upstream] | None = None,
        fleet_settled: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        # Read on every request: plain attributes (a settings model's are slower to read).
        self._try_timeout_s = settings.try_timeout_s
        self._max_tries = settings.max_tries
        self._audit_fractions = (
            settings.audit_fraction,
            settings.probation_audit_fraction,
            settings.suspect_audit_fraction,
        )
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
        self.transport = transport or partial(
            BackendPool, limits=settings.upstream_limits, budget=self.memory
        )
        # Health checks go through pools of their own with small caps: a /healthz answer is
        # read to at most health_max_bytes under one deadline that trickled bytes cannot
        # extend (the pool's deadline covers connect, send and the whole answer).
        self.health_transport = health_transport or partial(
            BackendPool, max_idle=1, limits=settings.health_limits
        )
        now = self.clock()
        self.backends: list[str] = list(settings.backends)
        self.pools: dict[str, Upstream] = {b: self.transport(b) for b in self.backends}
        self.inflight: dict[str, int] = dict.fromkeys(self.backends, 0)
        self.health = HealthTracker(
            healthy_threshold=settings.healthy_threshold,
            unhealthy_threshold=settings.unhealthy_threshold,
        )
        self.health.set_backends(self.backends, now)
        self.up: list[str] = list(self.backends)
        self.windows = FleetWindows(
            window_s=settings.window_s, resolution_s=min(0.25, settings.window_s / 4)
        )
        self.windows.set_backends(self.backends)
        self.engine = TrustEngine(
            HeuristicScorer(),
            evidence_rule=EvidenceRule(
                backoff_s=settings.liar_backoff_s,
                max_backoff_s=max(settings.liar_backoff_s, 3600.0),
            ),
        )
        self.engine.set_backends(self.backends, now)
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
        self.policy.set_backends(list(self.backends), now)
        # The hashing policies route by the request's key (header, else ?key=).
        self.wants_key = self.policy.keyed
        self._audit_probation = settings.policy is PolicyName.TRUST
        self.budget = RetryBudget(ratio=settings.retry_budget)
        self.rng = random.Random(settings.seed)
        self._ignore = frozenset(settings.audit_ignore_fields)
        self.features: dict[str, dict[str, float]] = {}
        self.metrics = BalancerMetrics(self.live_view, self.memory)
        self.model: ModelReloader | None = None
        if settings.model is not None:
            from twlb.balancer.model_reload import ModelReloader

            # Without a model file the documented heuristic scores; with one, the model does,
            # and a changed file is swapped in by the trust tick (or refused, keeping this one).
            self.model = ModelReloader(
                settings.model, on_load=self.engine.set_scorer, registry=self.metrics.registry
            )
            self.model.load_initial()
        self._counters: dict[str, BackendCounters] = {
            b: self.metrics.backend(b) for b in self.backends
        }
        self._health_tasks: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()
        self._tick_task: asyncio.Task | None = None
        # The loop the balancer runs in, kept at start: asyncio.ensure_future() asks for
        # the running loop, a getpid() system call on Python 3.11, and an audit makes
        # three tasks (docs/DESIGN.md, the proxy's hot path).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_pools: dict[str, Upstream] = {}
        self._health_slots: asyncio.Semaphore | None = None
        self._running = False
        self.gossip = GossipVerdicts()
        self._gossip_pools: dict[str, Upstream] = {}

    def truth_of(self, backend: str) -> NodeClass:
        """The oracle's ground truth; a backend missing from the file counts as healthy."""
        return NodeClass(self.truth.get(backend, NodeClass.HEALTHY))

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._fleet_changed_at = self.clock()  # the fleet starts: it settles in a window
        self._health_slots = asyncio.Semaphore(self.settings.health_concurrency)
        for b in self.backends:
            self._start_health(b)
        self._tick_task = asyncio.create_task(self._tick_loop(), name="twlb-balancer-tick")
        if self.settings.gossip_poll_s > 0:
            self._spawn(self._gossip_loop(), "twlb-balancer-gossip")

    async def stop(self) -> None:
        tasks = [*self._health_tasks.values(), *self._background]
        if self._tick_task is not None:
            tasks.append(self._tick_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._health_tasks.clear()
        self._background.clear()
        self._running = False
        self._loop = None  # a balancer driven again later may be in another loop
        for pool in [
            *self.pools.values(),
            *self._health_pools.values(),
            *self._gossip_pools.values(),
        ]:
            pool.close()
        self._health_pools.clear()
        self._gossip_pools.clear()

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

    # ---------------------------------------------------------------- backends
    def add_backend(self, url: str) -> bool:
        """Put a backend into the fleet (normalized URL); False if it is there already."""
        if url in self.pools:
            return False
        now = self.clock()
        self.backends.append(url)
        self.pools[url] = self.transport(url)
        self.inflight[url] = 0
        self._counters[url] = self.metrics.backend(url)
        self._sync_backends(now)
        if self._running:
            self._start_health(url)
        return True

    def remove_backend(self, url: str) -> bool:
        """Take a backend out of the fleet; False if it is not in it."""
        if url not in self.pools:
            return False
        now = self.clock()
        self.backends.remove(url)
        self.pools.pop(url).close()
        self.inflight.pop(url, None)
        self._counters.pop(url, None)
        self.metrics.forget(url)
        self.features.pop(url, None)
        task = self._health_tasks.pop(url, None)
        if task is not None:
            task.cancel()
        for side_pools in (self._health_pools, self._gossip_pools):
            side_pool = side_pools.pop(url, None)
            if side_pool is not None:
                side_pool.close()
        self._sync_backends(now)
        return True

    def _sync_backends(self, now: float) -> None:
        self._fleet_changed_at = now
        backends = list(self.backends)
        self.health.set_backends(backends, now)
        self.windows.set_backends(backends)
        self.engine.set_backends(backends, now)
        self.policy.set_backends(backends, now)
        self._refresh_up()

    def _refresh_up(self) -> None:
        # The hot path reads this list; it is rebuilt after every health event that can
        # change a state (checks, ticks, failed tries), not on every request.
        before = set(self.up)
        self.up = self.health.up(self.backends)
        if len(self.up) != len(before) or not before.issuperset(self.up):
            now = self.clock()
            after = set(self.up)
            self._publish(
                [
                    *(TrustChange(ChangeKind.EJECTION, b, now, EjectionReason.HEALTH)
                      for b in self.backends if b in before and b not in after),
                    *(TrustChange(ChangeKind.READMISSION, b, now, None, {"by": "health"})
                      for b in self.backends if b in after and b not in before),
                ]
            )  # fmt: skip

    def _publish(self, changes: list[TrustChange]) -> None:
        """Rotation events as data: one structured log line and a counter each."""
        for change in changes:
            counters = self._counters.get(change.backend)
            if counters is not None:
                counters.count_change(change)
            log.warning("trust event %s", orjson.dumps(change.as_record()).decode())

    # ---------------------------------------------------------------- background loops
    def _start_health(self, backend: str) -> None:
        self._health_tasks[backend] = asyncio.create_task(
            self._health_loop(backend), name=f"twlb-health {backend}"
        )

    async def _health_loop(self, backend: str) -> None:
        """Active heartbeat: GET /healthz every interval, fed to health and the window.

        Each backend's checks start at its own offset within the interval (so a large fleet
        is not checked in one burst) and at most `health_concurrency` run at once; a check
        reads at most `health_max_bytes` and must end within `health_timeout_s`.
        """
        assert self._health_slots is not None
        pool = self._health_pools[backend] = self.health_transport(backend)
        interval = self.settings.health_interval_s
        timeout = self.settings.health_timeout_s
        await asyncio.sleep(random.Random(f"{self.settings.seed}:{backend}").random() * interval)
        while True:
            started = self.clock()
            async with self._health_slots:
                try:
                    r = await pool.request("GET", b"/healthz", [], b"", timeout)
                    ok = r.status == 200
                except UpstreamError:
                    ok = False
            now = self.clock()
            if backend not in self.pools:
                return
            self.health.on_check(backend, ok, now)
            self.windows[backend].record_health(now, ok)
            if self.health.is_up(backend) != (backend in self.up):
                # Rebuilt only when this backend changed sides: a check is one backend's
                # event, and rebuilding the fleet's list on each of a large fleet's checks
                # (1,000 a second for 1,000 backends) costs a quadratic share of the CPU.
                self._refresh_up()  # logs and counts a change of rotation
            await asyncio.sleep(max(0.0, interval - (self.clock() - started)))

    # ---------------------------------------------------------------- gossip
    async def _gossip_loop(self) -> None:
        """Read every backend's gossip view; act on what the members agree on."""
        interval = self.settings.gossip_poll_s
        while True:
            started = self.clock()
            backends = list(self.backends)
            answers = await asyncio.gather(*(self._gossip_view(b) for b in backends))
            try:
                self.apply_gossip(dict(zip(backends, answers, strict=True)), self.clock())
            except Exception:  # a bug here must not stop routing
                log.exception("gossip verdicts failed")
            await asyncio.sleep(max(0.0, interval - (self.clock() - started)))

    async def _gossip_view(self, backend: str) -> dict[str, Any] | None:
        """One backend's /gossip answer, read through a pool of its own capped at
        GOSSIP_VIEW_LIMITS, under the health timeout; None when there is no usable one."""
        pool = self._gossip_pools.get(backend)
        if pool is None:
            pool = self._gossip_pools[backend] = BackendPool(
                backend, max_idle=1, limits=GOSSIP_VIEW_LIMITS
            )
        try:
            r = await pool.request("GET", b"/gossip", [], b"", self.settings.health_timeout_s)
            if r.status != 200:
                return None
            answer = orjson.loads(r.body)
        except (UpstreamError, orjson.JSONDecodeError):
            return None
        return answer if isinstance(answer, dict) else None

    def apply_gossip(self, answers: dict[str, dict[str, Any] | None], now: float) -> None:
        """One round of gossip views (None: no answer) into verdicts and health."""
        self.gossip.set_backends(self.backends)
        for backend, answer in answers.items():
            if backend in self.pools:
                self.gossip.on_answer(backend, answer)
        for backend in self.backends:
            before = self.health.is_up(backend)
            self.health.on_gossip(backend, self.gossip.dead(backend), now)
            after = self.health.is_up(backend)
            if before != after:
                word = "back in rotation" if after else "out of rotation"
                log.warning("backend %s %s: gossip members agree", backend, word)
        self._refresh_up()

    async def _tick_loop(self) -> None:
        """Calls `tick` every policy tick; a bug in one tick must not stop routing for good."""
        while True:
            await asyncio.sleep(self.settings.policy_tick_s)
            try:
                self.tick(self.clock())
            except Exception:
                log.exception("balancer tick failed")

    def tick(self, now: float) -> None:
        """Policy and health ticks, in-flight samples, periodic trust updates, and the
        fleet-settled call once the fleet has not changed for a window."""
        s = self.settings
        self.policy.tick(now)
        self.health.tick(now)
        self._refresh_up()  # logs and counts backends back after their cooldown
        for b, n in self.inflight.items():
            self.windows[b].record_inflight(now, n)
        if self._next_trust is None or now >= self._next_trust:
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
            self._update_trust(now)
        finally:
            spent = perf_counter() - began
            self.metrics.trust_tick.observe(spent)
            if spent > self.settings.trust_tick_s:
                self.metrics.trust_tick_overruns += 1

    def _update_trust(self, now: float) -> None:
        if self.settings.oracle_truth is not None:
            self._reload_truth()
        if self.model is not None:
            self.model.poll()
        self.features = self.windows.features(now)
        if self.features:
            self.engine.update(self.features, now)
        else:
            self.engine.tick(now)  # back-offs end even before the first window
        self._publish(self.engine.drain_changes())

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

    # ---------------------------------------------------------------- one try
    async def try_backend(
        self, backend: str, method: str, target: bytes, headers: list, body: bytes
    ) -> TryResult:
        """Send one try to `backend` and feed its outcome to every core that learns from it."""
        pool = self.pools.get(backend)
        start = self.clock()
        if pool is None:  # removed while the request was being routed
            return TryResult(backend, CONNECT_ERROR, None, 0.0)
        self.policy.on_start(backend, start)
        self.inflight[backend] += 1
        response = None
        detail = ""
        learn = True
        try:
            response = await pool.request(method, target, headers, body, self._try_timeout_s)
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
        except UpstreamConnectError:
            outcome = CONNECT_ERROR
        finally:
            end = self.clock()
            if backend in self.inflight:
                self.inflight[backend] -= 1
        latency = end - start
        if backend in self.pools:
            if not learn:  # the policy's count of tries in flight, and nothing else
                self.policy.on_end(backend, end, SUCCESS, latency)
                return TryResult(backend, outcome, None, latency, detail, over_budget=True)
            self.policy.on_end(backend, end, outcome, latency)
            self.health.on_passive(backend, outcome, end)
            if outcome is not SUCCESS:
                # A success only resets the passive run; a failure may take the backend out.
                self._refresh_up()
            self.windows[backend].record_request(end, outcome, latency)
            self._counters[backend].observe(outcome, latency)
        return TryResult(backend, outcome, response, latency, detail, over_budget=not learn)

    # ---------------------------------------------------------------- routing
    async def route(
        self, method: str, target: bytes, headers: list, body: bytes, key: str | None
    ) -> tuple[TryResult | None, str]:
        """Pick, try and retry; returns the last try (None if none was sent) and why not."""
        now = self.clock()
        self.budget.record_request(now)
        candidates = self.up
        if not candidates:
            return None, "no backend is up" if self.backends else "no backends configured"
        tried: list[str] = []
        last: TryResult | None = None
        retryable = method in IDEMPOTENT_METHODS
        for attempt in range(self._max_tries):
            if attempt:
                candidates = [b for b in self.up if b not in tried]
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
            if last.outcome is SUCCESS or not retryable:
                break
            tried.append(backend)
        return last, ""

    def maybe_audit(self, method: str, target: bytes, headers: list, answered: TryResult) -> None:
        """With probability audit_fraction, cross-check a 2xx answer on two more backends.

        Under the trust policy audits go where they pay (while audits are on): every answer
        of a suspect (an audit found it the odd one out, and the evidence has not cleared
        or proven it yet; `suspect_audit_fraction`), and more of a backend in probation
        (`probation_audit_fraction`), so one still lying when it (re)joins is seen soon.
        """
        fraction, probation, suspect = self._audit_fractions
        if self._audit_probation:
            fraction = self.engine.audit_fraction(answered.backend, fraction, probation, suspect)
        if not fraction or method not in AUDITED_METHODS or self.rng.random() >= fraction:
            return
        others = self._voters(exclude={answered.backend})
        if len(others) < 2:
            return
        peers = self.rng.sample(others, 2)
        self._spawn(self._audit(method, target, headers, answered, peers), "twlb-audit")

    def _voters(self, exclude: set[str]) -> list[str]:
        """Backends whose answer may vote in an audit: up, not proven liars."""
        return [b for b in self.up if b not in exclude and not self.engine.is_proven(b)]

    async def _audit(
        self, method: str, target: bytes, headers: list, answered: TryResult, peers: list[str]
    ) -> None:
        """Ask the peers; as soon as an answer differs from the audited one, widen the audit
        to every other voter, and judge once the answers in hand decide it.

        Two colluders can be two of three voters, so nobody is charged on a split before
        the others have voted too (a widened verdict needs an absolute majority). A voter
        that is slow to answer (a delay node, up to its try timeout) does not hold up a
        verdict the others have already decided: the liar keeps answering meanwhile.
        """
        tries = [answered]
        answers = {answered.backend: answer_digest(answered.response, self._ignore)}
        asked = {answered.backend, *peers}
        pending = {self._try_task(b, method, target, headers) for b in peers}
        widened = False
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                t = task.result()
                tries.append(t)
                answers[t.backend] = answer_digest(t.response, self._ignore)
            if not widened and answers_split(answers):
                widened = True
                more = self._voters(exclude=asked)
                self.rng.shuffle(more)
                more = widen(asked, more)
                asked.update(more)
                pending |= {self._try_task(b, method, target, headers) for b in more}
            if widened and self._decided(answers, asked):
                break
        for task in pending:  # answers no longer needed still feed health and windows
            self._keep(task)
        self.judge(tries, quorum=2, absolute=widened, answers=answers)

    def _try_task(self, backend: str, method: str, target: bytes, headers: list) -> asyncio.Task:
        return self._task(self.try_backend(backend, method, target, headers, b""))

    def _decided(self, answers: dict[str, str | None], asked: set[str]) -> bool:
        """Whether one group of identical answers already outweighs every vote asked for,
        answered or not (so no answer still to come can change the verdict)."""
        weights = self.engine.vote_weights(asked)
        mass: dict[str, float] = {}
        for backend, digest in answers.items():
            if digest is not None:
                mass[digest] = mass.get(digest, 0.0) + weights.get(backend, 1.0)
        return bool(mass) and max(mass.values()) > sum(weights.values()) / 2.0

    def judge(
        self,
        tries: list[TryResult],
        quorum: int,
        absolute: bool = False,
        answers: dict[str, str | None] | None = None,
    ) -> AuditResult:
        """Compare answers by body digest, each voter weighted by its standing; charge the
        odd ones out, feed the evidence, count the audit. `answers`: the tries' digests,
        when the caller has them already."""
        if answers is None:
            answers = {t.backend: answer_digest(t.response, self._ignore) for t in tries}
        weights = self.engine.vote_weights(answers)
        verdict = compare_answers(answers, quorum=quorum, weights=weights, absolute=absolute)
        now = self.clock()
        m = self.metrics
        if verdict.quorum_met:
            for b in verdict.majority:
                if b in self.pools:
                    self.windows[b].record_audit(now, False)
                    self._counters[b].audits += 1
                    self.engine.record_audit(b, False, now)
            for b in verdict.odd:
                if b in self.pools:
                    self.windows[b].record_audit(now, True)
                    self._counters[b].audits += 1
                    self._counters[b].mismatches += 1
                    self.engine.record_audit(b, True, now)
            m.audits["mismatch" if verdict.odd else "agreed"] += 1
            self._publish(self.engine.drain_changes())
        else:
            m.audits["no_quorum"] += 1
        return verdict

    async def quorum_read(
        self, method: str, target: bytes, headers: list, body: bytes, quorum: int
    ) -> tuple[TryResult | None, str]:
        """Ask backends until `quorum` agree on the body; never return a minority answer."""
        candidates = list(self.up)
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
        answers = {t.backend: answer_digest(t.response, self._ignore) for t in tries}
        while not compare_answers(answers, quorum=quorum).quorum_met and candidates:
            extra = candidates.pop(0)
            t = await self.try_backend(extra, method, target, headers, body)
            tries.append(t)
            answers[t.backend] = answer_digest(t.response, self._ignore)
        verdict = self.judge(tries, quorum=quorum, answers=answers)
        if not verdict.quorum_met:
            return None, f"no {quorum} backends agreed: {verdict.reason}"
        chosen = next(t for t in tries if t.backend == verdict.majority[0])
        return chosen, ""

    # ---------------------------------------------------------------- views
    def live_view(self) -> LiveView:
        return LiveView(
            trust={b: float(self.engine.weight(b)) for b in self.backends},
            up={b: self.health.is_up(b) for b in self.backends},
            features=dict(self.features),
            held={b: self.engine.is_held(b) for b in self.backends},
        )

    def trust_report(self) -> dict[str, Any]:
        rows = []
        for b in self.backends:
            rows.append(
                {
                    "url": b,
                    **self.engine.row(b),  # weight, state, held, proven, evidence, ...
                    "health": self.health.describe(b),
                    "up": self.health.is_up(b),
                    "gossip": self.gossip.verdict(b),
                    "features": self.features.get(b, {}),
                    "policy": _jsonable(self.policy.describe(b)),
                    "inflight": self.inflight.get(b, 0),
                }
            )
        return {
            "backends": rows,
            "policy": self.settings.policy.value,
            "window_s": self.settings.window_s,
            "audit_fraction": self.settings.audit_fraction,
            "model": self.engine.describe(),
        }


def answer_digest(response: UpstreamResponse | None, ignore_fields: frozenset[str]) -> str | None:
    """An audit answer: sha256 of a 2xx body; anything else is no answer.

    Backends put their own identity in answers (the work contract's `node`), so for a JSON
    object the `ignore_fields` are dropped and the rest hashed in a canonical form; other
    bodies are hashed as they are.
    """
    if response is None or not 200 <= response.status < 300:
        return None
    body = response.body
    if ignore_fields and body[:1] == b"{":
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            for name in ignore_fields:
                doc.pop(name, None)
            body = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(body).hexdigest()


def _jsonable(value: Any) -> Any:
    """Enums, dataclasses and numpy scalars as plain JSON values."""
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=str))
