"""One identity per service in the chart: each service mounts its own token Secret
(auth.serviceToken.secrets.<service>, else the shared existingSecret) and reads its identity
from the claim auth.serviceClaim (AUTH_SERVICE_CLAIM)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "segmentation", "labels", "ranking")


def _render(*sets: str) -> list[dict]:
    args = [str(ROOT / ".tools" / "helm"), "template", "t", str(ROOT / "charts" / "atlasflow")]
    args += ["--set", "auth.issuer=https://issuer.example", "--set", "auth.jwksUrl=https://issuer.example/jwks"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _deployment(docs: list[dict], component: str) -> dict:
    return next(
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    )


def _token_secret(dep: dict) -> str:
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "service-token"]
    return str(vol["secret"]["secretName"])


def test_each_service_mounts_its_own_token_secret() -> None:
    sets = [f"auth.serviceToken.secrets.{s}={s}-token" for s in SERVICES] + ["auth.serviceClaim=atlasflow_service"]
    docs = _render(*sets)
    for s in SERVICES:
        dep = _deployment(docs, s)
        assert _token_secret(dep) == f"{s}-token"
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env[f"ATLASFLOW_{s.upper()}_AUTH_SERVICE_CLAIM"] == "atlasflow_service"


def test_a_service_without_its_own_secret_mounts_the_shared_one() -> None:
    docs = _render("auth.serviceToken.secrets.ingest=ingest-token", "auth.serviceToken.existingSecret=shared")
    assert _token_secret(_deployment(docs, "ingest")) == "ingest-token"
    assert _token_secret(_deployment(docs, "labels")) == "shared"


@pytest.mark.parametrize("missing", ["labels"])
def test_a_service_with_no_token_secret_fails_the_render(missing: str) -> None:
    sets = [f"auth.serviceToken.secrets.{s}={s}-token" for s in SERVICES if s != missing]
    args = [str(ROOT / ".tools" / "helm"), "template", "t", str(ROOT / "charts" / "atlasflow")]
    args += ["--set", "auth.issuer=https://issuer.example", "--set", "auth.jwksUrl=https://issuer.example/jwks"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode != 0 and f"auth.serviceToken.secrets.{missing}" in out.stderr
