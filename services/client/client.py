"""ResilientClient: an httpx client that survives bad targets and says what it saw.

Per target (a base URL) it keeps a circuit breaker (`twlb.client.breaker`), a retry
budget (`twlb.budget.RetryBudget`) and a window of recent latencies. A call is tried,
then retried with exponential backoff and full jitter (tenacity) while attempts, the
budget and the overall deadline allow; each try has its own timeout; optionally a
hedge (a second try) starts when the first is slower than a quantile of recent calls,
and the first good answer wins. A `verify(response)` hook turns a wrong 200 into a
failure. Breaker transitions, retries, hedges and budget refusals reach listeners and
Prometheus counters. `ClientPolicy.basic()` is the baseline: one try, nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field
from tenacity import AsyncRetrying, RetryCallState, retry_if_result
from tenacity.stop import stop_base
from tenacity.wait import wait_random_exponential
from twlb.client.breaker import BreakerConfig, BreakerTransition, CircuitBreaker

from twlb.budget import RetryBudget
from twlb.options import Flag

Verifier = Callable[[httpx.Response], bool]


class CallStatus(StrEnum):
    """How a call (all its tries) ended; also the `outcome` label of the request counter."""

    OK = "ok"  # a 2xx answer that passed verification
    WRONG = "wrong"  # a 2xx answer that failed verification
    TIMEOUT = "timeout"  # the per-try timeout fired
    CONNECT_ERROR = "connect_error"  # refused, reset or dropped connection
    HTTP_5XX = "http_5xx"
    HTTP_OTHER = "http_other"  # 1xx/3xx/4xx: the caller's problem, never retried
    BREAKER_OPEN = "breaker_open"  # refused locally, no request sent
    DEADLINE = "deadline"  # the overall deadline cut the call short
    CANCELLED = "cancelled"  # the caller gave up (e.g. a load run's hard stop)


#: Statuses worth another try (a wrong answer too: another try may land on a good node).
RETRYABLE = frozenset(
    {CallStatus.WRONG, CallStatus.TIMEOUT, CallStatus.CONNECT_ERROR, CallStatus.HTTP_5XX}
)
#: Statuses the breaker counts as the target's success (4xx is the caller's fault).
TARGET_HEALTHY = frozenset({CallStatus.OK, CallStatus.HTTP_OTHER})
#: How much less than the per-try timeout the deadline must leave to be the cause of a cut.
DEADLINE_SLACK_S = 0.01
#: Distinct URLs whose built requests are kept for reuse.
REQUEST_CACHE_SIZE = 16_384


class ClientPolicy(BaseModel):
    """How hard the client tries, each setting declared once: `twlb load`'s client flags
    (services/client/cli.py) are generated from these fields. Times in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: Annotated[float, Flag("--timeout", param="timeout")] = Field(
        1.0, gt=0.0, le=3600.0, description="Per-try timeout, seconds."
    )
    deadline_s: Annotated[float, Flag("--deadline", param="deadline")] = Field(
        3.0,
        gt=0.0,
        le=86_400.0,
        description="Whole-call deadline, retries and backoff included, seconds (resilient).",
    )
    # Up to thousands: what ends a call's retries is its deadline and the retry budget
    # (chaos/local/balancer_kill.json retries through a balancer restart with 200).
    max_attempts: Annotated[int, Flag("--attempts", param="attempts")] = Field(
        3, ge=1, le=10_000, description="Tries per call, the first included (resilient)."
    )
    backoff_base_s: Annotated[float, Flag("--backoff-base", param="backoff_base")] = Field(
        0.02,
        ge=0.0,
        le=60.0,
        description="Retry backoff with full jitter: uniform(0, min(max, base * 2**n)) seconds.",
    )
    backoff_max_s: Annotated[float, Flag("--backoff-max", param="backoff_max")] = Field(
        0.5, ge=0.0, le=600.0, description="Longest retry backoff, seconds."
    )
    budget_ratio: float = Field(
        0.2,
        ge=0.0,
        le=1000.0,
        description="Retry budget: retries and hedges as a share of calls.",
    )
    budget_min_per_s: float = Field(
        10.0,
        ge=0.0,
        le=1e6,
        description="Retry budget: retries a second allowed whatever the calls.",
    )
    budget_ttl_s: Annotated[float, Flag("--budget-ttl", param="budget_ttl")] = Field(
        10.0, gt=0.0, le=3600.0, description="Retry budget: seconds a call counts towards it."
    )
    breaker: BreakerConfig | None = Field(
        default_factory=BreakerConfig, description="The circuit breaker per target (None: none)."
    )
    hedge_quantile: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Hedge a try slower than this quantile of recent ones, e.g. 0.95 (resilient).",
    )
    hedge_min_samples: int = Field(
        20, ge=1, le=100_000, description="Recent tries needed before a hedge is considered."
    )
    hedge_min_delay_s: Annotated[float, Flag("--hedge-min-delay", param="hedge_min_delay")] = Field(
        0.001, ge=0.0, le=60.0, description="Shortest wait before a hedge, seconds."
    )
    min_try_s: Annotated[float, Flag("--min-try", param="min_try")] = Field(
        0.005,
        ge=0.0,
        le=60.0,
        description="No try starts with less than this left before the deadline, seconds.",
    )

    @classmethod
    def basic(cls, timeout_s: float = 1.0) -> ClientPolicy:
        """The baseline: one try with a timeout, no breaker, no retry, no hedge."""
        return cls(timeout_s=timeout_s, deadline_s=timeout_s, max_attempts=1, breaker=None)

    @property
    def resilient(self) -> bool:
        return self.max_attempts > 1 or self.breaker is not None or self.hedge_quantile is not None


@dataclass(slots=True)
class TryResult:
    """One request on the wire (or refused before it)."""

    status: CallStatus
    response: httpx.Response | None = None
    duration_s: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class _Call:
    """One call in progress: where it goes, how it is judged, what it has done so far."""

    target: _Target
    url: str
    params: Mapping[str, Any] | None
    verify: Verifier | None
    deadline_at: float
    attempts: int = 0  # tenacity attempts (a hedged pair is one attempt)
    tries: int = 0  # requests sent
    hedged: bool = False
    last_sent: TryResult | None = None  # the last try that reached the wire


@dataclass(slots=True)
class CallResult:
    """What a call ended with, and what it took to get there."""

    status: CallStatus
    response: httpx.Response | None
    attempts: int  # requests sent, hedges included
    retries: int
    hedged: bool
    elapsed_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is CallStatus.OK


class ClientListener:
    """Hooks for what the client does; override the ones you need."""

    def on_breaker_transition(self, target: str, transition: BreakerTransition) -> None:
        """A target's breaker changed state."""

    def on_retry(self, target: str, attempt: int, status: CallStatus, wait_s: float) -> None:
        """Attempt `attempt` ended with `status`; another follows after `wait_s`."""

    def on_budget_refusal(self, target: str) -> None:
        """A retry or hedge was wanted but the budget had none left."""

    def on_hedge(self, target: str, delay_s: float) -> None:
        """A hedge started because the first try took longer than `delay_s`."""


class ClientMetrics:
    """The client's Prometheus counters, in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "twlb_client_requests_total",
            "Calls by target and final outcome.",
            ["target", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "twlb_client_retries_total", "Retries sent.", ["target"], registry=registry
        )
        self.hedges = Counter(
            "twlb_client_hedges_total", "Hedged tries sent.", ["target"], registry=registry
        )
        self.transitions = Counter(
            "twlb_client_breaker_transitions_total",
            "Circuit breaker state changes.",
            ["target", "from", "to"],
            registry=registry,
        )
        self.budget_refusals = Counter(
            "twlb_client_budget_refusals_total",
            "Retries or hedges refused by the retry budget.",
            ["target"],
            registry=registry,
        )


class LatencyWindow:
    """Recent successful try durations and a cached quantile of them."""

    def __init__(self, size: int = 256, refresh_every: int = 16) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._refresh_every = refresh_every
        self._since_refresh = 0
        self._cached: dict[float, float] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, duration_s: float) -> None:
        self._samples.append(duration_s)
        self._since_refresh += 1
        if self._since_refresh >= self._refresh_every:
            self._cached.clear()
            self._since_refresh = 0

    def quantile(self, q: float) -> float | None:
        if not self._samples:
            return None
        if q not in self._cached:
            ordered = sorted(self._samples)
            self._cached[q] = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        return self._cached[q]


class _Target:
    """Everything the client keeps for one base URL."""

    def __init__(self, name: str, client: ResilientClient) -> None:
        policy = client.policy
        self.name = name
        self.budget = RetryBudget(policy.budget_ratio, policy.budget_min_per_s, policy.budget_ttl_s)
        self.latencies = LatencyWindow()
        self.breaker: CircuitBreaker | None = None
        if policy.breaker is not None:
            self.breaker = CircuitBreaker(policy.breaker, listeners=[self._on_transition])
        self._client = client
        m = client.metrics
        self.retries = m.retries.labels(target=name)
        self.hedges = m.hedges.labels(target=name)
        self.budget_refusals = m.budget_refusals.labels(target=name)
        self._requests = {s: m.requests.labels(target=name, outcome=s.value) for s in CallStatus}
        #: Tries that got past connecting (an answer of any kind, or a timeout waiting for one).
        self.reached_total = 0

    def count(self, status: CallStatus) -> None:
        self._requests[status].inc()

    def withdraw_retry(self, now: float) -> bool:
        """Take a retry (or hedge) from the budget; a refusal is counted and reported."""
        if self.budget.try_withdraw(now):
            return True
        self.budget_refusals.inc()
        for listener in self._client.listeners:
            listener.on_budget_refusal(self.name)
        return False

    def _on_transition(self, t: BreakerTransition) -> None:
        self._client.metrics.transitions.labels(
            target=self.name, **{"from": t.from_state.value, "to": t.to_state.value}
        ).inc()
        for listener in self._client.listeners:
            listener.on_breaker_transition(self.name, t)


class _StopWhenOutOfTimeOrBudget(stop_base):
    """tenacity stop: no attempts left, no time for another useful try, or no budget."""

    def __init__(self, client: ResilientClient, target: _Target, deadline_at: float) -> None:
        self._client = client
        self._target = target
        self._deadline_at = deadline_at

    def __call__(self, retry_state: RetryCallState) -> bool:
        policy = self._client.policy
        if retry_state.attempt_number >= policy.max_attempts:
            return True
        now = self._client.now()
        if now + retry_state.upcoming_sleep + policy.min_try_s >= self._deadline_at:
            return True
        return not self._target.withdraw_retry(now)


def _status_of(response: httpx.Response, verify: Verifier | None) -> CallStatus:
    code = response.status_code
    if 200 <= code < 300:
        if verify is None or verify(response):
            return CallStatus.OK
        return CallStatus.WRONG
    return CallStatus.HTTP_5XX if code >= 500 else CallStatus.HTTP_OTHER


class ResilientClient:
    """GET calls against base URLs with breaker, retries, budget, deadline and hedging."""

    def __init__(
        self,
        policy: ClientPolicy | None = None,
        *,
        http: httpx.AsyncClient | None = None,
        pool_size: int = 256,
        registry: CollectorRegistry | None = None,
        listeners: Sequence[ClientListener] = (),
        verify: Verifier | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.policy = policy or ClientPolicy()
        # The clock of deadlines, the breaker's waits, the retry budget and elapsed times
        # (tests move it instead of sleeping). Not loop.time(): uvloop's clock moves in
        # whole milliseconds. Per-try timeouts are the event loop's (asyncio.timeout).
        self.now = clock
        self.metrics = ClientMetrics(registry or CollectorRegistry())
        self.listeners = list(listeners)
        self.verify = verify
        self._owns_http = http is None
        # A client of our own sends straight through its transport: nothing of
        # AsyncClient.send (auth, redirects, cookies, hooks) applies to these GETs, and
        # skipping it saves about a third of the CPU per request. A caller's client is
        # used as given.
        self._transport: httpx.AsyncBaseTransport | None = None
        if http is None:
            limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
            # httpx's API on aiohttp's connection pool: httpcore's pool costs several
            # times more CPU per request under concurrency (docs/DESIGN.md, "The hot
            # path").
            self._transport = AiohttpTransport(limits=limits, trust_env=False)
            http = httpx.AsyncClient(
                transport=self._transport,
                # The per-try timeout is enforced around the whole request
                # (asyncio.timeout); httpx's per-phase timeouts are only a backstop.
                timeout=httpx.Timeout(self.policy.timeout_s + 5.0),
                trust_env=False,
            )
        self._http = http
        self._targets: dict[str, _Target] = {}
        self._requests: dict[str, httpx.Request] = {}

    async def __aenter__(self) -> ResilientClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:
            return await self._http.send(request)
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    def _request_for(self, url: str, params: Mapping[str, Any] | None) -> httpx.Request:
        """A GET request for `url`, built once per URL: parsing a URL costs more CPU than
        the rest of httpx's request path, and a load run repeats the same few URLs."""
        if params or self._transport is None:
            # A caller's client may add cookies or headers per request: build afresh.
            return self._http.build_request("GET", url, params=params)
        request = self._requests.get(url)
        if request is None:
            if len(self._requests) >= REQUEST_CACHE_SIZE:
                self._requests.clear()
            request = self._requests[url] = self._http.build_request("GET", url)
        return request

    def target(self, base_url: str) -> _Target:
        t = self._targets.get(base_url)
        if t is None:
            t = self._targets[base_url] = _Target(base_url, self)
        return t

    def reached(self, base_url: str) -> bool:
        """Has any try to this target got past connecting (answered, or timed out waiting)?"""
        return self.target(base_url).reached_total > 0

    def breaker(self, base_url: str) -> CircuitBreaker | None:
        """The breaker of a target (None in basic mode)."""
        return self.target(base_url).breaker

    async def get(
        self,
        base_url: str,
        path: str = "/",
        params: Mapping[str, Any] | None = None,
        verify: Verifier | None = None,
    ) -> CallResult:
        """One call: tries, retries and hedges against `base_url + path` within the deadline."""
        target = self.target(base_url)
        verify = verify or self.verify
        url = base_url.rstrip("/") + path
        policy = self.policy
        start = self.now()
        deadline_at = start + policy.deadline_s
        target.budget.record_request(start)
        call = _Call(target, url, params, verify, deadline_at)

        async def attempt() -> TryResult:
            call.attempts += 1
            return await self._attempt(call)

        try:
            last = await attempt()
            if last.status in RETRYABLE and policy.max_attempts > 1:
                # tenacity takes over only once a retry may be needed: the first try's
                # result is handed to it as attempt 1, which keeps the common, successful
                # call free of tenacity's per-call set-up.
                first = [last]

                async def replay_first_then_attempt() -> TryResult:
                    return first.pop() if first else await attempt()

                retrying = AsyncRetrying(
                    stop=_StopWhenOutOfTimeOrBudget(self, target, deadline_at),
                    wait=wait_random_exponential(
                        multiplier=policy.backoff_base_s, max=policy.backoff_max_s
                    ),
                    retry=retry_if_result(lambda r: r.status in RETRYABLE),
                    before_sleep=lambda rs: self._on_retry(target, rs),
                    retry_error_callback=lambda rs: rs.outcome.result(),
                )
                last = await retrying(replay_first_then_attempt)
        except asyncio.CancelledError:
            target.count(CallStatus.CANCELLED)
            raise
        if last.status is CallStatus.BREAKER_OPEN and call.last_sent is not None:
            # The breaker opened between tries: what the target did is the better answer.
            last = call.last_sent
        target.count(last.status)
        return CallResult(
            status=last.status,
            response=last.response,
            attempts=call.tries,
            retries=call.attempts - 1,
            hedged=call.hedged,
            elapsed_s=self.now() - start,
            error=last.error,
        )

    def _on_retry(self, target: _Target, rs: RetryCallState) -> None:
        target.retries.inc()
        status = rs.outcome.result().status if rs.outcome else CallStatus.CANCELLED
        for listener in self.listeners:
            listener.on_retry(target.name, rs.attempt_number, status, rs.upcoming_sleep)

    async def _attempt(self, call: _Call) -> TryResult:
        """One attempt: a try, plus a hedge when the try is slow and hedging is on."""
        target = call.target
        q = self.policy.hedge_quantile
        if q is None or len(target.latencies) < self.policy.hedge_min_samples:
            return await self._try(call)
        delay = max(target.latencies.quantile(q) or 0.0, self.policy.hedge_min_delay_s)
        first = asyncio.ensure_future(self._try(call))
        pending: set[asyncio.Future[TryResult]] = {first}
        try:
            done, pending = await asyncio.wait(pending, timeout=delay)
            now = self.now()
            if done or now + self.policy.min_try_s >= call.deadline_at:
                return await first
            if not target.withdraw_retry(now):
                return await first
            call.hedged = True
            target.hedges.inc()
            for listener in self.listeners:
                listener.on_hedge(target.name, delay)
            pending.add(asyncio.ensure_future(self._try(call)))
            last: TryResult | None = None
            while pending:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    result = task.result()
                    if result.status is CallStatus.OK:
                        return result
                    if last is None or last.status is CallStatus.BREAKER_OPEN:
                        last = result
            assert last is not None
            return last
        finally:
            # The losing try, or every try when the caller gives up, is cancelled and
            # awaited, so no request outlives its call.
            pending = {task for task in pending | {first} if not task.done()}
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _try(self, call: _Call) -> TryResult:
        """One request on the wire, judged and fed to the breaker."""
        target = call.target
        start = self.now()
        breaker = target.breaker
        if breaker is not None and not breaker.allow(start):
            return TryResult(CallStatus.BREAKER_OPEN, error="circuit breaker open")
        remaining = call.deadline_at - start
        if remaining <= 0:
            if breaker is not None:
                breaker.release(start)
            return TryResult(CallStatus.DEADLINE, error="deadline passed before the try")
        # The deadline cut this try short only if it left clearly less than the timeout
        # (a first try under a deadline equal to the timeout, as in basic mode, is not).
        cut_by_deadline = remaining < self.policy.timeout_s - DEADLINE_SLACK_S
        call.tries += 1
        response: httpx.Response | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(min(self.policy.timeout_s, remaining)):
                response = await self._send(self._request_for(call.url, call.params))
            status = _status_of(response, call.verify)
        except TimeoutError:
            status = CallStatus.DEADLINE if cut_by_deadline else CallStatus.TIMEOUT
            error = f"no answer within {min(self.policy.timeout_s, remaining):.3f}s"
        except httpx.TransportError as err:
            status = CallStatus.CONNECT_ERROR
            error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        except aiohttp.ClientError as err:
            # The pool's own errors that the httpx transport passes through unmapped, e.g.
            # a target that answers in something other than HTTP: no answer, as a reset is.
            status = CallStatus.CONNECT_ERROR
            error = f"not a usable HTTP answer: {type(err).__name__}"
        except asyncio.CancelledError:
            if breaker is not None:
                breaker.release(self.now())
            raise
        end = self.now()
        duration = end - start
        if breaker is not None:
            if status is CallStatus.DEADLINE:
                # Cut short by the caller's deadline, not by the target's timeout: no verdict.
                breaker.release(end)
            else:
                breaker.record(end, status in TARGET_HEALTHY, duration)
        if status is not CallStatus.CONNECT_ERROR:
            target.reached_total += 1
        if status is CallStatus.OK:
            target.latencies.add(duration)
        call.last_sent = TryResult(status, response, duration, error)
        return call.last_sent
