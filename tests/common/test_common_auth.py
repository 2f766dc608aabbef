"""Bearer-token checks (atlasflow.common.auth): what is accepted and every way a token is refused."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from atlasflow.common.auth import AuthConfig, LocalIssuer, TokenSource, TokenVerifier, roles_of
from atlasflow.common.errors import InvalidArgument, Unauthenticated


@pytest.fixture
def issuer(tmp_path: Path) -> LocalIssuer:
    return LocalIssuer.create_or_load(tmp_path / "auth")


def _cause(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as err:
        verifier.verify(token)
    assert err.value.reason == "INVALID_TOKEN"
    return err.value.metadata["cause"]


def test_a_minted_token_is_accepted_with_its_subject_and_roles(issuer: LocalIssuer) -> None:
    verifier = TokenVerifier(issuer.config())
    who = verifier.verify(issuer.mint("dr.house", ["reviewer", "annotator"]))
    assert who.subject == "dr.house" and who.roles == {"reviewer", "annotator"}


def test_the_key_is_private_and_reloaded_not_regenerated(issuer: LocalIssuer, tmp_path: Path) -> None:
    key = tmp_path / "auth" / LocalIssuer.KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600
    again = LocalIssuer.create_or_load(tmp_path / "auth")
    assert again.kid == issuer.kid
    assert TokenVerifier(again.config()).verify(issuer.mint("a", ["admin"])).subject == "a"


def test_refusals(issuer: LocalIssuer, tmp_path: Path) -> None:
    cfg = issuer.config()
    verifier = TokenVerifier(cfg)
    now = int(time.time())
    good = {"iss": cfg.issuer, "aud": "atlasflow", "sub": "x", "roles": ["admin"], "iat": now, "exp": now + 60}
    key = issuer._key  # the issuer's own key: only the claims differ below
    sign = lambda claims, **kw: jwt.encode(claims, key, algorithm="ES256", headers={"kid": issuer.kid}, **kw)
    assert verifier.verify(sign(good)).subject == "x"
    assert _cause(verifier, sign({**good, "exp": now - 3600})) == "expired"
    assert _cause(verifier, sign({**good, "aud": "someone-else"})) == "audience"
    assert _cause(verifier, sign({**good, "iss": "https://evil.example"})) == "issuer"
    assert _cause(verifier, sign({k: v for k, v in good.items() if k != "sub"})) == "signature_or_claims"
    assert _cause(verifier, "not-a-jwt") == "malformed"
    # another key with the same kid: the signature fails
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(good, other, algorithm="ES256", headers={"kid": issuer.kid})
    assert _cause(verifier, forged) == "signature_or_claims"
    # alg "none" and a symmetric algorithm keyed with the public JWK (algorithm confusion)
    unsigned = jwt.encode(good, None, algorithm="none", headers={"kid": issuer.kid})
    assert _cause(verifier, unsigned) == "algorithm"
    # (signed by hand: PyJWT itself refuses to HMAC with a JWK)
    public = issuer.jwks_path.read_bytes()
    head = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "kid": issuer.kid}).encode())
    body = jwt.utils.base64url_encode(json.dumps(good).encode())
    mac = jwt.utils.base64url_encode(hmac.new(public, head + b"." + body, hashlib.sha256).digest())
    assert _cause(verifier, (head + b"." + body + b"." + mac).decode()) == "algorithm"
    # an unknown key id
    assert _cause(verifier, jwt.encode(good, key, algorithm="ES256", headers={"kid": "nope"})) == "unknown_key"


def test_rotated_jwks_file_is_picked_up(tmp_path: Path) -> None:
    a = LocalIssuer.create_or_load(tmp_path / "a")
    b = LocalIssuer.create_or_load(tmp_path / "b")
    shared = tmp_path / "jwks.json"
    shared.write_text(a.jwks_path.read_text())
    verifier = TokenVerifier(AuthConfig(jwks=str(shared), issuer="atlasflow-local", algorithms=("ES256",)))
    assert verifier.verify(a.mint("x", ["admin"])).subject == "x"
    with pytest.raises(Unauthenticated):
        verifier.verify(b.mint("x", ["admin"]))
    both = {"keys": json.loads(a.jwks_path.read_text())["keys"] + json.loads(b.jwks_path.read_text())["keys"]}
    shared.write_text(json.dumps(both) + "\n")
    assert verifier.verify(b.mint("y", ["admin"])).subject == "y"


def test_rs256_issuer_and_keycloak_role_claim(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}))
    cfg = AuthConfig(
        jwks=str(tmp_path / "jwks.json"),
        issuer="https://kc.hospital/realms/radiology",
        role_claim="realm_access.roles",
        algorithms=("RS256",),
    )
    now = int(time.time())
    claims = {
        "iss": cfg.issuer,
        "aud": "atlasflow",
        "sub": "f:1234:jdoe",
        "iat": now,
        "exp": now + 60,
        "realm_access": {"roles": ["offline_access", "reviewer"]},
    }
    who = TokenVerifier(cfg).verify(jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"}))
    assert who.subject == "f:1234:jdoe" and who.roles == {"reviewer"}


def test_roles_claim_forms() -> None:
    assert roles_of({"roles": "admin reviewer bogus"}, "roles") == {"admin", "reviewer"}
    assert roles_of({"roles": ["service", 3]}, "roles") == {"service"}
    assert roles_of({}, "roles") == frozenset()
    assert roles_of({"a": {"b": ["annotator"]}}, "a.b") == {"annotator"}


def test_config_and_mint_refuse_bad_input(issuer: LocalIssuer) -> None:
    with pytest.raises(InvalidArgument):
        AuthConfig(jwks="x", issuer="y", algorithms=("HS256",))
    with pytest.raises(InvalidArgument):
        issuer.mint("x", ["superuser"])


def test_token_source_rereads_its_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    source = TokenSource(path=path)
    assert source.metadata() == (("authorization", "Bearer one"),)
    path.write_text("second\n")
    assert source.token() == "second"
    assert TokenSource().metadata() == ()


@pytest.mark.parametrize("subject", [" dr.house", "dr.house ", "x" * 257, "dr\u0007house", 42])
def test_subjects_that_cannot_name_a_person_are_refused(issuer: LocalIssuer, subject: object) -> None:
    now = int(time.time())
    claims = {"iss": issuer.issuer, "aud": "atlasflow", "sub": subject, "roles": ["admin"], "iat": now, "exp": now + 60}
    token = jwt.encode(claims, issuer._key, algorithm="ES256", headers={"kid": issuer.kid})
    with pytest.raises(Unauthenticated):
        TokenVerifier(issuer.config()).verify(token)
