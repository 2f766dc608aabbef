"""Who is calling: bearer JWTs checked against the issuer's JWKS, roles from a claim.

Every atlasflow RPC except health and reflection carries ``authorization: Bearer <JWT>``. The
token is checked with PyJWT against the issuer's published keys (JWKS): signature, the allowed
algorithms only (never ``none``, never a symmetric algorithm with a public key), issuer,
audience, expiry and not-before, with a small clock leeway. The caller's identity is the token's
subject (``sub``); its roles come from a configurable claim (``roles`` for Entra ID app roles,
``realm_access.roles`` for Keycloak realm roles, …) and are kept only if they are atlasflow
roles (`ROLES`). Each service has its own identity, ``svc:<name>`` (`service_subject`): the
subject of its token, or a configurable claim (`AuthConfig.service_claim`); which service may
call which internal hand-off is `atlasflow.common.policy.HANDOFF_CALLERS`.

In a cluster the issuer is the hospital's OIDC provider (`AuthConfig`: issuer, JWKS URL,
audience, role claim). The embedded default (``atlasflow up``) runs its own `LocalIssuer`: an
ES256 key in the state directory (mode 0600), its JWKS beside it, and ``atlasflow token`` to
mint tokens that stack accepts.

Outbound calls (service to service, CLI to service) take their token from a `TokenSource`: a
file re-read when it changes (a rotated Kubernetes projected token, a token written by
``atlasflow up``), never a command-line argument.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from atlasflow.common.errors import InvalidArgument, Unauthenticated

DOMAIN = "atlasflow.auth"

#: The atlasflow roles (docs/security.md): who may call which RPC is `atlasflow.common.policy`.
ROLES = ("connector", "annotator", "reviewer", "admin", "service")

#: The services that call each other, each with its own identity (`service_subject`).
SERVICE_NAMES = ("ingest", "segmentation", "labels", "ranking", "training")

#: A service identity is ``svc:<name>`` (``name`` one of `SERVICE_NAMES`): the subject of the
#: service's token (``atlasflow up`` mints one per service), or the claim named by
#: `AuthConfig.service_claim` (an OIDC provider whose service-account subjects are opaque ids).
#: The prefix is reserved: a token whose subject starts with it must be a valid service
#: identity holding the ``service`` role, so no person can pose as a service.
SERVICE_PREFIX = "svc:"


def service_subject(name: str) -> str:
    """The identity of service ``name`` (``svc:ingest``, …); `InvalidArgument` for another name."""
    if name not in SERVICE_NAMES:
        raise InvalidArgument(
            "INVALID_SERVICE_NAME",
            f"a service identity names one of {SERVICE_NAMES}",
            domain=DOMAIN,
            metadata={"service": name[:64]},
        )
    return SERVICE_PREFIX + name


def _service_identity(value: object) -> str:
    """``value`` if it is a service identity (``svc:<name>``, a known name), else ''."""
    if isinstance(value, str) and value.startswith(SERVICE_PREFIX) and value[len(SERVICE_PREFIX) :] in SERVICE_NAMES:
        return value
    return ""


#: Asymmetric algorithms only: a JWKS publishes public keys.
ALLOWED_ALGORITHMS = ("ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA")


@dataclass(frozen=True)
class Identity:
    """A verified caller: the token's subject, its atlasflow roles and, for a token holding the
    ``service`` role, the service identity (``svc:<name>``; '' when the token names none, which
    admits it to no hand-off: `atlasflow.common.policy.HANDOFF_CALLERS`)."""

    subject: str
    roles: frozenset[str]
    service: str = ""


@dataclass(frozen=True)
class AuthConfig:
    """How tokens are checked.

    ``jwks``: the issuer's JWKS, an ``https://`` URL (cached, refreshed for unknown key ids) or a
    file path (re-read when it changes). ``issuer`` and ``audience``: the required ``iss`` and
    ``aud``. ``role_claim``: dotted path of the roles claim. ``algorithms``: accepted ``alg``
    values (a subset of `ALLOWED_ALGORITHMS`). ``leeway_s``: clock skew tolerated on exp/nbf/iat.
    ``service_claim``: dotted path of the claim holding a service token's identity
    (``svc:<name>``; default the subject).
    """

    jwks: str
    issuer: str
    audience: str = "atlasflow"
    role_claim: str = "roles"
    algorithms: tuple[str, ...] = ("ES256", "RS256")
    leeway_s: float = 30.0
    service_claim: str = "sub"

    def __post_init__(self) -> None:
        bad = [a for a in self.algorithms if a not in ALLOWED_ALGORITHMS]
        if bad or not self.algorithms:
            raise InvalidArgument(
                "INVALID_AUTH_CONFIG",
                f"auth algorithms must be among {ALLOWED_ALGORITHMS}",
                domain=DOMAIN,
                metadata={"algorithms": ",".join(self.algorithms)},
            )
        if not self.jwks or not self.issuer:
            raise InvalidArgument(
                "INVALID_AUTH_CONFIG", "auth needs a JWKS location and an issuer", domain=DOMAIN, metadata={}
            )


def _invalid(cause: str) -> Unauthenticated:
    # One message for every cause: the client learns that the token was refused, the
    # metadata says which check (no key material, no claims).
    return Unauthenticated(
        "INVALID_TOKEN", "the bearer token was not accepted", domain=DOMAIN, metadata={"cause": cause}
    )


class _FileKeys:
    """A JWKS file, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, jwt.PyJWK] = {}

    def key(self, kid: str | None) -> jwt.PyJWK:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                keys = jwt.PyJWKSet.from_dict(json.loads(self.path.read_text())).keys
                self._keys = {str(k.key_id): k for k in keys}
                self._stamp = stamp
            if kid is None and len(self._keys) == 1:
                return next(iter(self._keys.values()))
            found = self._keys.get(str(kid))
        if found is None:
            raise _invalid("unknown_key")
        return found


class _UrlKeys:
    """A JWKS URL (the OIDC provider's ``jwks_uri``), through PyJWT's caching client."""

    def __init__(self, url: str) -> None:
        self.client = jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=10)

    def key(self, kid: str | None) -> jwt.PyJWK:
        if kid is None:
            raise _invalid("no_key_id")
        try:
            return self.client.get_signing_key(kid)
        except jwt.PyJWKClientError as exc:
            raise _invalid("unknown_key") from exc


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def roles_of(claims: Mapping[str, Any], role_claim: str) -> frozenset[str]:
    """The atlasflow roles in ``claims`` at ``role_claim`` (a list, or a space-separated string)."""
    raw = _claim(claims, role_claim)
    names: Iterable[Any] = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else ()
    return frozenset(str(r) for r in names if str(r) in ROLES)


class TokenVerifier:
    """Checks bearer tokens against `AuthConfig`; thread-safe."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        src = config.jwks
        self._keys: _FileKeys | _UrlKeys = (
            _UrlKeys(src) if src.startswith(("https://", "http://")) else _FileKeys(Path(src.removeprefix("file://")))
        )

    def verify(self, token: str) -> Identity:
        """The `Identity` of a valid token; `Unauthenticated` (INVALID_TOKEN) otherwise."""
        cfg = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _invalid("malformed") from exc
        if header.get("alg") not in cfg.algorithms:
            raise _invalid("algorithm")
        key = self._keys.key(header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(cfg.algorithms),
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _invalid("expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise _invalid("audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise _invalid("issuer") from exc
        except jwt.PyJWTError as exc:
            raise _invalid("signature_or_claims") from exc
        subject = claims["sub"]
        # the subject names the caller in leases, revisions and the audit: printable, no
        # surrounding blanks, at most 256 characters
        if not isinstance(subject, str) or not subject or subject != subject.strip():
            raise _invalid("no_subject")
        if len(subject) > 256 or not subject.isprintable():
            raise _invalid("bad_subject")
        roles = roles_of(claims, cfg.role_claim)
        check_service_subject(subject, roles)
        service = _service_identity(_claim(claims, cfg.service_claim)) if "service" in roles else ""
        return Identity(subject, roles, service)


def check_service_subject(subject: str, roles: Iterable[str]) -> None:
    """The reserved ``svc:`` prefix: a subject that starts with it must be a known service's
    identity (`SERVICE_NAMES`) and hold the ``service`` role; `Unauthenticated` (INVALID_TOKEN,
    cause ``bad_service_subject``) otherwise."""
    if subject.startswith(SERVICE_PREFIX) and (not _service_identity(subject) or "service" not in set(roles)):
        raise _invalid("bad_service_subject")


class LocalIssuer:
    """The embedded stack's own token issuer: an ES256 key in ``<dir>/signing-key.pem`` (0600)
    and its public JWKS in ``<dir>/jwks.json``. Nothing here leaves the machine."""

    KEY_FILE = "signing-key.pem"
    JWKS_FILE = "jwks.json"

    def __init__(self, directory: Path, issuer: str, key: ec.EllipticCurvePrivateKey, kid: str) -> None:
        self.directory = directory
        self.issuer = issuer
        self._key = key
        self.kid = kid

    @property
    def jwks_path(self) -> Path:
        return self.directory / self.JWKS_FILE

    @classmethod
    def create_or_load(cls, directory: Path, issuer: str = "atlasflow-local") -> LocalIssuer:
        """Load the issuer in ``directory``, creating its key and JWKS on first use."""
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key_path = directory / cls.KEY_FILE
        if key_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise InvalidArgument("INVALID_AUTH_CONFIG", "the local signing key is not an EC key", domain=DOMAIN)
            key = loaded
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        # RFC 7638-style stable key id: a hash of the public key's JWK
        kid = jwt.utils.base64url_encode(
            hashlib.sha256(json.dumps(public, sort_keys=True).encode()).digest()[:12]
        ).decode()
        jwks = json.dumps({"keys": [{**public, "kid": kid, "alg": "ES256", "use": "sig"}]}, indent=2)
        target = directory / cls.JWKS_FILE
        if not target.exists() or target.read_text() != jwks:
            # a unique temporary name, then an atomic rename: concurrent loaders never collide
            tmp = directory / f"{cls.JWKS_FILE}.{uuid.uuid4().hex}.tmp"
            tmp.write_text(jwks)
            tmp.replace(target)
        return cls(directory, issuer, key, kid)

    def config(self, audience: str = "atlasflow") -> AuthConfig:
        """The `AuthConfig` that accepts this issuer's tokens."""
        return AuthConfig(jwks=str(self.jwks_path), issuer=self.issuer, audience=audience, algorithms=("ES256",))

    def mint(self, subject: str, roles: Iterable[str], *, ttl_s: float = 3600.0, audience: str = "atlasflow") -> str:
        """A signed token for ``subject`` with ``roles`` (each one of `ROLES`), valid ``ttl_s``."""
        roles = sorted(set(roles))
        unknown = [r for r in roles if r not in ROLES]
        if unknown or not subject:
            raise InvalidArgument(
                "INVALID_TOKEN_REQUEST",
                f"a token needs a subject and roles among {ROLES}",
                domain=DOMAIN,
                metadata={"roles": ",".join(unknown)},
            )
        if subject.startswith(SERVICE_PREFIX) and (not _service_identity(subject) or "service" not in roles):
            raise InvalidArgument(
                "INVALID_TOKEN_REQUEST",
                f"a subject {SERVICE_PREFIX}<name> is a service identity: one of {SERVICE_NAMES}, role service",
                domain=DOMAIN,
                metadata={"subject": subject[:64]},
            )
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "sub": subject,
            "roles": roles,
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl_s),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})


#: Environment variable naming the token file of a command-line client (`default_token_source`).
TOKEN_FILE_ENV = "ATLASFLOW_TOKEN_FILE"


def default_token_source() -> TokenSource:
    """A client's token when none is given: the file named by ``ATLASFLOW_TOKEN_FILE`` (none if unset)."""
    return TokenSource(path=os.environ.get(TOKEN_FILE_ENV, ""))


class TokenSource:
    """The bearer token of outbound calls: a fixed token, or a file re-read when it changes."""

    def __init__(self, token: str = "", path: str | Path = "") -> None:
        self._token = token
        self._path = Path(path) if path else None
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._token or self._path)

    def token(self) -> str:
        if self._path is None:
            return self._token
        st = self._path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._token = self._path.read_text().strip()
                self._stamp = stamp
            return self._token

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """``(("authorization", "Bearer …"),)``, or nothing without a token."""
        tok = self.token() if self else ""
        return (("authorization", f"Bearer {tok}"),) if tok else ()
