"""The balancer's own endpoints (FastAPI): health, metrics, trust report, admin API.

`build_api(balancer)` builds the app around an existing `Balancer`; its lifespan starts
and stops that balancer's background loops.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from twlb.balancer.core import Balancer
from twlb.balancer.discovery import start_discovery
from twlb.balancer.upstream import BackendURLError, normalize_backend_url

from twlb.tokens import Token

if TYPE_CHECKING:
    from twlb.balancer.replicas import Replicas

from twlb import __version__

log = logging.getLogger("twlb.balancer")


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


class ErrorReply(BaseModel):
    """Every error the balancer's own endpoints answer: `{"error": reason}`."""

    error: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of an admin route, for its OpenAPI description."""
    why = {
        401: "No bearer token, or the wrong one.",
        403: "The admin API is disabled (no token configured).",
        400: "The body is not JSON.",
        404: "The backend is not in the fleet.",
        409: "The backend is already in the fleet.",
        422: "The backend URL is missing or not one the upstream client can use.",
    }
    return {c: {"model": ErrorReply, "description": why[c]} for c in (401, 403, *codes)}


_bearer = HTTPBearer(auto_error=False)


async def _live_balancer(request: Request) -> Balancer:
    return request.app.state.balancer


LiveBalancer = Annotated[Balancer, Depends(_live_balancer)]


async def _admin(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Admin calls need the configured bearer token; without one, admin is disabled."""
    token: Token = request.app.state.token
    if token.value is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin disabled")
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "admin API needs Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not token.matches(creds.credentials):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "wrong admin token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def build_api(
    balancer: Balancer, token: Token | None = None, replicas: Replicas | None = None
) -> FastAPI:
    """The FastAPI app serving the balancer's own endpoints around `balancer`; its lifespan
    starts and stops the balancer's background loops (and the evidence sharing of
    `replicas`, when it has peers or a file). `token` guards /admin/* (default: the
    settings' --admin-token)."""
    settings = balancer.settings
    token = token or Token(settings.admin_token)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await balancer.start()
        # On Kubernetes the backends may come from their Services (discovery.py).
        discovery = await start_discovery(balancer)
        log.info(
            "balancer up: policy %s, %d backends, audits %.3f",
            settings.policy.value,
            len(balancer.backends),
            settings.audit_fraction,
        )
        try:
            yield
        finally:
            if replicas is not None:
                await replicas.stop()
            if discovery is not None:
                discovery.stop()
            await balancer.stop()

    api = FastAPI(
        title="TW-LB balancer",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/admin/openapi.json",
    )
    api.state.balancer = balancer
    api.state.token = token
    # No redirect from /admin/backends/ to /admin/backends: Starlette would build its
    # Location from the client's Host header, an address the client chose.
    api.router.redirect_slashes = False

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Any, exc: RequestValidationError) -> JSONResponse:
        # One error shape for every answer of this API, the reasons named field by field.
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
            for e in exc.errors()
        )
        return JSONResponse({"error": f"invalid request: {reasons}"}, status_code=422)

    @api.get("/healthz")
    async def healthz(b: LiveBalancer) -> dict[str, Any]:
        return {
            "status": "ok",
            "backends": len(b.backends),
            "backends_up": len(b.health.up(b.backends)),
        }

    @api.get("/readyz")
    async def readyz(b: LiveBalancer) -> JSONResponse:
        # Readiness, not liveness: 503 while draining, while the evidence of peers and of
        # the last run is taken in at start, and while no backend is up.
        ready, why = b.readiness()
        return JSONResponse(
            {"ready": ready, "reason": why, "backends_up": len(b.up)},
            status_code=200 if ready else 503,
        )

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(b: LiveBalancer) -> Response:
        # Rendered a slice of the fleet per loop turn, and shared by the scrapes of a second.
        return Response(await b.metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/trust")
    async def trust(b: LiveBalancer) -> Response:
        return Response(
            orjson.dumps(b.trust_report(), option=orjson.OPT_SERIALIZE_NUMPY),
            media_type="application/json",
        )

    @api.get("/admin/backends", dependencies=[Depends(_admin)], responses=_errors())
    async def list_backends(b: LiveBalancer) -> BackendList:
        return BackendList(backends=list(b.backends))

    @api.post(
        "/admin/backends",
        dependencies=[Depends(_admin)],
        status_code=status.HTTP_201_CREATED,
        responses=_errors(400, 409, 422),
    )
    async def add_backend(ref: BackendRef, b: LiveBalancer) -> BackendList:
        if not b.add_backend(ref.url):
            raise HTTPException(status.HTTP_409_CONFLICT, f"backend {ref.url} is already present")
        log.warning("backend %s added through the admin API", ref.url)
        return BackendList(backends=list(b.backends))

    @api.delete("/admin/backends", dependencies=[Depends(_admin)], responses=_errors(400, 404, 422))
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

    @api.get("/admin/evidence", dependencies=[Depends(_admin)], responses=_errors())
    async def evidence(b: LiveBalancer) -> Response:
        """This balancer's audit evidence (`EvidenceBook.export`), and with peers what it
        shares and what they last said."""
        now = b.clock()
        doc: dict[str, Any] = {"evidence": b.export_evidence(now)}
        if replicas is not None:
            doc["replica"] = settings.replica_id
            doc["shared"] = replicas.document()
            doc["peers"] = {
                name: {"received_s_ago": round(now - v.received_at, 3),
                       "claims": sorted(v.claims)}
                for name, v in replicas.sharing.views.items()
            }  # fmt: skip
            doc["watched"] = sorted(b.auditor.watched)
            doc["replays"] = replicas.replayed
            doc["exchanges"] = replicas.exchanges
        return Response(orjson.dumps(doc), media_type="application/json")

    @api.post(
        "/admin/evidence/exchange", dependencies=[Depends(_admin)], responses=_errors(400, 404)
    )
    async def exchange(request: Request) -> Response:
        """A peer replica's evidence document in, this replica's out (replicas.py)."""
        if replicas is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "this balancer shares no evidence")
        try:
            doc = orjson.loads(await request.body())
            mine = replicas.answer(doc)
        except orjson.JSONDecodeError as err:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"not JSON: {err}") from None
        except ValueError as err:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(err)) from None
        return Response(orjson.dumps(mine), media_type="application/json")

    return api
