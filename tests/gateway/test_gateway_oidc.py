"""OIDC authorization code + PKCE through the gateway, against a small OIDC provider written
here (a peer, like the hospital's Keycloak or Entra ID: not one of our services).

The provider publishes its discovery document and JWKS (an ES256 key), checks at /authorize
that the request is a code flow with an S256 code_challenge for the registered client and
redirect URI, and at /token the client id and secret, the redirect URI, that the code is
unused and that SHA-256(code_verifier) is the challenge. Both run as real HTTP servers
(uvicorn in threads); the browser is a `requests` session that follows the redirects by hand.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
import requests
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from atlasflow.gateway.app import build_app
from atlasflow.gateway.login import OIDC_COOKIE
from atlasflow.gateway.session import COOKIE
from atlasflow.gateway.settings import GatewaySettings

CLIENT_ID = "atlasflow-gateway"
CLIENT_SECRET = "s3cret-of-the-gateway"
AUDIENCE = "atlasflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64url_sha256(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


@dataclass
class _Grant:
    challenge: str
    redirect_uri: str
    client_id: str
    nonce: str
    used: bool = False


@dataclass
class Provider:
    """A minimal OIDC provider: one logged-in user, codes valid once."""

    base: str
    redirect_uri: str
    subject: str = "dr.oidc"
    roles: list[str] = field(default_factory=lambda: ["reviewer"])
    #: "" (honest); "<token>:<fault>", token "access" or "id", fault "foreign_issuer" (iss is another
    #: provider), "foreign_key" (signed by a key it does not publish) or "nonce" (another nonce)
    mode: str = ""
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    other_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    grants: dict[str, _Grant] = field(default_factory=dict)
    token_errors: list[str] = field(default_factory=list)

    def _sign(self, which: str, claims: dict[str, object]) -> str:
        fault = self.mode.removeprefix(f"{which}:") if self.mode.startswith(f"{which}:") else ""
        if fault == "foreign_issuer":
            claims = {**claims, "iss": "https://other-idp.example"}
        if fault == "nonce":
            claims = {**claims, "nonce": "another-login"}
        key = self.other_key if fault == "foreign_key" else self.key
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})

    async def discovery(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.base,
                "authorization_endpoint": f"{self.base}/authorize",
                "token_endpoint": f"{self.base}/token",
                "jwks_uri": f"{self.base}/jwks",
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "id_token_signing_alg_values_supported": ["ES256"],
            }
        )

    async def jwks(self, request: Request) -> Response:
        public = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return JSONResponse({"keys": [{**public, "kid": "k1", "alg": "ES256", "use": "sig"}]})

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        if (
            q.get("response_type") != "code"
            or q.get("client_id") != CLIENT_ID
            or q.get("redirect_uri") != self.redirect_uri
            or q.get("code_challenge_method") != "S256"
            or len(q.get("code_challenge", "")) != 43  # base64url of 32 bytes, no padding
            or "openid" not in q.get("scope", "").split()
            or not q.get("state")
        ):
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        code = secrets.token_urlsafe(16)
        self.grants[code] = _Grant(q["code_challenge"], q["redirect_uri"], q["client_id"], q.get("nonce", ""))
        query = urllib.parse.urlencode({"code": code, "state": q["state"]})
        return RedirectResponse(f"{q['redirect_uri']}?{query}", status_code=302)

    async def token(self, request: Request) -> Response:
        form = await request.form()

        def refuse(error: str) -> Response:
            self.token_errors.append(error)
            return JSONResponse({"error": error}, status_code=400 if error != "invalid_client" else 401)

        if form.get("grant_type") != "authorization_code":
            return refuse("unsupported_grant_type")
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return refuse("invalid_client")
        grant = self.grants.get(str(form.get("code", "")))
        if grant is None or grant.used:
            return refuse("invalid_grant")
        grant.used = True  # a code is good once, whatever happens next
        if form.get("redirect_uri") != grant.redirect_uri or form.get("client_id") != grant.client_id:
            return refuse("invalid_grant")
        if _b64url_sha256(str(form.get("code_verifier", ""))) != grant.challenge:
            return refuse("invalid_grant")
        now = int(time.time())
        common = {"iss": self.base, "sub": self.subject, "iat": now, "exp": now + 600}
        access = self._sign("access", {**common, "aud": AUDIENCE, "roles": self.roles, "azp": CLIENT_ID})
        id_token = self._sign("id", {**common, "aud": CLIENT_ID, "nonce": grant.nonce})
        return JSONResponse(
            {"access_token": access, "id_token": id_token, "token_type": "Bearer", "expires_in": 600},
            headers={"Cache-Control": "no-store"},
        )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
            ]
        )


class _Served:
    """An ASGI app on a real port (uvicorn in a thread)."""

    def __init__(self, app: Starlette, port: int) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class Setup:
    provider: Provider
    gateway: str


@pytest.fixture(scope="module")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp: Path = tmp_path_factory.mktemp("oidc")
    idp_base = f"http://127.0.0.1:{_free_port()}"
    gw_port = _free_port()
    gateway = f"http://127.0.0.1:{gw_port}"
    provider = Provider(idp_base, f"{gateway}/login/oidc/callback")
    secret_file = tmp / "client-secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    secret_file.chmod(0o600)
    settings = GatewaySettings(
        http_port=gw_port,
        blob_dir=str(tmp / "blobs"),
        data_dir=str(tmp / "data"),
        auth_jwks=f"{idp_base}/jwks",
        auth_issuer=idp_base,
        auth_audience=AUDIENCE,
        oidc_issuer=idp_base,
        oidc_client_id=CLIENT_ID,
        oidc_redirect_uri=provider.redirect_uri,
        oidc_client_secret_file=str(secret_file),
    )
    idp = _Served(provider.app(), int(idp_base.rsplit(":", 1)[1]))
    gw = _Served(build_app(settings), gw_port)
    try:
        yield Setup(provider, gateway)
    finally:
        gw.stop()
        idp.stop()


@pytest.fixture()
def provider(oidc: Setup) -> Iterator[Provider]:
    oidc.provider.mode = ""
    oidc.provider.token_errors.clear()
    yield oidc.provider
    oidc.provider.mode = ""


def _browser() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s


def _to_provider(browser: requests.Session, oidc: Setup) -> requests.Response:
    """The gateway's redirect to the provider, checked; returns the provider's answer (302 back)."""
    start = browser.get(f"{oidc.gateway}/login/oidc", allow_redirects=False, timeout=30)
    assert start.status_code == 302, start.text
    target = urllib.parse.urlsplit(start.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == f"{oidc.provider.base}/authorize"
    q = dict(urllib.parse.parse_qsl(target.query))
    assert q["code_challenge_method"] == "S256" and q["client_id"] == CLIENT_ID
    assert q["redirect_uri"] == oidc.provider.redirect_uri
    cookie = next(c for c in browser.cookies if c.name == OIDC_COOKIE)
    assert cookie.path == "/login/oidc" and cookie.has_nonstandard_attr("HttpOnly")
    back = browser.get(start.headers["location"], allow_redirects=False, timeout=30)
    assert back.status_code == 302, back.text
    assert back.headers["location"].startswith(oidc.provider.redirect_uri + "?")
    return back


def test_code_flow_with_pkce_logs_in_with_the_providers_subject_and_roles(oidc: Setup, provider: Provider) -> None:
    browser = _browser()
    back = _to_provider(browser, oidc)
    done = browser.get(back.headers["location"], allow_redirects=False, timeout=30)
    assert done.status_code == 200, done.text
    assert browser.cookies.get(COOKIE)
    assert OIDC_COOKIE not in {c.name for c in browser.cookies}  # the one-time state is gone
    me = browser.get(f"{oidc.gateway}/api/v1/me", timeout=30)
    assert me.status_code == 200, me.text
    assert me.json()["subject"] == "dr.oidc"
    assert me.json()["roles"] == ["reviewer"]
    assert provider.token_errors == []
    # without the cookie: refused
    assert _browser().get(f"{oidc.gateway}/api/v1/me", timeout=30).status_code == 401


def _reason(resp: requests.Response) -> str:
    return str(resp.json()["error"]["reason"])


def test_a_callback_with_another_state_is_refused(oidc: Setup, provider: Provider) -> None:
    browser = _browser()
    back = _to_provider(browser, oidc)
    url = urllib.parse.urlsplit(back.headers["location"])
    q = dict(urllib.parse.parse_qsl(url.query))
    for wrong in ("x" + q["state"][1:], "", "é" * 8):
        forged = urllib.parse.urlencode({"code": q["code"], "state": wrong})
        resp = browser.get(f"{oidc.provider.redirect_uri}?{forged}", allow_redirects=False, timeout=30)
        assert resp.status_code == 401, resp.text
        assert _reason(resp) == "OIDC_STATE_MISMATCH"
        assert not browser.cookies.get(COOKIE)
    # the code was never sent to the provider
    assert provider.token_errors == []
    assert not provider.grants[q["code"]].used


def test_a_replayed_code_is_refused(oidc: Setup, provider: Provider) -> None:
    browser = _browser()
    back = _to_provider(browser, oidc)
    oidc_cookie = browser.cookies.get(OIDC_COOKIE)
    assert browser.get(back.headers["location"], allow_redirects=False, timeout=30).status_code == 200
    # the same callback again, as an attacker who saw the URL and the state cookie would send it
    attacker = _browser()
    attacker.cookies.set(OIDC_COOKIE, oidc_cookie, path="/login/oidc")
    again = attacker.get(back.headers["location"], allow_redirects=False, timeout=30)
    assert again.status_code == 401, again.text
    assert _reason(again) == "OIDC_CODE_REJECTED"
    assert provider.token_errors == ["invalid_grant"]
    assert not attacker.cookies.get(COOKIE)


def test_a_wrong_code_verifier_is_refused(oidc: Setup, provider: Provider) -> None:
    """A code taken to another browser (its own state cookie, so its own verifier) is useless:
    the provider checks the verifier against the challenge the code was issued for."""
    victim, attacker = _browser(), _browser()
    back = _to_provider(victim, oidc)
    _to_provider(attacker, oidc)  # the attacker's own login: its own state and verifier
    mine = urllib.parse.parse_qs(urllib.parse.urlsplit(back.headers["location"]).query)
    attacker_state = attacker.cookies.get(OIDC_COOKIE).strip('"').split(".", 1)[0]
    stolen = urllib.parse.urlencode({"code": mine["code"][0], "state": attacker_state})
    resp = attacker.get(f"{oidc.provider.redirect_uri}?{stolen}", allow_redirects=False, timeout=30)
    assert resp.status_code == 401, resp.text
    assert _reason(resp) == "OIDC_CODE_REJECTED"
    assert provider.token_errors == ["invalid_grant"]
    assert not attacker.cookies.get(COOKIE)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("access:foreign_issuer", "INVALID_TOKEN"),
        ("access:foreign_key", "INVALID_TOKEN"),
        ("id:foreign_issuer", "OIDC_ID_TOKEN_INVALID"),
        ("id:foreign_key", "OIDC_ID_TOKEN_INVALID"),
        ("id:nonce", "OIDC_ID_TOKEN_INVALID"),
    ],
)
def test_a_token_from_another_issuer_or_key_is_refused(oidc: Setup, provider: Provider, mode: str, reason: str) -> None:
    provider.mode = mode
    browser = _browser()
    back = _to_provider(browser, oidc)
    resp = browser.get(back.headers["location"], allow_redirects=False, timeout=30)
    assert resp.status_code == 401, resp.text
    assert _reason(resp) == reason
    assert not browser.cookies.get(COOKIE)
    assert provider.token_errors == []  # the provider exchanged the code; the gateway refused its token


def test_the_provider_refusing_the_login_is_a_clear_401(oidc: Setup, provider: Provider) -> None:
    browser = _browser()
    _to_provider(browser, oidc)
    resp = browser.get(
        f"{oidc.provider.redirect_uri}?error=access_denied&state=whatever", allow_redirects=False, timeout=30
    )
    assert resp.status_code == 401 and _reason(resp) == "OIDC_DENIED"
