"""Every service reads its PostgreSQL URL from a file of its mounted database Secret
(ATLASFLOW_<SERVICE>_DATABASE_URL_FILE, common/settings.py), never from an environment variable
sourced from a Secret; without a Secret it keeps the embedded SQLite."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from test_chart import (
    all_containers,
    deployment,
    literal_env,
    main_container,
    mount_path,
    render,
    volume,
)

# the components with a database and the Secret each is given below
SECRETS = {
    "ingest": "ingest-pg",
    "segmentation": "seg-pg",
    "ranking": "ranking-pg",
    "labels": "labels-pg",
    "training": "training-pg",
}
GATEWAY = (
    "gateway.enabled=true",
    "gateway.oidc.clientId=atlasflow-gateway",
    "gateway.ingress.host=atlasflow.example",
)
URL = "postgresql://atlas:pw-9f3@db.example:5432/atlasflow"


def _sets(*values: str) -> list[str]:
    return [a for v in values for a in ("--set", v)]


@pytest.fixture(scope="module")
def db_docs() -> list[dict[str, Any]]:
    """Every component on, each with its own database Secret (the gateway: labels' Secret)."""
    secrets = [f"{c}.database.existingSecret={s}" for c, s in SECRETS.items()]
    return render(*_sets("training.enabled=true", "ranking.database.secretKey=url", *GATEWAY, *secrets))


@pytest.fixture(scope="module")
def sqlite_docs() -> list[dict[str, Any]]:
    return render(*_sets("training.enabled=true", "labels.persistence.enabled=true"))


def _pod(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    if component == "ingest":  # a StatefulSet with PostgreSQL (several replicas), else a Deployment
        found = [
            d
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")
            and d["metadata"]["labels"].get("app.kubernetes.io/component") == "ingest"
        ]
        assert len(found) == 1
        return found[0]
    return deployment(docs, component)


@pytest.mark.parametrize("component", [*SECRETS, "gateway"])
def test_database_url_is_a_file_of_the_mounted_secret(db_docs, component, tmp_path):
    dep = _pod(db_docs, component)
    container = main_container(dep)
    prefix = f"ATLASFLOW_{component.upper()}_"
    env = literal_env(container)
    assert prefix + "DATABASE_URL" not in {e["name"] for e in container["env"]}
    path = env[prefix + "DATABASE_URL_FILE"]
    mount_dir = mount_path(container, "database-url")
    assert path == f"{mount_dir}/database-url"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "database-url"]
    assert mount["readOnly"] is True and "subPath" not in mount
    projected = volume(dep, "database-url")["projected"]
    assert projected["defaultMode"] == 0o400
    (source,) = projected["sources"]
    name = SECRETS["labels" if component == "gateway" else component]
    key = "url" if component == "ranking" else "database-url"
    assert source["secret"] == {"name": name, "items": [{"key": key, "path": "database-url"}]}
    # 0400 + fsGroup: the kubelet gives the read-only Secret's files to the pod's fsGroup with
    # group read; the service's user is in that group
    pod_sc = dep["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["fsGroup"] == container["securityContext"]["runAsGroup"]

    # the product's settings read the URL from that file (mount directory stood in by tmp_path)
    (tmp_path / "database-url").write_text(URL + "\n")
    settings_module = importlib.import_module(f"atlasflow.{component}.settings")
    cls = next(v for k, v in vars(settings_module).items() if k.endswith("Settings") and k != "ServiceSettings")
    settings = cls.from_env(prefix, {prefix + "DATABASE_URL_FILE": str(tmp_path / Path(path).name)})
    assert settings.database_url == URL and "pw-9f3" not in repr(settings)


def test_no_environment_variable_comes_from_a_secret(db_docs):
    """Checkov CKV_K8S_35: secrets as files. No container of any workload takes a Secret through
    env (secretKeyRef) or envFrom (secretRef)."""
    found = []
    for doc in db_docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet"):
            continue
        for c in all_containers(doc):
            found += [
                (doc["metadata"]["name"], e["name"])
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
            found += [(doc["metadata"]["name"], "envFrom") for e in c.get("envFrom", []) if "secretRef" in e]
    assert not found


@pytest.mark.parametrize("component", list(SECRETS))
def test_sqlite_without_a_secret(sqlite_docs, component):
    dep = _pod(sqlite_docs, component)
    container = main_container(dep)
    assert not [e for e in container["env"] if "DATABASE_URL" in e["name"]]
    assert "database-url" not in {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert "database-url" not in {m["name"] for m in container["volumeMounts"]}
