"""Who is calling the gateway: a bearer token (``Authorization: Bearer``) or the session cookie.

Both hold the same kind of token as the gRPC APIs (a JWT of the configured issuer), checked with
the same `TokenVerifier`; the gateway then forwards it on every gRPC call, so the services'
policy and audit see the user. The session cookie (`COOKIE`) is HttpOnly, SameSite=Strict and
Secure on https; a request authenticated by the cookie that changes something (POST, PUT,
PATCH, DELETE) must also carry the header ``X-Atlasflow-Request: 1``, which a cross-site form
cannot set (defence in depth besides SameSite).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from atlasflow.common.auth import Identity, TokenVerifier
from atlasflow.common.errors import Unauthenticated

COOKIE = "atlasflow_session"
CSRF_HEADER = "x-atlasflow-request"
_UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass(frozen=True)
class Caller:
    """A verified caller and the token to forward on its behalf."""

    identity: Identity
    token: str
    via_cookie: bool


class AuthError(Exception):
    """401 or 403 before any service is called."""

    def __init__(self, status: int, reason: str, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.cause = cause


def bearer_of(request: Request) -> str:
    header = request.headers.getlist("authorization")
    if len(header) > 1:
        raise AuthError(401, "INVALID_TOKEN", "the bearer token was not accepted", "several_authorization_headers")
    if header:
        scheme, _, token = header[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "INVALID_TOKEN", "the Authorization header must be 'Bearer <token>'", "malformed")
        return token.strip()
    return ""


class Sessions:
    """Checks callers; sets and clears the session cookie."""

    def __init__(self, verifier: TokenVerifier | None, *, secure: bool, ttl_s: float) -> None:
        self.verifier = verifier
        self.secure = secure
        self.ttl_s = ttl_s

    def caller(self, request: Request) -> Caller:
        """The verified caller; `AuthError` 401 without a valid token."""
        token = bearer_of(request)
        via_cookie = False
        if not token:
            token = request.cookies.get(COOKIE, "")
            via_cookie = bool(token)
        if not token:
            raise AuthError(401, "MISSING_TOKEN", "log in or send 'Authorization: Bearer <token>'")
        if self.verifier is None:
            raise AuthError(401, "AUTH_NOT_CONFIGURED", "the gateway has no token issuer configured")
        try:
            identity = self.verifier.verify(token)
        except Unauthenticated as exc:
            raise AuthError(401, exc.reason, exc.message, exc.metadata.get("cause", "")) from None
        if via_cookie and request.method in _UNSAFE and request.headers.get(CSRF_HEADER) != "1":
            raise AuthError(
                403,
                "CSRF_HEADER_REQUIRED",
                f"a cookie-authenticated {request.method} needs the header {CSRF_HEADER}: 1",
            )
        return Caller(identity, token, via_cookie)

    def set_cookie(self, response: Response, token: str, max_age_s: float | None = None) -> None:
        response.set_cookie(
            COOKIE,
            token,
            max_age=int(max_age_s if max_age_s is not None else self.ttl_s),
            httponly=True,
            secure=self.secure,
            samesite="strict",
            path="/",
        )

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, secure=self.secure, samesite="strict")
