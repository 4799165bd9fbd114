"""The balancer's own endpoints (FastAPI): health, metrics, trust report, admin API.

`build_api(balancer)` builds the app around an existing `Balancer`; its lifespan starts
and stops that balancer's background loops.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any

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


def build_api(balancer: Balancer) -> FastAPI:
    """The FastAPI app serving the balancer's own endpoints around `balancer`; its lifespan
    starts and stops the balancer's background loops."""
    settings = balancer.settings

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

    return api
