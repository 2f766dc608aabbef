"""One identity per service: the hand-off callers table (`atlasflow.common.policy.HANDOFF_CALLERS`)
is what docs/security.md shows and what the services' code really calls; `authorize` admits a
service token only on the hand-offs listed for it; the ``svc:`` subjects are reserved for
service tokens. (On a real stack: tests/common/test_common_policy.py.)"""

from __future__ import annotations

import re
import time
from pathlib import Path

import jwt
import pytest

from atlasflow.common.auth import SERVICE_NAMES, Identity, LocalIssuer, TokenVerifier, service_subject
from atlasflow.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from atlasflow.common.policy import HANDOFF_CALLERS, POLICY, authorize
from atlasflow.testing.data import REPO

SERVICES_SRC = REPO / "services" / "atlasflow"
_SEG = "/atlasflow.segmentation.v1.SegmentationService"
_LABELS = "/atlasflow.labels.v1.LabelService"
_RANK = "/atlasflow.ranking.v1.RankingService"


def test_every_rpc_open_to_the_service_role_names_its_callers() -> None:
    assert set(HANDOFF_CALLERS) == {m for m, roles in POLICY.items() if "service" in roles}
    identities = {service_subject(n) for n in SERVICE_NAMES}
    assert all(callers and callers <= identities for callers in HANDOFF_CALLERS.values())


def test_security_doc_shows_the_handoff_callers() -> None:
    text = (REPO / "docs" / "security.md").read_text()
    section = text.split("### Hand-off callers", 1)[1].split("\n#", 1)[0]
    header = "| RPC | " + " | ".join(f"`svc:{n}`" for n in SERVICE_NAMES) + " |"
    assert header in section
    rows = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\| `(\w+)\.(\w+)` \|(.*)\|", line.strip())
        if m:
            cells = [c.strip() for c in m.group(3).split("|")]
            callers = {f"svc:{n}" for n, c in zip(SERVICE_NAMES, cells, strict=True) if c == "✓"}
            rows[(m.group(1), m.group(2))] = frozenset(callers)
    expected = {
        (m.strip("/").split("/")[0].split(".")[1], m.rsplit("/", 1)[1]): callers
        for m, callers in HANDOFF_CALLERS.items()
    }
    assert rows == expected


def _calls(service: str) -> set[str]:
    """The hand-off method names the code of ``service`` calls on a stub (``.<Method>(`` or a
    reference ``.<Method>,``), generated modules left out."""
    names = {m.rsplit("/", 1)[1] for m in HANDOFF_CALLERS}
    found = set()
    for path in (SERVICES_SRC / service).rglob("*.py"):
        if "v1" in path.relative_to(SERVICES_SRC / service).parts:
            continue
        text = path.read_text()
        found |= {n for n in names if re.search(rf"\.{n}\b(?!Request|Response)", text)}
    return found


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_the_table_lists_exactly_the_calls_the_code_makes(service: str) -> None:
    """Least privilege, checked against the source: a service is listed for a hand-off name
    exactly when its code calls a stub method of that name."""
    listed = {m.rsplit("/", 1)[1] for m, callers in HANDOFF_CALLERS.items() if f"svc:{service}" in callers}
    assert _calls(service) == listed


@pytest.mark.parametrize(
    ("method", "caller", "reason"),
    [
        (f"{_RANK}/RecordLabelVersion", "svc:labels", None),
        (f"{_RANK}/RecordLabelVersion", "svc:ingest", "CALLER_NOT_ALLOWED"),
        (f"{_RANK}/SubmitAttention", "svc:segmentation", None),
        (f"{_RANK}/SubmitAttention", "svc:ingest", "CALLER_NOT_ALLOWED"),
        (f"{_LABELS}/CreateLabelVersion", "svc:segmentation", None),
        (f"{_LABELS}/CreateLabelVersion", "svc:ingest", "CALLER_NOT_ALLOWED"),
        (f"{_SEG}/SegmentSeries", "svc:ingest", None),
        (f"{_SEG}/SegmentSeries", "svc:labels", "CALLER_NOT_ALLOWED"),
        # a service token that names no service (an opaque subject): no hand-off at all
        (f"{_RANK}/RecordLabelVersion", "", "CALLER_NOT_ALLOWED"),
        # not a hand-off: the service role is not allowed at all
        (f"{_LABELS}/GetLabelVersion", "svc:segmentation", "ROLE_NOT_ALLOWED"),
        (f"{_RANK}/StartRound", "svc:ranking", "ROLE_NOT_ALLOWED"),
    ],
)
def test_authorize_admits_a_service_only_on_its_handoffs(method: str, caller: str, reason: str | None) -> None:
    identity = Identity(caller or "0b6f-opaque", frozenset({"service"}), caller)
    if reason is None:
        authorize(method, identity)
        return
    with pytest.raises(PermissionDenied) as err:
        authorize(method, identity)
    assert err.value.reason == reason and err.value.metadata["method"] == method


def test_people_keep_their_roles_on_the_handoffs_open_to_them() -> None:
    authorize(f"{_LABELS}/CreateLabelVersion", Identity("dr.admin", frozenset({"admin"})))
    # an admin who also holds the service role without a service identity: admin suffices
    authorize(f"{_SEG}/SegmentSeries", Identity("ops", frozenset({"admin", "service"})))
    with pytest.raises(PermissionDenied) as err:
        authorize(f"{_RANK}/SubmitAttention", Identity("dr.admin", frozenset({"admin"})))
    assert err.value.reason == "ROLE_NOT_ALLOWED"


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> LocalIssuer:
    return LocalIssuer.create_or_load(tmp_path_factory.mktemp("issuer"), issuer="handoff-test")


def _forge(issuer: LocalIssuer, claims: dict) -> str:
    """A token of ``issuer`` with any claims (bypassing `LocalIssuer.mint`'s checks, as another
    issuer's client configuration could)."""
    now = int(time.time())
    base = {"iss": issuer.issuer, "aud": "atlasflow", "iat": now, "nbf": now, "exp": now + 60}
    return jwt.encode({**base, **claims}, issuer._key, algorithm="ES256", headers={"kid": issuer.kid})


def test_service_subjects_are_reserved(issuer: LocalIssuer) -> None:
    verifier = TokenVerifier(issuer.config())
    good = verifier.verify(issuer.mint("svc:labels", ["service"]))
    assert (good.subject, good.service) == ("svc:labels", "svc:labels")
    # an opaque subject with the service role: verified, but no service identity
    assert verifier.verify(issuer.mint("3f9c-uuid", ["service"])).service == ""
    for subject, roles in (("svc:labels", ["reviewer"]), ("svc:labels", ["admin"]), ("svc:nobody", ["service"])):
        with pytest.raises(InvalidArgument):
            issuer.mint(subject, roles)
        with pytest.raises(Unauthenticated) as err:
            verifier.verify(_forge(issuer, {"sub": subject, "roles": roles}))
        assert err.value.metadata == {"cause": "bad_service_subject"}, subject
    with pytest.raises(InvalidArgument):
        service_subject("gateway")


def test_the_service_identity_may_come_from_another_claim(issuer: LocalIssuer, tmp_path: Path) -> None:
    """An OIDC provider whose service accounts have opaque subjects: the identity is a claim
    the provider adds per client (AUTH_SERVICE_CLAIM)."""
    from dataclasses import replace

    verifier = TokenVerifier(replace(issuer.config(), service_claim="atlasflow_service"))
    token = _forge(issuer, {"sub": "7d1e-uuid", "roles": ["service"], "atlasflow_service": "svc:segmentation"})
    identity = verifier.verify(token)
    assert (identity.subject, identity.service) == ("7d1e-uuid", "svc:segmentation")
    authorize(f"{_RANK}/SubmitAttention", identity)
    # the claim is read only for a service token, and only a known service counts
    person = verifier.verify(_forge(issuer, {"sub": "dr.x", "roles": ["reviewer"], "atlasflow_service": "svc:labels"}))
    assert person.service == ""
    odd = verifier.verify(_forge(issuer, {"sub": "7d1e-uuid", "roles": ["service"], "atlasflow_service": "svc:x"}))
    assert odd.service == ""
