"""The review API and login on a stack as `atlasflow up` starts it: demo-user login (cookie),
a wrong password refused, missing/wrong tokens 401, roles decided by the services' policy (403)."""

from __future__ import annotations

import pytest
from tests.gateway.conftest import http

from atlasflow.cli.local import LocalDeployment
from atlasflow.common.users import PASSWORDS_FILE


def _passwords(stack: LocalDeployment) -> dict[str, str]:
    lines = (stack.auth_dir / PASSWORDS_FILE).read_text().splitlines()
    return {u: p for u, p, _roles in (line.split("\t") for line in lines if not line.startswith("#"))}


def test_demo_files_are_private(stack: LocalDeployment) -> None:
    for name in ("users.json", PASSWORDS_FILE):
        assert (stack.auth_dir / name).stat().st_mode & 0o777 == 0o600


def test_login_sets_a_session_cookie_and_a_wrong_password_is_refused(stack: LocalDeployment) -> None:
    url = stack.gateway_url()
    s = http(stack)
    bad = s.post(f"{url}/login", json={"username": "dr.demo", "password": "wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["reason"] == "LOGIN_FAILED"
    assert s.post(f"{url}/login", json={"username": "nobody", "password": "x"}).status_code == 401
    ok = s.post(f"{url}/login", json={"username": "dr.demo", "password": _passwords(stack)["dr.demo"]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["roles"] == ["reviewer"]
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" in cookie
    me = s.get(f"{url}/api/v1/me").json()
    assert me == {"subject": "dr.demo", "roles": ["reviewer"], "via": "cookie"}
    assert s.get(f"{url}/api/v1/worklist").status_code == 200
    # a cookie-authenticated change needs the CSRF header
    refused = s.post(f"{url}/api/v1/lease-next", json={})
    assert refused.status_code == 403 and refused.json()["error"]["reason"] == "CSRF_HEADER_REQUIRED"
    s.post(f"{url}/logout")
    assert s.get(f"{url}/api/v1/me").status_code == 401


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/me"),
        ("GET", "/api/v1/worklist"),
        ("GET", "/api/v1/rounds"),
        ("GET", "/api/v1/cases/case-x"),
        ("POST", "/api/v1/cases/case-x/lease"),
        ("DELETE", "/api/v1/cases/case-x/lease"),
        ("GET", "/api/v1/cases/case-x/ct.nii.gz"),
        ("POST", "/api/v1/cases/case-x/revisions"),
    ],
)
def test_missing_or_wrong_token_is_401(stack: LocalDeployment, method: str, path: str) -> None:
    url = stack.gateway_url() + path
    assert http(stack).request(method, url).status_code == 401
    r = http(stack, "e30.e30.e30").request(method, url)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("role", "method", "path", "status"),
    [
        ("connector", "GET", "/api/v1/worklist", 403),
        ("reviewer", "GET", "/api/v1/worklist", 200),
        ("admin", "GET", "/api/v1/worklist", 200),
        ("admin", "POST", "/api/v1/cases/case-x/lease", 403),  # admins run rounds, they do not review
        ("reviewer", "POST", "/api/v1/cases/case-x/lease", 404),  # allowed; no such case
        ("connector", "GET", "/api/v1/cases/case-x", 403),
        ("annotator", "GET", "/api/v1/rounds", 200),
        ("reviewer", "GET", "/api/v1/cases/a..b", 400),
        ("reviewer", "GET", "/api/v1/cases/..%2Fx", 404),  # no route
    ],
)
def test_roles_are_the_services_policy(stack: LocalDeployment, role: str, method: str, path: str, status: int) -> None:
    r = http(stack, stack.mint(role, f"user-{role}")).request(method, stack.gateway_url() + path, json={})
    assert r.status_code == status, r.text
