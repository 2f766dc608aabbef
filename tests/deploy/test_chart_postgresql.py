"""The optional in-cluster PostgreSQL for trials (postgresql.enabled): rendered from an existing
Secret only, hardened, reachable by the release's services only, and its init script creates
databases the services' own migrations then run on (against a real PostgreSQL 15)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
from typing import Any

import kubernetes_validate
import psycopg
import pytest
from test_chart import (
    AUTH_ARGS,
    CHART,
    CRD_KINDS,
    NAMESPACE,
    RELEASE,
    all_containers,
    by_kind,
    deployment,
    helm,
    mount_path,
    render,
    volume,
)
from test_chart_scale import KUBE_VERSIONS

from atlasflow.testing.postgres import PG_BIN

SECRET = "atlasflow-postgresql"
NAME = f"{RELEASE}-atlasflow-postgresql"
SERVICES = ("ingest", "segmentation", "ranking", "labels", "training")
TRIAL = (
    *("--set", "postgresql.enabled=true", "--set", f"postgresql.auth.existingSecret={SECRET}"),
    *("--set", "training.enabled=true", "--set", "gateway.enabled=true"),
    *("--set", "gateway.oidc.clientId=atlasflow-gateway", "--set", "gateway.ingress.host=atlasflow.example"),
)


@pytest.fixture(scope="module")
def pg_docs() -> list[dict[str, Any]]:
    return render(*TRIAL)


def _statefulset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "StatefulSet")[NAME]


def test_render_fails_without_the_existing_secret() -> None:
    proc = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *AUTH_ARGS, "--set", "postgresql.enabled=true")
    assert proc.returncode != 0 and "postgresql.auth.existingSecret is required" in proc.stderr, proc.stderr


def test_off_by_default() -> None:
    docs = render()
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "postgresql"]


def test_byte_stable_and_valid_for_three_kubernetes_versions(pg_docs: list[dict[str, Any]]) -> None:
    """Nothing is generated (no random password, no lookup): two renders are identical."""
    args = ("template", RELEASE, str(CHART), "-n", NAMESPACE, *AUTH_ARGS, *TRIAL)
    first, second = helm(*args), helm(*args)
    assert first.returncode == 0 and first.stdout == second.stdout
    own = [d for d in pg_docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "postgresql"]
    assert {d["kind"] for d in own} == {"StatefulSet", "Service", "ConfigMap", "NetworkPolicy"}
    for version in KUBE_VERSIONS:
        for doc in own:
            kubernetes_validate.validate(doc, version, strict=True)
    for doc in pg_docs:  # the services' pods with their database volumes: the newest schema
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_statefulset_is_hardened(pg_docs: list[dict[str, Any]]) -> None:
    sts = _statefulset(pg_docs)
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    repo, _, tag = c["image"].rpartition(":")
    assert repo.endswith("/postgres") and tag.startswith("15.") and tag != "latest"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # the writable places of a read-only root: socket/lock dir, /tmp, shared memory
    for name, path in (("run", "/var/run/postgresql"), ("tmp", "/tmp"), ("shm", "/dev/shm")):
        assert mount_path(c, name) == path and "emptyDir" in volume(sts, name)
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mount_path(c, "data") == "/var/lib/postgresql/data"
    env = {e["name"]: e for e in c["env"]}
    assert env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")  # below the mount (lost+found)
    # the password is a file of the user's Secret, never an env value
    assert env["POSTGRES_PASSWORD_FILE"]["value"] == mount_path(c, "password") + "/password"
    assert not [e for e in c["env"] if "valueFrom" in e]
    (source,) = volume(sts, "password")["projected"]["sources"]
    assert source["secret"] == {"name": SECRET, "items": [{"key": "password", "path": "password"}]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"][0] == "pg_isready"
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    assert mount_path(c, "init") == "/docker-entrypoint-initdb.d"


def test_network_policy_admits_only_the_atlasflow_services(pg_docs: list[dict[str, Any]]) -> None:
    np = by_kind(pg_docs, "NetworkPolicy")[NAME]["spec"]
    assert np["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "postgresql"
    (rule,) = np["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector: this namespace only
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    (expr,) = peer["podSelector"]["matchExpressions"]
    assert expr["key"] == "app.kubernetes.io/component" and set(expr["values"]) == {*SERVICES, "gateway"}
    assert rule["ports"] == [{"protocol": "TCP", "port": "postgresql"}]


def test_services_read_their_url_from_the_trial_secret(pg_docs: list[dict[str, Any]]) -> None:
    for component in (*SERVICES, "gateway"):
        docs = [
            d
            for d in pg_docs
            if d["kind"] in ("Deployment", "StatefulSet")
            and d["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        (dep,) = docs
        (source,) = volume(dep, "database-url")["projected"]["sources"]
        key = "labels-database-url" if component == "gateway" else f"{component}-database-url"
        assert source["secret"] == {"name": SECRET, "items": [{"key": key, "path": "database-url"}]}
    # a service's own database Secret still wins
    own = render(*TRIAL, "--set", "ranking.database.existingSecret=ranking-db")
    (source,) = volume(deployment(own, "ranking"), "database-url")["projected"]["sources"]
    assert source["secret"]["name"] == "ranking-db"
    for doc in pg_docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in all_containers(doc):
                assert not [e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]


def test_init_script_creates_databases_the_services_migrate(pg_docs, postgres, tmp_path) -> None:
    """The rendered init script, run by psql as the entrypoint does, against a real PostgreSQL 15:
    each service's Alembic migrations then run in its database (as the owner role)."""
    user = f"af_trial_{os.getpid()}"
    docs = render(*TRIAL, "--set", f"postgresql.auth.username={user}")
    script = by_kind(docs, "ConfigMap")[f"{NAME}-init"]["data"]["01-atlasflow-databases.sql"]
    sql = tmp_path / "01-atlasflow-databases.sql"  # the entrypoint runs psql -f on each *.sql
    sql.write_text(script)
    with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{user}" SUPERUSER LOGIN')  # what POSTGRES_USER is in the image
    proc = subprocess.run(
        [str(PG_BIN / "psql"), "-v", "ON_ERROR_STOP=1", "--no-psqlrc", "-h", "127.0.0.1", "-p", str(postgres.port)]
        + ["-U", user, "-d", "postgres", "-f", str(sql)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        for service in SERVICES:
            url = f"postgresql://{user}@127.0.0.1:{postgres.port}/atlasflow_{service}"
            upgrade_database = importlib.import_module(f"atlasflow.{service}.app").upgrade_database
            assert upgrade_database(url), service
            with psycopg.connect(url) as conn:
                owner = conn.execute(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
                ).fetchone()
            assert owner == (user,)
    finally:
        with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
            for service in SERVICES:
                conn.execute(f'DROP DATABASE IF EXISTS "atlasflow_{service}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{user}"')
    assert json.dumps(docs)  # rendered objects are plain data
