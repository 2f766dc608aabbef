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
  token endpoint, checks the ID token (signature by the provider's JWKS, issuer, audience = the
  client id, the nonce sent) when the provider returns one, and the access token like every
  other token (issuer, audience, JWKS, roles), then sets the session cookie. The state cookie
  is cleared by every callback, whatever its outcome: a login attempt is good once.

Refusals: a state that does not match the cookie -> 401 ``OIDC_STATE_MISMATCH``; the provider
refusing the code (replayed, wrong verifier, wrong client secret: an OAuth error answer) -> 401
``OIDC_CODE_REJECTED`` (metadata ``error``: the provider's error code); the provider
unreachable or answering garbage -> 502 ``OIDC_PROVIDER_UNAVAILABLE``; a discovery document of
another issuer -> 502 ``OIDC_ISSUER_MISMATCH``; an ID token not for us or with another nonce ->
401 ``OIDC_ID_TOKEN_INVALID``; an access token atlasflow does not accept -> 401 with the token
check's reason (``INVALID_TOKEN``, cause in metadata).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import jwt
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


def _error(status: int, reason: str, message: str, metadata: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "reason": reason, "message": message, "metadata": metadata or {}}},
        status_code=status,
    )


class _ProviderError(Exception):
    """The provider answered with an OAuth error (``error``: its code) or not usefully."""

    def __init__(self, error: str, refused: bool) -> None:
        super().__init__(error)
        self.error = error
        self.refused = refused  # True: an OAuth error answer (4xx); False: unreachable or garbage


def _http_json(url: str, data: dict[str, str] | None = None) -> dict[str, Any]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 - the configured provider's https URL
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500:
            try:
                error = str(json.loads(exc.read()).get("error", "")) or f"http_{exc.code}"
            except (ValueError, AttributeError, OSError):
                error = f"http_{exc.code}"
            raise _ProviderError(error[:64], refused=True) from None
        raise _ProviderError(f"http_{exc.code}", refused=False) from None
    except (OSError, ValueError) as exc:
        raise _ProviderError(type(exc).__name__, refused=False) from None
    if not isinstance(doc, dict):
        raise _ProviderError("not_an_object", refused=False)
    return doc


def _same(a: str, b: str) -> bool:
    """Constant-time comparison of two strings (any characters: a forged query may hold any)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


class Login:
    def __init__(self, settings: GatewaySettings, sessions: Sessions) -> None:
        self.settings = settings
        self.sessions = sessions
        self.users = UserFile(settings.users_file) if settings.users_file else None
        self.issuer = LocalIssuer.create_or_load(Path(settings.local_issuer_dir)) if settings.local_issuer_dir else None
        self._discovery: dict[str, Any] | None = None
        self._id_keys: jwt.PyJWKClient | None = None

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
        """The provider's discovery document (cached once fetched and checked); `_ProviderError`."""
        if self._discovery is None:
            url = self.settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = await asyncio.to_thread(_http_json, url)
            # OpenID Connect Discovery 1.0 section 4.3: the document's issuer is the one configured
            if str(doc.get("issuer", "")).rstrip("/") != self.settings.oidc_issuer.rstrip("/"):
                raise _ProviderError("issuer_mismatch", refused=False)
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not str(doc.get(key, "")).startswith(("https://", "http://")):
                    raise _ProviderError(f"no_{key}", refused=False)
            self._discovery = doc
        return self._discovery

    def _check_id_token(self, id_token: str, jwks_uri: str, nonce: str) -> None:
        """Blocking (a JWKS fetch): the ID token is the provider's, for this client, for this
        login attempt (the nonce); `jwt.PyJWTError` otherwise."""
        if self._id_keys is None:
            self._id_keys = jwt.PyJWKClient(jwks_uri, cache_keys=True, lifespan=300, timeout=10)
        key = self._id_keys.get_signing_key_from_jwt(id_token)
        claims = jwt.decode(
            id_token,
            key,
            algorithms=list(self.settings.auth_algorithms),
            audience=self.settings.oidc_client_id,
            issuer=str(self._discovery["issuer"]) if self._discovery else self.settings.oidc_issuer,
            leeway=30,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
        if not _same(str(claims.get("nonce", "")), nonce):
            raise jwt.InvalidTokenError("nonce")

    async def oidc_start(self, request: Request) -> Response:
        s = self.settings
        if not (s.oidc_issuer and s.oidc_client_id and s.oidc_redirect_uri):
            return _error(404, "OIDC_NOT_CONFIGURED", "this gateway has no OIDC provider configured")
        try:
            provider = await self._provider()
        except _ProviderError as exc:
            return self._unavailable(exc)
        state = secrets.token_urlsafe(24)
        nonce = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": s.oidc_client_id,
                "redirect_uri": s.oidc_redirect_uri,
                "scope": s.oidc_scopes,
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        response = RedirectResponse(f"{provider['authorization_endpoint']}?{query}", status_code=302)
        response.set_cookie(
            OIDC_COOKIE,
            f"{state}.{verifier}.{nonce}",
            max_age=600,
            httponly=True,
            secure=self.sessions.secure,
            samesite="lax",
            path="/login/oidc",
        )
        return response

    @staticmethod
    def _unavailable(exc: _ProviderError) -> Response:
        log.warning("oidc provider unavailable", extra={"fields": {"cause": exc.error}})
        if exc.error == "issuer_mismatch":
            return _error(502, "OIDC_ISSUER_MISMATCH", "the provider's discovery document names another issuer")
        return _error(502, "OIDC_PROVIDER_UNAVAILABLE", "the login provider did not answer usefully; try again")

    async def oidc_callback(self, request: Request) -> Response:
        response = await self._callback(request)
        response.delete_cookie(OIDC_COOKIE, path="/login/oidc", httponly=True, secure=self.sessions.secure)
        return response

    async def _callback(self, request: Request) -> Response:
        s = self.settings
        if not s.oidc_issuer:
            return _error(404, "OIDC_NOT_CONFIGURED", "this gateway has no OIDC provider configured")
        if "error" in request.query_params:
            return _error(401, "OIDC_DENIED", "the provider did not log you in")
        state, verifier, nonce = (request.cookies.get(OIDC_COOKIE, "").split(".") + ["", "", ""])[:3]
        given = request.query_params.get("state", "")
        code = request.query_params.get("code", "")
        if not state or not verifier or not nonce or not code or not _same(state, given):
            log.warning("oidc login refused", extra={"fields": {"cause": "state_mismatch"}})
            return _error(401, "OIDC_STATE_MISMATCH", "the login was not started here or has expired; log in again")
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
            provider = await self._provider()
            tokens = await asyncio.to_thread(_http_json, str(provider["token_endpoint"]), form)
        except _ProviderError as exc:
            if not exc.refused:
                return self._unavailable(exc)
            log.warning("oidc login refused", extra={"fields": {"cause": "code_rejected", "error": exc.error}})
            return _error(
                401, "OIDC_CODE_REJECTED", "the provider did not accept this login; log in again", {"error": exc.error}
            )
        access = str(tokens.get("access_token", ""))
        if self.sessions.verifier is None or not access:
            return _error(401, "OIDC_NO_TOKEN", "the provider returned no access token")
        id_token = str(tokens.get("id_token", ""))
        if id_token:
            try:
                await asyncio.to_thread(self._check_id_token, id_token, str(provider["jwks_uri"]), nonce)
            except (jwt.PyJWTError, jwt.PyJWKClientError) as exc:
                log.warning("oidc login refused", extra={"fields": {"cause": "id_token", "error": type(exc).__name__}})
                return _error(401, "OIDC_ID_TOKEN_INVALID", "the provider's ID token is not for this login")
        try:
            identity = await asyncio.to_thread(self.sessions.verifier.verify, access)
        except Unauthenticated as exc:
            log.warning("oidc login refused", extra={"fields": {"cause": exc.metadata.get("cause", "")}})
            return _error(
                401,
                exc.reason,
                "the provider's token is not accepted by atlasflow",
                {"cause": exc.metadata.get("cause", "")},
            )
        try:
            ttl = min(float(tokens.get("expires_in", s.session_ttl_s)), s.session_ttl_s)
        except (TypeError, ValueError):
            ttl = s.session_ttl_s
        log.info("oidc login", extra={"fields": {"subject": identity.subject, "roles": sorted(identity.roles)}})
        # a same-site page, not a redirect: the SameSite=Strict cookie is sent from here on
        response = HTMLResponse('<!doctype html><meta http-equiv="refresh" content="0;url=/"><a href="/">continue</a>')
        self.sessions.set_cookie(response, access, ttl)
        return response

    def routes(self) -> list[Route]:
        return [
            Route("/login", self.form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/login/oidc", self.oidc_start, methods=["GET"]),
            Route("/login/oidc/callback", self.oidc_callback, methods=["GET"]),
        ]
