"""Ingest replicas in the chart (issue 17): on PostgreSQL ingest is a StatefulSet (one
ReadWriteOnce spool volume per pod, stable identity, Parallel pods, RollingUpdate, a headless
Service for pod DNS) that the PodDisruptionBudget and the HorizontalPodAutoscaler select; on
SQLite it stays the single-replica Deployment with Recreate. Rendered with `helm template`,
`helm lint --strict` and the Kubernetes schemas of three recent versions; no cluster here.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from test_chart import (
    AUTH_ARGS,
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    by_kind,
    helm,
    literal_env,
    main_container,
    render,
)
from test_chart_scale import KUBE_VERSIONS, S3

NAME = f"{RELEASE}-atlasflow-ingest"
REPLICAS = (
    "--set",
    "ingest.database.existingSecret=ingest-pg",
    "--set",
    "ingest.replicas=3",
    "--set",
    "ingest.dicom.tls.enabled=true",
    "--set",
    "ingest.dicom.tls.existingSecret=ingest-dicom-tls",
)
AUTOSCALED = (*REPLICAS, "--set", "ingest.autoscaling.enabled=true", "--set", "ingest.autoscaling.maxReplicas=6")


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render(*S3, *REPLICAS)


def ingest_objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {
        n: d
        for n, d in by_kind(docs, kind).items()
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "ingest"
    }


def test_postgresql_makes_ingest_a_statefulset_with_a_volume_per_pod(docs: list[dict[str, Any]]) -> None:
    assert not ingest_objects(docs, "Deployment")
    assert not ingest_objects(docs, "PersistentVolumeClaim")  # no shared claim: one per pod
    sts = ingest_objects(docs, "StatefulSet")[NAME]
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    assert spec["serviceName"] == f"{NAME}-headless"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    # immutable after creation: no label that changes with the chart version
    assert claim["metadata"]["labels"] == spec["selector"]["matchLabels"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    pod = spec["template"]["spec"]
    assert "data" not in {v["name"] for v in pod["volumes"]}  # the template's claim is the volume
    container = main_container(sts)
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["data"] == "/var/lib/atlasflow/data"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert "grpc" in container["readinessProbe"]


def test_headless_service_next_to_the_normal_one(docs: list[dict[str, Any]]) -> None:
    services = ingest_objects(docs, "Service")
    assert set(services) == {NAME, f"{NAME}-dicom", f"{NAME}-headless"}
    headless = services[f"{NAME}-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    assert {p["name"] for p in headless["ports"]} == {"grpc", "dicom", "dicom-tls"}
    # C-STORE and gRPC go through the normal Service (a cluster IP spreading over the pods)
    assert "clusterIP" not in services[NAME]["spec"]
    assert "metrics" in {p["name"] for p in services[NAME]["spec"]["ports"]}
    # the ServiceMonitor scrapes ports named metrics: each pod once, not again via the headless one
    assert "metrics" not in {p["name"] for p in headless["ports"]}
    sts = ingest_objects(docs, "StatefulSet")[NAME]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_pdb_and_network_policy_select_the_statefulset_pods(docs: list[dict[str, Any]]) -> None:
    sts = ingest_objects(docs, "StatefulSet")[NAME]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    (pdb,) = ingest_objects(docs, "PodDisruptionBudget").values()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (policy,) = ingest_objects(docs, "NetworkPolicy").values()
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()


def test_autoscaler_targets_the_statefulset() -> None:
    docs = render(*S3, *AUTOSCALED)
    sts = ingest_objects(docs, "StatefulSet")[NAME]
    assert "replicas" not in sts["spec"]  # the HPA owns it
    (hpa,) = ingest_objects(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": NAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (cpu,) = hpa["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu" and cpu["resource"]["target"]["averageUtilization"] == 70


def test_sqlite_keeps_the_single_replica_deployment() -> None:
    docs = render()
    assert not ingest_objects(docs, "StatefulSet")
    (dep,) = ingest_objects(docs, "Deployment").values()
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert set(ingest_objects(docs, "PersistentVolumeClaim")) == {f"{NAME}-data"}
    assert f"{NAME}-headless" not in ingest_objects(docs, "Service")
    # the stop leaves a third of the 30 s grace (at most 15 s) to drain the spool after the RPCs
    assert literal_env(main_container(dep))["ATLASFLOW_INGEST_SHUTDOWN_GRACE_S"] == "20"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (("ingest.replicas=2",), "'/ingest/replicas': maximum: got 2, want 1"),
        (("ingest.autoscaling.enabled=true",), "ingest.autoscaling needs PostgreSQL"),
        (
            ("ingest.database.existingSecret=ingest-pg", "ingest.persistence.existingClaim=old-claim"),
            "ingest.persistence.existingClaim cannot be used with PostgreSQL",
        ),
    ],
)
def test_refused_combinations(settings: tuple[str, ...], message: str) -> None:
    args = [a for s in settings for a in ("--set", s)]
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *AUTH_ARGS, *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_template_guard_without_the_schema() -> None:
    """The template refuses several SQLite replicas itself (for a render that skips the schema)."""
    proc = helm("template", RELEASE, str(CHART), "--skip-schema-validation", *AUTH_ARGS, "--set", "ingest.replicas=2")
    assert proc.returncode != 0 and "ingest.replicas > 1 needs PostgreSQL" in proc.stderr, proc.stderr


def test_lint_strict_with_ingest_replicas() -> None:
    proc = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *AUTH_ARGS, *S3, *AUTOSCALED)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_statefulset_validates_against_recent_kubernetes(kube_version: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--kube-version", kube_version, *AUTH_ARGS, *S3, *AUTOSCALED)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    checked = 0
    for doc in docs:
        if doc["metadata"]["labels"].get("app.kubernetes.io/component") != "ingest":
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kube_version} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
        checked += 1
    assert {"StatefulSet", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= {
        d["kind"] for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "ingest"
    }
    assert checked >= 6


def test_the_in_cluster_postgresql_also_makes_a_statefulset() -> None:
    docs = render(
        "--set",
        "postgresql.enabled=true",
        "--set",
        "postgresql.auth.existingSecret=pg-auth",
        "--set",
        "ingest.replicas=2",
    )
    sts = ingest_objects(docs, "StatefulSet")[NAME]
    assert sts["spec"]["replicas"] == 2 and not ingest_objects(docs, "Deployment")
    env = {e["name"] for e in main_container(sts)["env"]}
    assert "ATLASFLOW_INGEST_DATABASE_URL_FILE" in env
