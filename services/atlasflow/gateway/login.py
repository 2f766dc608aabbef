"""Login: the demo users of the local stack (password -> a token of the stack's own issuer), and
OIDC authorization code + PKCE against the hospital's provider (a cluster).

Either way the session cookie holds a short-lived bearer JWT that the gRPC services accept; the
gateway keeps no session state of its own. Routes:

- ``GET /login``: a minimal form (the review app has its own);
- ``POST /login``: form or JSON ``{"username", "password"}`` -> 200 ``{"subject", "roles",
  "expires_in"}`` + the session cookie; a wrong user or password -> 401 ``LOGIN_FAILED``;
- ``POST /logout``: clears the cookie;
- ``GET /login/oidc``: redirect to the provider (state + PKCE S256 verifier in a short-lived
  HttpOnly cookie, SameSite=Lax so that it comes back with the provider's redirect);
- ``GET /login/oidc/callback``: checks state, exchanges the code (with the verifier) at the
  token endpoint, checks the access token like every other token, sets the session cookie.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from atlasflow.common.auth import LocalIssuer
from atlasflow.common.errors import Unauthenticated
from atlasflow.common.users import UserFile
from atlasflow.gateway.session import Sessions
from atlasflow.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
OIDC_COOKIE = "atlasflow_oidc"

_FORM = """<!doctype html><html><head><meta charset="utf-8"><title>atlasflow login</title></head>
<body><form method="post" action="/login"><h1>atlasflow</h1>
<label>User <input name="username" autocomplete="username"></label>
<label>Password <input name="password" type="password" autocomplete="current-password"></label>
<button type="submit">Log in</button></form>{oidc}</body></html>"""


def _error(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "reason": reason, "message": message, "metadata": {}}}, status_code=status
    )


def _http_json(url: str, data: dict[str, str] | None = None) -> dict[str, Any]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 - the configured provider's https URL
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


class Login:
    def __init__(self, settings: GatewaySettings, sessions: Sessions) -> None:
        self.settings = settings
        self.sessions = sessions
        self.users = UserFile(settings.users_file) if settings.users_file else None
        self.issuer = LocalIssuer.create_or_load(Path(settings.local_issuer_dir)) if settings.local_issuer_dir else None
        self._discovery: dict[str, Any] | None = None

    # ------------------------------------------------------------------ local users
    async def form(self, request: Request) -> Response:
        oidc = '<p><a href="/login/oidc">Log in with your organisation</a></p>' if self.settings.oidc_issuer else ""
        return HTMLResponse(_FORM.format(oidc=oidc))

    async def login(self, request: Request) -> Response:
        if self.users is None or self.issuer is None:
            return _error(404, "PASSWORD_LOGIN_DISABLED", "this gateway has no local users; use /login/oidc")
        if request.headers.get("content-type", "").startswith("application/json"):
            doc = await request.json()
            username, password = str(doc.get("username", "")), str(doc.get("password", ""))
        else:
            form = await request.form()
            username, password = str(form.get("username", "")), str(form.get("password", ""))
        user = await asyncio.to_thread(self.users.check, username, password) if username and password else None
        if user is None:
            log.warning("login refused", extra={"cause": "bad_credentials"})
            return _error(401, "LOGIN_FAILED", "unknown user or wrong password")
        ttl = self.settings.session_ttl_s
        token = self.issuer.mint(user.subject, user.roles, ttl_s=ttl, audience=self.settings.auth_audience)
        response = JSONResponse({"subject": user.subject, "roles": list(user.roles), "expires_in": int(ttl)})
        self.sessions.set_cookie(response, token, ttl)
        return response

    async def logout(self, request: Request) -> Response:
        response = JSONResponse({"logged_out": True})
        self.sessions.clear_cookie(response)
        return response

    # ------------------------------------------------------------------ OIDC
    async def _provider(self) -> dict[str, Any]:
        if self._discovery is None:
            url = self.settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
            self._discovery = await asyncio.to_thread(_http_json, url)
        return self._discovery

    async def oidc_start(self, request: Request) -> Response:
        s = self.settings
        if not (s.oidc_issuer and s.oidc_client_id and s.oidc_redirect_uri):
            return _error(404, "OIDC_NOT_CONFIGURED", "this gateway has no OIDC provider configured")
        provider = await self._provider()
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": s.oidc_client_id,
                "redirect_uri": s.oidc_redirect_uri,
                "scope": s.oidc_scopes,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        response = RedirectResponse(f"{provider['authorization_endpoint']}?{query}", status_code=302)
        response.set_cookie(
            OIDC_COOKIE,
            f"{state}.{verifier}",
            max_age=600,
            httponly=True,
            secure=self.sessions.secure,
            samesite="lax",
            path="/login/oidc",
        )
        return response

    async def oidc_callback(self, request: Request) -> Response:
        s = self.settings
        if not s.oidc_issuer:
            return _error(404, "OIDC_NOT_CONFIGURED", "this gateway has no OIDC provider configured")
        if "error" in request.query_params:
            return _error(401, "OIDC_DENIED", "the provider did not log you in")
        state, _, verifier = request.cookies.get(OIDC_COOKIE, "").partition(".")
        given = request.query_params.get("state", "")
        code = request.query_params.get("code", "")
        if not state or not verifier or not code or not hmac.compare_digest(state, given):
            return _error(401, "OIDC_STATE_MISMATCH", "the login was not started here or has expired; log in again")
        provider = await self._provider()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": s.oidc_redirect_uri,
            "client_id": s.oidc_client_id,
            "code_verifier": verifier,
        }
        if s.oidc_client_secret_file:
            form["client_secret"] = Path(s.oidc_client_secret_file).read_text().strip()
        try:
            tokens = await asyncio.to_thread(_http_json, str(provider["token_endpoint"]), form)
        except OSError:
            return _error(502, "OIDC_TOKEN_EXCHANGE_FAILED", "the provider did not exchange the code")
        access = str(tokens.get("access_token", ""))
        if self.sessions.verifier is None or not access:
            return _error(401, "OIDC_NO_TOKEN", "the provider returned no access token")
        try:
            self.sessions.verifier.verify(access)
        except Unauthenticated as exc:
            return _error(401, exc.reason, "the provider's token is not accepted by atlasflow")
        ttl = float(tokens.get("expires_in", s.session_ttl_s))
        # a same-site page, not a redirect: the SameSite=Strict cookie is sent from here on
        response = HTMLResponse('<!doctype html><meta http-equiv="refresh" content="0;url=/"><a href="/">continue</a>')
        self.sessions.set_cookie(response, access, ttl)
        response.delete_cookie(OIDC_COOKIE, path="/login/oidc")
        return response

    def routes(self) -> list[Route]:
        return [
            Route("/login", self.form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/login/oidc", self.oidc_start, methods=["GET"]),
            Route("/login/oidc/callback", self.oidc_callback, methods=["GET"]),
        ]
