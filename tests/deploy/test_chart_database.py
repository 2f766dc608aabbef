"""The labels and ranking services read their PostgreSQL URL from a Secret when one is named."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _labels_env(*sets: str, component: str = "labels") -> dict:
    args = [str(ROOT / ".tools" / "helm"), "template", "t", str(ROOT / "charts" / "atlasflow")]
    # the chart refuses to render without authentication (docs/security.md)
    args += ["--set", "auth.issuer=https://issuer.example", "--set", "auth.jwksUrl=https://issuer.example/jwks"]
    args += ["--set", "auth.serviceToken.existingSecret=service-token"]
    for s in sets:
        args += ["--set", s]
    docs = [d for d in yaml.safe_load_all(subprocess.run(args, check=True, capture_output=True, text=True).stdout) if d]
    dep = next(
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    )
    return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_sqlite_by_default_postgres_from_secret():
    assert "ATLASFLOW_LABELS_DATABASE_URL" not in _labels_env()
    env = _labels_env("labels.database.existingSecret=labels-pg")
    ref = env["ATLASFLOW_LABELS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "labels-pg", "key": "database-url"}


def test_ranking_sqlite_by_default_postgres_from_secret():
    assert "ATLASFLOW_RANKING_DATABASE_URL" not in _labels_env(component="ranking")
    env = _labels_env("ranking.database.existingSecret=ranking-pg", component="ranking")
    ref = env["ATLASFLOW_RANKING_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "ranking-pg", "key": "database-url"}


def test_segmentation_sqlite_by_default_postgres_from_secret():
    assert "ATLASFLOW_SEGMENTATION_DATABASE_URL" not in _labels_env(component="segmentation")
    env = _labels_env("segmentation.database.existingSecret=seg-pg", component="segmentation")
    ref = env["ATLASFLOW_SEGMENTATION_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "seg-pg", "key": "database-url"}


def test_ingest_sqlite_by_default_postgres_from_secret():
    assert "ATLASFLOW_INGEST_DATABASE_URL" not in _labels_env(component="ingest")
    env = _labels_env("ingest.database.existingSecret=ingest-pg", component="ingest")
    ref = env["ATLASFLOW_INGEST_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "ingest-pg", "key": "database-url"}
