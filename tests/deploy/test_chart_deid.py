"""The labels service's de-identification pseudonym key in the chart (docs/security.md
"De-identification"): a Secret named by labels.deid.existingSecret is mounted read-only and
named by DEID_KEY_FILE; without one the key lives in the data volume, so rendering fails when
that volume does not outlive the pod (persistence off), and NOTES warns otherwise."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "helm"
CHART = ROOT / "charts" / "atlasflow"
AUTH = [
    "--set",
    "auth.issuer=https://issuer.example",
    "--set",
    "auth.jwksUrl=https://issuer.example/jwks",
    "--set",
    "auth.serviceToken.existingSecret=service-token",
]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.is_file():
        pytest.fail(f"helm not found at {HELM}: run scripts/bootstrap.sh --test")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, check=False)


def labels_pod(*sets: str) -> dict[str, Any]:
    args = ["template", "t", str(CHART), *AUTH]
    for s in sets:
        args += ["--set", s]
    proc = helm(*args)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (dep,) = [
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "labels"
    ]
    return dep["spec"]["template"]["spec"]


def test_the_key_secret_is_mounted_read_only_and_named_by_deid_key_file() -> None:
    pod = labels_pod("labels.deid.existingSecret=atlasflow-deid")
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ATLASFLOW_LABELS_DEID_KEY_FILE"] == "/var/run/secrets/atlasflow/deid/deid.key"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "deid-key"]
    assert mount == {"name": "deid-key", "mountPath": "/var/run/secrets/atlasflow/deid", "readOnly": True}
    (vol,) = [v for v in pod["volumes"] if v["name"] == "deid-key"]
    assert vol["secret"]["secretName"] == "atlasflow-deid"
    assert vol["secret"]["items"] == [{"key": "deid.key", "path": "deid.key"}]
    assert vol["secret"]["defaultMode"] == 0o440
    # another key name in the Secret
    pod = labels_pod("labels.deid.existingSecret=atlasflow-deid", "labels.deid.secretKey=pseudonym-key")
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["ATLASFLOW_LABELS_DEID_KEY_FILE"] == "/var/run/secrets/atlasflow/deid/pseudonym-key"


def test_without_a_secret_the_key_stays_in_the_persistent_data_volume() -> None:
    pod = labels_pod()
    (c,) = pod["containers"]
    assert "ATLASFLOW_LABELS_DEID_KEY_FILE" not in {e["name"] for e in c["env"]}
    assert not [v for v in pod["volumes"] if v["name"] == "deid-key"]


def test_rendering_fails_without_a_secret_when_the_data_volume_is_not_persistent() -> None:
    proc = helm("template", "t", str(CHART), *AUTH, "--set", "labels.persistence.enabled=false")
    assert proc.returncode != 0
    assert "labels.deid.existingSecret is required" in proc.stderr, proc.stderr
    # with the Secret it renders
    labels_pod("labels.persistence.enabled=false", "labels.deid.existingSecret=atlasflow-deid")


def test_the_schema_refuses_a_bad_key_name() -> None:
    proc = helm("template", "t", str(CHART), *AUTH, "--set", "labels.deid.secretKey=../x")
    assert proc.returncode != 0 and "secretKey" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("secret", "warned"), [("", True), ("atlasflow-deid", False)])
def test_notes_warn_when_the_key_is_in_the_data_volume(secret: str, warned: bool) -> None:
    proc = helm("install", "t", str(CHART), "--dry-run=client", *AUTH, "--set", f"labels.deid.existingSecret={secret}")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert ("labels.deid.existingSecret is empty" in notes) is warned


@pytest.mark.parametrize(("database", "warned"), [("", True), ("ranking-db", False)])
def test_notes_warn_of_an_emptydir_only_for_a_service_on_sqlite(database: str, warned: bool) -> None:
    """persistence off loses a SQLite service's state with the pod; on PostgreSQL the pod keeps
    none (ranking then runs its replicas on an emptyDir on purpose), so no warning."""
    proc = helm(
        "install",
        "t",
        str(CHART),
        "--dry-run=client",
        *AUTH,
        "--set",
        "ranking.persistence.enabled=false",
        "--set",
        f"ranking.database.existingSecret={database}",
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert ("ranking.persistence.enabled=false on SQLite" in notes) is warned
