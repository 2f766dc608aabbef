"""Tokens for tests: one local issuer per test session, tokens per role and subject.

`install()` (called by tests/conftest.py at session start) creates the session's issuer in a
temporary directory (or the one named by ``ATLASFLOW_TEST_AUTH_DIR``, so subprocesses share it),
writes a token holding every role to ``<dir>/all-roles.token`` and points
``ATLASFLOW_TOKEN_FILE`` at it, so a test's command-line-style clients
(`atlasflow.common.clients.sync_channel`, `atlasflow.ingest.client.send_files`) authenticate
without code. Services the tests start get `auth_settings()` (in-process settings) or
`auth_env(prefix)` (subprocess environment). A test that acts as a particular person or role
passes `metadata(role, subject)` on its calls.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from atlasflow.common.auth import ROLES, SERVICE_NAMES, TOKEN_FILE_ENV, LocalIssuer, service_subject

AUTH_DIR_ENV = "ATLASFLOW_TEST_AUTH_DIR"
ISSUER = "atlasflow-test"


def _dir() -> Path:
    d = os.environ.get(AUTH_DIR_ENV)
    if not d:
        d = tempfile.mkdtemp(prefix="atlasflow-test-auth-")
        os.environ[AUTH_DIR_ENV] = d
    return Path(d)


_ISSUERS: dict[Path, LocalIssuer] = {}
_LOCK = threading.Lock()


def issuer() -> LocalIssuer:
    """The session's issuer (created on first use, then cached; thread-safe)."""
    d = _dir()
    with _LOCK:
        if d not in _ISSUERS:
            _ISSUERS[d] = LocalIssuer.create_or_load(d, issuer=ISSUER)
        return _ISSUERS[d]


def token(role: str | tuple[str, ...], subject: str = "tester", ttl_s: float = 12 * 3600) -> str:
    roles = (role,) if isinstance(role, str) else role
    return issuer().mint(subject, roles, ttl_s=ttl_s)


def metadata(role: str | tuple[str, ...], subject: str = "tester") -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a token for ``subject`` with ``role``(s)."""
    return (("authorization", f"Bearer {token(role, subject)}"),)


def token_file(role: str | tuple[str, ...], subject: str) -> Path:
    """A file holding a token for ``subject`` with ``role``(s) (for a service's token_file)."""
    roles = (role,) if isinstance(role, str) else role
    path = _dir() / f"{subject.replace(':', '_')}-{'-'.join(sorted(roles))}.token"
    path.write_text(token(roles, subject))
    path.chmod(0o600)
    return path


def install() -> Path:
    """Create the session issuer and point ATLASFLOW_TOKEN_FILE at an all-roles token."""
    path = token_file(ROLES, "test-operator")
    os.environ[TOKEN_FILE_ENV] = str(path)
    return path


def service_metadata(name: str) -> tuple[tuple[str, str], ...]:
    """Call metadata acting as service ``name`` (``svc:<name>``, role ``service``): a hand-off
    as that service makes it (`atlasflow.common.policy.HANDOFF_CALLERS`)."""
    return metadata("service", service_subject(name))


def auth_settings(service: str = "") -> dict[str, Any]:
    """Settings fields of a service the tests start in-process (accepts the session's tokens;
    calls its peers with the token of ``service``, ``svc:<service>``; without one, with a
    service token that no hand-off admits)."""
    subject = service_subject(service) if service else "atlasflow-test-service"
    return {
        "auth_jwks": str(issuer().jwks_path),
        "auth_issuer": ISSUER,
        "token_file": str(token_file("service", subject)),
    }


def auth_env(prefix: str) -> dict[str, str]:
    """The same as environment variables with ``prefix`` (e.g. ``ATLASFLOW_INGEST_``: the
    service's own identity, ``svc:ingest``, from the prefix)."""
    name = prefix.removeprefix("ATLASFLOW_").rstrip("_").lower()
    settings = auth_settings(name if name in SERVICE_NAMES else "")
    return {prefix + k.upper(): str(v) for k, v in settings.items()}
