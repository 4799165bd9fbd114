"""The balancer service: the proxy hot path, health and trust loops, audits, quorum, API.

`create_app(settings)` returns a `BalancerApp`; `serve(app, host, port)` runs it. The
server is a small asyncio protocol on httptools' request parser (the parser the upstream
pool uses too), chosen by measurement over uvicorn: every path and method is proxied by
`BalancerApp.forward` with no ASGI scope, no Request objects and no routing, to a backend
the policy picks, through the lean keep-alive pool of `upstream.py`, and each answer goes
out in one write. The balancer's own paths (`/healthz`, `/metrics`, `/trust`,
`/admin/...`, see `settings.RESERVED_PATHS`) go to a FastAPI app through a minimal ASGI
bridge, and the FastAPI lifespan opens and closes everything around the listening time.

Everything stateful lives in one `Balancer`, created per app and opened and closed in the
lifespan, so two apps in one process share nothing. The sans-IO cores (policy, health
tracker, feature windows, trust engine, retry budget) are driven here with
`time.monotonic()` as their `now`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import secrets
import signal
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, MutableMapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl, unquote

import httptools
import httpx
import orjson
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from twlb.balancer.audit import AuditResult, compare_answers
from twlb.balancer.features import FleetWindows
from twlb.balancer.health import HealthTracker
from twlb.balancer.metrics import BackendCounters, BalancerMetrics, LiveView
from twlb.balancer.policies import make_policy
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.settings import (
    ADMIN_PREFIX,
    IDEMPOTENT_METHODS,
    RESERVED_PATHS,
    BalancerSettings,
)
from twlb.balancer.trust import TrustEngine, TrustState
from twlb.balancer.upstream import (
    REQUEST_DROPPED,
    RESPONSE_DROPPED,
    BackendPool,
    BackendURLError,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamTimeout,
    normalize_backend_url,
)

from twlb import __version__
from twlb.budget import RetryBudget
from twlb.outcome import Outcome
from twlb.spec import NodeClass, PolicyName

if TYPE_CHECKING:  # onnxruntime is heavy to import: only a balancer given --model loads it
    from twlb.balancer.model_reload import ModelReloader

log = logging.getLogger("twlb.balancer")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

_JSON_HEADERS = [(b"content-type", b"application/json")]

#: Audits cross-check only safe methods: the extra calls must not change anything.
AUDITED_METHODS = frozenset({"GET"})

#: Response headers dropped when no body follows (HEAD, 304): Content-Length stays.
BODYLESS_DROPPED = RESPONSE_DROPPED - {b"content-length"}

#: Largest quorum a request may ask for (`X-TWLB-Quorum`).
MAX_QUORUM = 5


class OracleTruthError(ValueError):
    """An oracle truth file that cannot be used; the message names the file and the problem."""


def load_oracle_truth(path: Path) -> dict[str, str]:
    """Read `{backend_url: node_class}` from a JSON file, URLs normalized, classes checked."""
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise OracleTruthError(f"{path}: cannot read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise OracleTruthError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise OracleTruthError(f"{path}: must be a JSON object {{backend_url: node_class}}")
    classes = {c.value for c in NodeClass}
    truth: dict[str, str] = {}
    for url, cls in raw.items():
        try:
            norm = normalize_backend_url(url)
        except BackendURLError as err:
            raise OracleTruthError(f"{path}: {err}") from None
        if cls not in classes:
            raise OracleTruthError(
                f"{path}: {url}: unknown class {cls!r} (one of {sorted(classes)})"
            )
        truth[norm] = cls
    return truth


def _error_body(message: str, **extra: Any) -> bytes:
    return orjson.dumps({"error": message, **extra})


@dataclass(slots=True)
class TryResult:
    """One try against one backend."""

    backend: str
    outcome: Outcome
    response: UpstreamResponse | None
    latency_s: float


class Balancer:
    """All live state of one balancer; the server's I/O drives its sans-IO cores."""

    def __init__(self, settings: BalancerSettings) -> None:
        self.settings = settings
        now = monotonic()
        self.backends: list[str] = list(settings.backends)
        self.pools: dict[str, BackendPool] = {b: BackendPool(b) for b in self.backends}
        self.inflight: dict[str, int] = dict.fromkeys(self.backends, 0)
        self.health = HealthTracker(
            healthy_threshold=settings.healthy_threshold,
            unhealthy_threshold=settings.unhealthy_threshold,
        )
        self.health.set_backends(self.backends, now)
        self.up: list[str] = list(self.backends)
        horizon = max(60.0, 2 * settings.window_s)
        self.windows = FleetWindows(
            horizon_s=horizon, resolution_s=min(0.25, settings.window_s / 4)
        )
        self.windows.set_backends(self.backends)
        self.engine = TrustEngine(HeuristicScorer())
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
            trust_engine=self.engine,
            truth=self.truth_of,
            latency_weighting=settings.latency_weighting,
            slow_start_s=settings.slow_start_s,
        )
        self.policy.set_backends(list(self.backends), now)
        self.wants_key = settings.policy is PolicyName.CONSISTENT_HASH
        self._audit_probation = settings.policy is PolicyName.TRUST
        self.budget = RetryBudget(ratio=settings.retry_budget)
        self.rng = random.Random(settings.seed)
        self._ignore = frozenset(settings.audit_ignore_fields)
        self.features: dict[str, dict[str, float]] = {}
        self.metrics = BalancerMetrics(self.live_view)
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
        self._probe: httpx.AsyncClient | None = None

    def truth_of(self, backend: str) -> NodeClass:
        """The oracle's ground truth; a backend missing from the file counts as healthy."""
        return NodeClass(self.truth.get(backend, NodeClass.HEALTHY))

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._probe = httpx.AsyncClient(
            timeout=self.settings.health_timeout_s,
            limits=httpx.Limits(max_keepalive_connections=len(self.backends) + 8),
        )
        for b in self.backends:
            self._start_health(b)
        self._tick_task = asyncio.create_task(self._tick_loop(), name="twlb-balancer-tick")

    async def stop(self) -> None:
        tasks = [*self._health_tasks.values(), *self._background]
        if self._tick_task is not None:
            tasks.append(self._tick_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._health_tasks.clear()
        self._background.clear()
        for pool in self.pools.values():
            pool.close()
        if self._probe is not None:
            await self._probe.aclose()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- backends
    def add_backend(self, url: str) -> bool:
        """Put a backend into the fleet (normalized URL); False if it is there already."""
        if url in self.pools:
            return False
        now = monotonic()
        self.backends.append(url)
        self.pools[url] = BackendPool(url)
        self.inflight[url] = 0
        self._counters[url] = self.metrics.backend(url)
        self._sync_backends(now)
        if self._probe is not None:
            self._start_health(url)
        return True

    def remove_backend(self, url: str) -> bool:
        """Take a backend out of the fleet; False if it is not in it."""
        if url not in self.pools:
            return False
        now = monotonic()
        self.backends.remove(url)
        self.pools.pop(url).close()
        self.inflight.pop(url, None)
        self._counters.pop(url, None)
        self.features.pop(url, None)
        task = self._health_tasks.pop(url, None)
        if task is not None:
            task.cancel()
        self._sync_backends(now)
        return True

    def _sync_backends(self, now: float) -> None:
        backends = list(self.backends)
        self.health.set_backends(backends, now)
        self.windows.set_backends(backends)
        self.engine.set_backends(backends, now)
        self.policy.set_backends(backends, now)
        self._refresh_up()

    def _refresh_up(self) -> None:
        # The hot path reads this list; it is rebuilt after every health event that can
        # change a state (checks, ticks, failed tries), not on every request.
        self.up = self.health.up(self.backends)

    # ---------------------------------------------------------------- background loops
    def _start_health(self, backend: str) -> None:
        self._health_tasks[backend] = asyncio.create_task(
            self._health_loop(backend), name=f"twlb-health {backend}"
        )

    async def _health_loop(self, backend: str) -> None:
        """Active heartbeat: GET /healthz every interval, fed to health and the window."""
        assert self._probe is not None
        url = backend + "/healthz"
        interval = self.settings.health_interval_s
        timeout = self.settings.health_timeout_s
        while True:
            started = monotonic()
            try:
                r = await self._probe.get(url, timeout=timeout)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            now = monotonic()
            if backend not in self.pools:
                return
            before = self.health.is_up(backend)
            self.health.on_check(backend, ok, now)
            self._refresh_up()
            self.windows[backend].record_health(now, ok)
            after = self.health.is_up(backend)
            if before != after:
                log.warning("backend %s %s rotation", backend, "back in" if after else "out of")
            await asyncio.sleep(max(0.0, interval - (monotonic() - started)))

    async def _tick_loop(self) -> None:
        """Policy and health ticks, in-flight samples, and periodic trust updates."""
        s = self.settings
        next_trust = monotonic()
        while True:
            await asyncio.sleep(s.policy_tick_s)
            now = monotonic()
            try:
                self.policy.tick(now)
                for b in self.health.tick(now):
                    log.warning("backend %s back in rotation after its passive cooldown", b)
                self._refresh_up()
                for b, n in self.inflight.items():
                    self.windows[b].record_inflight(now, n)
                if now >= next_trust:
                    next_trust = now + s.trust_tick_s
                    self.update_trust(now)
            except Exception:  # a bug in one tick must not stop routing for good
                log.exception("balancer tick failed")

    def update_trust(self, now: float) -> None:
        """Compute every backend's features over the window and feed the trust engine."""
        if self.settings.oracle_truth is not None:
            self._reload_truth()
        if self.model is not None:
            self.model.poll()
        self.features = self.windows.features(now, self.settings.window_s)
        if self.features:
            self.engine.update(self.features, now)

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
        start = monotonic()
        if pool is None:  # removed while the request was being routed
            return TryResult(backend, Outcome.CONNECT_ERROR, None, 0.0)
        self.policy.on_start(backend, start)
        self.inflight[backend] += 1
        response = None
        try:
            response = await pool.request(
                method, target, headers, body, self.settings.try_timeout_s
            )
            outcome = Outcome.ERROR if response.status >= 500 else Outcome.SUCCESS
        except UpstreamTimeout:
            outcome = Outcome.TIMEOUT
        except UpstreamConnectError:
            outcome = Outcome.CONNECT_ERROR
        finally:
            end = monotonic()
            if backend in self.inflight:
                self.inflight[backend] -= 1
        latency = end - start
        if backend in self.pools:
            self.policy.on_end(backend, end, outcome, latency)
            self.health.on_passive(backend, outcome, end)
            if outcome is not Outcome.SUCCESS:
                # A success only resets the passive run; a failure may take the backend out.
                self._refresh_up()
            self.windows[backend].record_request(end, outcome, latency)
            self._counters[backend].observe(outcome, latency)
        return TryResult(backend, outcome, response, latency)

    # ---------------------------------------------------------------- routing
    async def route(
        self, method: str, target: bytes, headers: list, body: bytes, key: str | None
    ) -> tuple[TryResult | None, str]:
        """Pick, try and retry; returns the last try (None if none was sent) and why not."""
        now = monotonic()
        self.budget.record_request(now)
        candidates = self.up
        if not candidates:
            return None, "no backend is up" if self.backends else "no backends configured"
        tried: list[str] = []
        last: TryResult | None = None
        retryable = method in IDEMPOTENT_METHODS
        for attempt in range(self.settings.max_tries):
            if attempt:
                candidates = [b for b in self.up if b not in tried]
                if not candidates:
                    break
                if not self.budget.try_withdraw(monotonic()):
                    self.metrics.retries_refused += 1
                    break
                self.metrics.retries += 1
            backend = self.policy.pick(candidates, monotonic(), key)
            if backend is None:
                if last is None:
                    return None, f"policy {self.settings.policy.value} picked no backend"
                break
            last = await self.try_backend(backend, method, target, headers, body)
            if last.outcome is Outcome.SUCCESS or not retryable:
                break
            tried.append(backend)
        return last, ""

    def maybe_audit(self, method: str, target: bytes, headers: list, answered: TryResult) -> None:
        """With probability audit_fraction, cross-check a 2xx answer on two more backends;
        under the trust policy, answers of a backend in probation more often (while audits
        are on), so that one still lying when it (re)joins is seen within a tick."""
        fraction = self.settings.audit_fraction
        if (
            fraction
            and self._audit_probation
            and self.engine.state(answered.backend) is TrustState.PROBATION
        ):
            fraction = max(fraction, self.settings.probation_audit_fraction)
        if not fraction or method not in AUDITED_METHODS or self.rng.random() >= fraction:
            return
        others = [b for b in self.up if b != answered.backend]
        if len(others) < 2:
            return
        peers = self.rng.sample(others, 2)
        self._spawn(self._audit(method, target, headers, answered, peers), "twlb-audit")

    async def _audit(
        self, method: str, target: bytes, headers: list, answered: TryResult, peers: list[str]
    ) -> None:
        tries = await asyncio.gather(
            *(self.try_backend(b, method, target, headers, b"") for b in peers)
        )
        self.judge([answered, *tries], quorum=2)

    def judge(self, tries: list[TryResult], quorum: int) -> AuditResult:
        """Compare answers by body digest, charge the odd ones out, count the audit."""
        answers = {t.backend: answer_digest(t.response, self._ignore) for t in tries}
        verdict = compare_answers(answers, quorum=quorum)
        now = monotonic()
        m = self.metrics
        if verdict.quorum_met:
            for b in verdict.majority:
                if b in self.pools:
                    self.windows[b].record_audit(now, False)
                    self._counters[b].audits += 1
            for b in verdict.odd:
                if b in self.pools:
                    self.windows[b].record_audit(now, True)
                    self._counters[b].audits += 1
                    self._counters[b].mismatches += 1
            m.audits["mismatch" if verdict.odd else "agreed"] += 1
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
        now = monotonic()
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
        while True:
            answers = {t.backend: answer_digest(t.response, self._ignore) for t in tries}
            if compare_answers(answers, quorum=quorum).quorum_met or not candidates:
                break
            extra = candidates.pop(0)
            tries.append(await self.try_backend(extra, method, target, headers, body))
        verdict = self.judge(tries, quorum=quorum)
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
        )

    def trust_report(self) -> dict[str, Any]:
        rows = []
        for b in self.backends:
            rows.append(
                {
                    "url": b,
                    "weight": float(self.engine.weight(b)),
                    "state": _jsonable(self.engine.state(b)),
                    "held": self.engine.is_held(b),
                    "health": self.health.describe(b),
                    "up": self.health.is_up(b),
                    "features": self.features.get(b, {}),
                    "probabilities": _jsonable(self.engine.probabilities(b)),
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


# -------------------------------------------------------------------- admin API models
class BackendRef(BaseModel):
    """A backend named by its URL (admin API body)."""

    url: str

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        try:
            return normalize_backend_url(value)
        except BackendURLError as err:
            raise ValueError(str(err)) from None


class BackendList(BaseModel):
    backends: list[str]


_bearer = HTTPBearer(auto_error=False)


async def _live_balancer(request: Request) -> Balancer:
    return request.app.state.balancer


LiveBalancer = Annotated[Balancer, Depends(_live_balancer)]


async def _admin(
    b: LiveBalancer, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Admin calls need the configured bearer token; without one, admin is disabled."""
    token = b.settings.admin_token
    if token is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin disabled")
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "admin API needs Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(creds.credentials.encode(), token.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "wrong admin token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def build_api(settings: BalancerSettings) -> FastAPI:
    """The FastAPI app serving the balancer's own endpoints and owning the lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        balancer = Balancer(settings)
        app.state.balancer = balancer
        await balancer.start()
        log.info(
            "balancer up: policy %s, %d backends, audits %.3f",
            settings.policy.value,
            len(balancer.backends),
            settings.audit_fraction,
        )
        try:
            yield
        finally:
            await balancer.stop()
            del app.state.balancer

    api = FastAPI(
        title="TW-LB balancer",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/admin/openapi.json",
    )

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @api.get("/healthz")
    async def healthz(b: LiveBalancer) -> dict[str, Any]:
        return {
            "status": "ok",
            "backends": len(b.backends),
            "backends_up": len(b.health.up(b.backends)),
        }

    @api.get("/metrics")
    async def metrics(b: LiveBalancer) -> Response:
        return Response(b.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/trust")
    async def trust(b: LiveBalancer) -> Response:
        return Response(
            orjson.dumps(b.trust_report(), option=orjson.OPT_SERIALIZE_NUMPY),
            media_type="application/json",
        )

    @api.get("/admin/backends", dependencies=[Depends(_admin)])
    async def list_backends(b: LiveBalancer) -> BackendList:
        return BackendList(backends=list(b.backends))

    @api.post(
        "/admin/backends", dependencies=[Depends(_admin)], status_code=status.HTTP_201_CREATED
    )
    async def add_backend(ref: BackendRef, b: LiveBalancer) -> BackendList:
        if not b.add_backend(ref.url):
            raise HTTPException(status.HTTP_409_CONFLICT, f"backend {ref.url} is already present")
        log.warning("backend %s added through the admin API", ref.url)
        return BackendList(backends=list(b.backends))

    @api.delete("/admin/backends", dependencies=[Depends(_admin)])
    async def remove_backend(
        b: LiveBalancer,
        ref: BackendRef | None = None,
        url: str | None = None,
    ) -> BackendList:
        raw = ref.url if ref is not None else url
        if raw is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY,
                'name the backend: body {"url": ...} or ?url=',
            )
        try:
            target = normalize_backend_url(raw)
        except BackendURLError as err:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(err)) from None
        if not b.remove_backend(target):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"backend {target} is not present")
        log.warning("backend %s removed through the admin API", target)
        return BackendList(backends=list(b.backends))

    return api


@dataclass(slots=True)
class Reply:
    """A complete answer to a client: status, every header to send, and the body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def json_reply(status_code: int, message: str, **extra: Any) -> Reply:
    """An error answer in the balancer's JSON shape `{"error": message, ...}`."""
    body = _error_body(message, **extra)
    return Reply(
        status_code,
        [*_JSON_HEADERS, (b"content-length", str(len(body)).encode("ascii"))],
        body,
    )


def upstream_reply(backend: str, response: UpstreamResponse, method: str) -> Reply:
    """A backend's answer as the client gets it: hop-by-hop headers dropped, length set."""
    status_code = response.status
    if method == "HEAD" or status_code == 304:
        # No body follows; the length the backend declared (that of the full answer) stays.
        headers = [(n, v) for n, v in response.headers if n not in BODYLESS_DROPPED]
    else:
        headers = [(n, v) for n, v in response.headers if n not in RESPONSE_DROPPED]
        if status_code != 204:
            headers.append((b"content-length", str(len(response.body)).encode("ascii")))
    headers.append((b"x-twlb-backend", backend.encode("latin-1")))
    return Reply(status_code, headers, response.body)


class BalancerApp:
    """The balancer's request handling: own endpoints through FastAPI, the rest proxied.

    `forward` is the proxy hot path and `call_api` the bridge to the FastAPI app; the
    HTTP server below (`serve`) calls one or the other for each request.
    """

    def __init__(self, settings: BalancerSettings) -> None:
        self.settings = settings
        self.api = build_api(settings)
        self._max_body = settings.max_body_bytes

    @property
    def balancer(self) -> Balancer:
        """The live balancer (exists between lifespan startup and shutdown)."""
        return self.api.state.balancer

    @staticmethod
    def is_own_path(path: str) -> bool:
        """True for the balancer's reserved paths, which are never proxied."""
        return path in RESERVED_PATHS or path.startswith(ADMIN_PREFIX)

    def too_large(self) -> Reply:
        """The 413 answer to a body over --max-body-bytes (counted)."""
        self.balancer.metrics.requests["too_large"] += 1
        return json_reply(413, f"request body over the limit of {self._max_body} bytes")

    async def forward(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        client_host: str | None,
        body: bytes,
    ) -> Reply:
        """The hot path: filter headers, route with retries, answer, maybe audit.

        `headers` have lower-case names; the body is complete and within the limit.
        """
        balancer: Balancer = self.api.state.balancer
        forwarded: list[tuple[bytes, bytes]] = []
        key: str | None = None
        quorum_header: bytes | None = None
        for name, value in headers:
            if name in REQUEST_DROPPED:
                continue
            if name == b"x-twlb-key":
                key = value.decode("latin-1")
            elif name == b"x-twlb-quorum":
                quorum_header = value
            forwarded.append((name, value))
        if client_host:
            forwarded.append((b"x-forwarded-for", client_host.encode("latin-1")))

        target = raw_path
        if query:
            target = target + b"?" + query
            if key is None and balancer.wants_key and b"key=" in query:
                key = next((v for k, v in parse_qsl(query.decode("latin-1")) if k == "key"), None)

        if quorum_header is not None:
            return await self._quorum(balancer, method, target, forwarded, body, quorum_header)

        result, why = await balancer.route(method, target, forwarded, body, key)
        outcomes = balancer.metrics.requests
        if result is None:
            outcomes["no_backend"] += 1
            return json_reply(503, why)
        response = result.response
        if response is None:
            outcomes["failed"] += 1
            if result.outcome is Outcome.TIMEOUT:
                return json_reply(
                    504, f"backend {result.backend} did not answer in time", backend=result.backend
                )
            return json_reply(
                502, f"backend {result.backend} could not be reached", backend=result.backend
            )
        outcomes["error" if response.status >= 500 else "success"] += 1
        if 200 <= response.status < 300:
            # Only spawns the audit task: it runs after this answer is on its way.
            balancer.maybe_audit(method, target, forwarded, result)
        return upstream_reply(result.backend, response, method)

    async def _quorum(
        self,
        balancer: Balancer,
        method: str,
        target: bytes,
        headers: list,
        body: bytes,
        raw: bytes,
    ) -> Reply:
        try:
            quorum = int(raw)
        except ValueError:
            quorum = 0
        if not 1 <= quorum <= MAX_QUORUM:
            balancer.metrics.requests["bad_request"] += 1
            return json_reply(400, f"X-TWLB-Quorum must be an integer 1..{MAX_QUORUM}")
        if method not in IDEMPOTENT_METHODS:
            balancer.metrics.requests["bad_request"] += 1
            return json_reply(400, f"quorum reads need an idempotent method, not {method}")
        result, why = await balancer.quorum_read(method, target, headers, body, quorum)
        if result is None or result.response is None:
            balancer.metrics.requests["quorum_failed"] += 1
            return json_reply(502, why or "no answer")
        balancer.metrics.requests["success"] += 1
        return upstream_reply(result.backend, result.response, method)

    async def call_api(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        body: bytes,
    ) -> Reply:
        """One request to the FastAPI app of the own endpoints, answered as a whole."""
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": server,
            "client": client,
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "state": {},
        }
        answered = asyncio.Event()
        request_sent = False
        start: Message = {}
        chunks: list[bytes] = []

        async def receive() -> Message:
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    answered.set()

        try:
            await self.api(scope, receive, send)
        finally:
            answered.set()
        if not start:
            return json_reply(500, "the balancer's own endpoint gave no answer")
        payload = b"".join(chunks)
        out = [
            (n.lower(), v)
            for n, v in start.get("headers", ())
            if n.lower() not in (b"content-length", b"transfer-encoding", b"connection")
        ]
        if method != "HEAD":
            out.append((b"content-length", str(len(payload)).encode("ascii")))
        return Reply(start["status"], out, payload)


# -------------------------------------------------------------------- native HTTP server
#: Status lines by code (HTTP/1.1 and the standard reason phrase).
_STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("ascii") for s in HTTPStatus
}

#: Requests parsed ahead of the one being answered before the connection stops reading.
MAX_PIPELINED = 16

#: Largest request line plus headers; a larger head gets 431 and the connection closes.
MAX_HEAD_BYTES = 64 * 1024

#: Seconds an idle keep-alive client connection stays open.
KEEPALIVE_TIMEOUT_S = 30.0

#: Seconds in-flight requests get to finish after SIGTERM before connections are dropped.
SHUTDOWN_GRACE_S = 10.0


def _status_line(status_code: int) -> bytes:
    line = _STATUS_LINES.get(status_code)
    return line if line is not None else f"HTTP/1.1 {status_code} \r\n".encode("ascii")


@dataclass(slots=True)
class _Parsed:
    """One request read off a client connection (or an answer decided while reading it)."""

    method: str
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    early: Reply | None = None


class _ClientConnection(asyncio.Protocol):
    """One client connection: httptools parses, requests are answered one at a time in order.

    The proxy path goes straight to `BalancerApp.forward`; the balancer's own paths go to
    the FastAPI app through `BalancerApp.call_api`. Each answer is one transport write.
    """

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.limit = server.app.settings.max_body_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.client_host: str | None = None
        self.pending: deque[_Parsed] = deque()
        self.task: asyncio.Task | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.busy = False
        self.expect = False
        self.paused = False
        self.closed = False
        self.broken = False
        # The request being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.head = 0
        self.discard = False
        self.last_active = server.clock

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
            self.client_host = self.client[0]
        self.server.connections.add(self)
        self.task = self.server.loop.create_task(self._serve())
        self.server.tasks.add(self.task)
        self.task.add_done_callback(self.server.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        self.server.connections.discard(self)
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        self.last_active = self.server.clock
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._break(json_reply(501, "protocol upgrades are not supported"))
        except httptools.HttpParserError as err:
            if self.head > MAX_HEAD_BYTES:
                self._break(json_reply(431, f"request head over {MAX_HEAD_BYTES} bytes"))
            else:
                self._break(json_reply(400, f"malformed HTTP request: {err}"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []
        self.size = 0
        self.head = 0
        self.discard = False
        self.expect = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head += len(url)
        if self.head > MAX_HEAD_BYTES:
            raise ValueError("request head too large")  # the parser raises HttpParserError

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head += len(name) + len(value)
        if self.head > MAX_HEAD_BYTES:
            raise ValueError("request head too large")
        name = name.lower()
        self.headers.append((name, value))
        if name == b"content-length":
            # The parser has checked the value is a number (or raised).
            self.size = -int(value)
        elif name == b"expect":
            self.expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        if -self.size > self.limit:
            self._answer_early(self.app.too_large())
        self.size = 0
        if (
            not self.discard
            and self.transport is not None
            and self.expect
            and not self.pending
            and not self.busy
        ):
            # Nothing is being answered on this connection, so the interim answer is in order.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.discard:
            return
        self.size += len(body)
        if self.size > self.limit:
            self.body = []
            self._answer_early(self.app.too_large())
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.discard:
            self.discard = False  # the early answer is queued; the body was read and dropped
            return
        body = self.body
        self._queue(
            _Parsed(
                self.parser.get_method().decode("ascii"),
                self.url,
                self.headers,
                body[0] if len(body) == 1 else b"".join(body),
                self.parser.should_keep_alive(),
            )
        )

    # internals
    def _answer_early(self, reply: Reply) -> None:
        """Queue the answer now and read the rest of this request's body into the void."""
        if self.discard:
            return
        self.discard = True
        self._queue(
            _Parsed(
                self.parser.get_method().decode("ascii"),
                self.url,
                self.headers,
                b"",
                self.parser.should_keep_alive(),
                early=reply,
            )
        )

    def _break(self, reply: Reply) -> None:
        """An unreadable stream: answer after what is queued, then close."""
        self.broken = True
        self._queue(_Parsed("GET", b"", [], b"", False, early=reply))

    def _queue(self, parsed: _Parsed) -> None:
        self.pending.append(parsed)
        if len(self.pending) > MAX_PIPELINED and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter.set_result(None)

    async def _serve(self) -> None:
        """The connection's one task: answer queued requests in order, sleep when idle."""
        # One long-lived task per connection, not one per request: task creation and
        # registration cost measurably more than a future per idle period.
        loop = self.server.loop
        pending = self.pending
        while not self.closed:
            if not pending:
                if self.server.stopping:
                    self._close()
                    break
                self.waiter = loop.create_future()
                await self.waiter
                continue
            parsed = pending.popleft()
            self.busy = True
            try:
                reply = parsed.early or await self._handle(parsed)
            except Exception:
                log.exception("request %s %r failed", parsed.method, parsed.url)
                reply = json_reply(500, "internal error in the balancer")
                parsed.keep_alive = False
            self.busy = False
            self._write(reply, parsed)
            if self.paused and len(pending) <= MAX_PIPELINED // 2 and not self.closed:
                self.paused = False
                self.transport.resume_reading()  # type: ignore[union-attr]

    async def _handle(self, parsed: _Parsed) -> Reply:
        url = parsed.url
        query = b""
        if url[:1] != b"/":
            parts = httptools.parse_url(url)  # absolute form: proxy-style request target
            path, query = parts.path or b"/", parts.query or b""
        else:
            mark = url.find(b"?")
            path = url if mark < 0 else url[:mark]
            if mark >= 0:
                query = url[mark + 1 :]
            frag = path.find(b"#")
            if frag >= 0:
                path = path[:frag]
        name = path.decode("latin-1")
        if b"%" in path:
            name = unquote(name)
        if self.app.is_own_path(name):
            return await self.app.call_api(
                parsed.method,
                path,
                query,
                parsed.headers,
                self.client,
                self.server.sockname,
                parsed.body,
            )
        return await self.app.forward(
            parsed.method, path, query, parsed.headers, self.client_host, parsed.body
        )

    def _write(self, reply: Reply, parsed: _Parsed) -> None:
        if self.closed or self.transport is None:
            return
        parts = [_status_line(reply.status)]
        for name, value in reply.headers:
            parts += (name, b": ", value, b"\r\n")
        keep_alive = parsed.keep_alive and not self.server.stopping
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (self.server.date_line, b"\r\n")
        if parsed.method != "HEAD":
            parts.append(reply.body)
        self.transport.write(b"".join(parts))
        if not keep_alive:
            self._close()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Stop taking requests: close now if idle, else after the answer in progress."""
        if not self.busy and not self.pending:
            self._close()
        self._wake()


class HttpServer:
    """The balancer's HTTP/1.1 server: keep-alive, in-order answers, one listening port."""

    def __init__(self, app: BalancerApp) -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.connections: set[_ClientConnection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self.sockname: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self.date_line = b""
        self.clock = self.loop.time()
        self._clock: asyncio.TimerHandle | None = None
        self._tick()

    def _tick(self) -> None:
        """Once a second: the Date header, the coarse clock, idle keep-alive connections."""
        # Backends' Date headers are dropped (as hop-specific as Server), so the balancer
        # dates its answers itself (RFC 9110 section 6.6.1), at a second's resolution.
        self.date_line = b"date: " + formatdate(usegmt=True).encode("ascii") + b"\r\n"
        self.clock = now = self.loop.time()
        for conn in [c for c in self.connections if not c.busy and not c.pending]:
            if now - conn.last_active > KEEPALIVE_TIMEOUT_S:
                conn._close()
        self._clock = self.loop.call_later(1.0, self._tick)

    async def start(self, host: str, port: int, backlog: int = 2048) -> None:
        self._server = await self.loop.create_server(
            lambda: _ClientConnection(self), host, port, backlog=backlog, reuse_address=True
        )
        sock = self._server.sockets[0].getsockname()
        self.sockname = (str(sock[0]), int(sock[1]))

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop listening, let answers in progress finish (bounded), close every connection."""
        self.stopping = True
        if self._clock is not None:
            self._clock.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=grace_s)
            for task in late:
                task.cancel()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()


async def serve(app: BalancerApp, host: str, port: int) -> int | None:
    """Run the balancer on host:port until SIGTERM or SIGINT; returns that signal's number.

    The FastAPI lifespan (which opens and closes the `Balancer`) wraps the listening time.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    async with app.api.router.lifespan_context(app.api):
        server = HttpServer(app)
        await server.start(host, port)
        log.info("balancer listening on http://%s:%d", *(server.sockname or (host, port)))
        await stop.wait()
        log.info("balancer shutting down")
        await server.stop()
    return received[0] if received else None


def create_app(settings: BalancerSettings) -> BalancerApp:
    """A new balancer app; nothing is opened until its lifespan starts."""
    if settings.oracle_truth is not None:
        load_oracle_truth(settings.oracle_truth)  # fail now, not on the first tick
    if settings.model is not None:
        from twlb.balancer.onnx_scorer import OnnxScorer

        OnnxScorer.load(settings.model)  # a refused model stops start-up (ModelRefused)
    return BalancerApp(settings)
