"""`atlasflow serve gateway`: the web gateway (ASGI, Starlette on uvicorn).

`build_app` wires the gRPC backends (calls made as the user), the session check, login, the
review JSON API (`/api/v1`) and DICOMweb (`/dicomweb`), and maps every error to an HTTP status
in one place: a gRPC status through `backends.HTTP_STATUS` (its ErrorInfo reason kept), an
authentication failure to 401 (403 for the CSRF header), a bad request to 400.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from prometheus_client import start_http_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from atlasflow.common.audit import AuditLog
from atlasflow.common.audit_server import audit_location
from atlasflow.common.errors import AtlasflowError
from atlasflow.common.telemetry import setup_logging
from atlasflow.gateway.api import Api, BadRequest
from atlasflow.gateway.audit import BLOB_ACTIONS, GatewayAudit, session_identity
from atlasflow.gateway.backends import HTTP_STATUS, Backends, HttpError, http_error_of
from atlasflow.gateway.dicomweb import DicomWeb
from atlasflow.gateway.login import Login
from atlasflow.gateway.session import COOKIE, AuthError, Sessions
from atlasflow.gateway.settings import PREFIX, GatewaySettings
from atlasflow.gateway.web import review_app_routes

log = logging.getLogger(__name__)

_INDEX = """<!doctype html><html><head><meta charset="utf-8"><title>atlasflow</title></head><body>
<h1>atlasflow gateway</h1><p><a href="/login">Log in</a> &middot; API: <code>/api/v1</code> &middot;
DICOMweb: <code>/dicomweb</code></p></body></html>"""


def build_app(settings: GatewaySettings, *, backends: Backends | None = None) -> Starlette:
    """The gateway's ASGI application (its gRPC channels close with the app's lifespan)."""
    backends = backends or Backends(settings)
    secure = bool(settings.tls_cert_file and settings.tls_key_file)
    sessions = Sessions(settings.verifier(), secure=secure, ttl_s=settings.session_ttl_s)
    blobs = settings.blob_store()
    login = Login(settings, sessions)
    api = Api(backends, sessions, blobs)
    dicomweb = DicomWeb(backends, sessions)
    # the gateway's own audit log (gateway/audit.py): logins, blob downloads, refusals
    audit = GatewayAudit(AuditLog(audit_location(settings)), sessions.caller)

    async def index(request: Request) -> Response:
        return HTMLResponse(_INDEX)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "SERVING"})

    async def on_grpc(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, grpc.RpcError)
        return http_error_of(exc).response()

    async def on_auth(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AuthError)
        await audit.auth_refused(request, exc.status, exc.reason, exc.cause)
        meta = {"cause": exc.cause} if exc.cause else {}
        return HttpError(exc.status, exc.reason, exc.message, meta).response()

    async def on_bad(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BadRequest)
        return exc.error.response()

    async def on_domain(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AtlasflowError)
        status = HTTP_STATUS.get(getattr(grpc.StatusCode, exc.code), 500)
        message = exc.message if status < 500 else "internal error"
        return HttpError(status, exc.reason, message, exc.metadata).response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backends.open()
        yield
        await backends.close()
        await audit.close()

    routes = [
        *review_app_routes(settings.web_dir),  # the review app (/ -> /app/); gateway/web/
        Route("/", index, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        *_audited_login(login.routes(), audit, session_identity(sessions.verifier, COOKIE)),
        *_audited_blobs(api.routes(), audit),
        *audit.routes(),
        *dicomweb.routes(),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={grpc.RpcError: on_grpc, AuthError: on_auth, BadRequest: on_bad, AtlasflowError: on_domain},
        lifespan=lifespan,
    )


_LOGINS = {("/login", "POST"), ("/login/oidc/callback", "GET")}


def _audited_login(routes: list[Route], audit: GatewayAudit, identity_of: Any) -> list[Route]:
    """The login routes, the two that log a user in recorded (success or failure)."""
    out = []
    for r in routes:
        methods = r.methods or set()
        hit = next((m for p, m in _LOGINS if p == r.path and m in methods), None)
        out.append(Route(r.path, audit.login(r.endpoint, identity_of), methods=[hit]) if hit else r)
    return out


def _audited_blobs(routes: list[Route], audit: GatewayAudit) -> list[Route]:
    """The review API's routes, the blob downloads recorded with their case id."""
    out = []
    for r in routes:
        action = next((a for suffix, a in BLOB_ACTIONS.items() if r.path.endswith(suffix)), None)
        out.append(Route(r.path, audit.blob(r.endpoint, action), methods=["GET"]) if action else r)
    return out


def main() -> None:
    settings = GatewaySettings.from_env(PREFIX)
    setup_logging("gateway", settings.log_level)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.http_host)
    app = build_app(settings)
    ssl = {}
    if settings.tls_cert_file and settings.tls_key_file:
        ssl = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
    if local_blobs := settings.local_blob_dir():
        Path(local_blobs).mkdir(parents=True, exist_ok=True)
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        **ssl,  # type: ignore[arg-type]  # uvicorn.run's ssl_* keywords are typed individually
    )
