"""Chart for a real cluster (issue 17): the blob store on S3 (no ReadWriteMany volume), stable
secrets, PodDisruptionBudgets, HorizontalPodAutoscalers, topology spread, probes and resources,
replica guards, validated with `helm lint --strict` and the Kubernetes schemas of three recent
versions (kubernetes-validate, strict). No cluster here: nothing is applied.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from test_chart import (
    AUTH_ARGS,
    CHART,
    CRD_KINDS,
    RELEASE,
    all_containers,
    by_kind,
    deployment,
    helm,
    literal_env,
    main_container,
    render,
)

#: three recent Kubernetes minor versions the rendered objects must validate against
KUBE_VERSIONS = ("1.35.0", "1.36.0", "1.37.0")
SERVICES = ("ingest", "segmentation", "ranking", "labels")
BLOB_USERS = ("ingest", "segmentation", "labels", "gateway")
GATEWAY = (
    "--set",
    "gateway.enabled=true",
    "--set",
    "gateway.oidc.clientId=atlasflow-review",
    "--set",
    "gateway.ingress.host=atlasflow.hospital.example",
    "--set",
    "gateway.database.existingSecret=atlasflow-gateway-db",
)
S3 = (
    "--set",
    "blobs.url=s3://atlasflow-blobs/site-a",
    "--set",
    "blobs.s3.endpointUrl=https://minio.storage.svc:9000",
    "--set",
    "blobs.s3.region=eu-central-1",
    "--set",
    "blobs.s3.addressingStyle=path",
    "--set",
    "blobs.s3.credentials.existingSecret=atlasflow-s3",
)
SCALE = (
    *GATEWAY,
    *S3,
    "--set",
    "gateway.autoscaling.enabled=true",
    "--set",
    "triton.autoscaling.enabled=true",
    "--set",
    "triton.autoscaling.queueDepth.enabled=true",
    "--set",
    "triton.autoscaling.queueDepth.selector.queue=jobs",
    "--set",
    "triton.replicas=2",
)


@pytest.fixture(scope="module")
def scale_docs() -> list[dict[str, Any]]:
    return render(*SCALE)


@pytest.fixture(scope="module")
def local_docs() -> list[dict[str, Any]]:
    return render(*GATEWAY)


def pod_labels(dep: dict[str, Any]) -> dict[str, str]:
    return dict(dep["spec"]["template"]["metadata"]["labels"])


def volumes(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}


def test_s3_blob_store_needs_no_shared_volume(scale_docs: list[dict[str, Any]]) -> None:
    claims = by_kind(scale_docs, "PersistentVolumeClaim")
    assert not any(c["spec"]["accessModes"] != ["ReadWriteOnce"] for c in claims.values()), {
        n: c["spec"]["accessModes"] for n, c in claims.items()
    }
    assert f"{RELEASE}-atlasflow-blobs" not in claims
    for component in BLOB_USERS:
        dep = deployment(scale_docs, component)
        container = main_container(dep)
        env = literal_env(container)
        p = f"ATLASFLOW_{component.upper()}_"
        assert env[p + "BLOB_URL"] == "s3://atlasflow-blobs/site-a"
        assert env[p + "BLOB_S3_ENDPOINT_URL"] == "https://minio.storage.svc:9000"
        assert env[p + "BLOB_S3_REGION"] == "eu-central-1"
        assert env[p + "BLOB_S3_ADDRESSING_STYLE"] == "path"
        assert p + "BLOB_DIR" not in env
        # credentials: the mounted Secret's file through boto3's standard chain, never a value
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/var/run/secrets/atlasflow/s3/credentials"
        assert not any(e["name"].startswith("AWS_SECRET") or e["name"] == "AWS_ACCESS_KEY_ID" for e in container["env"])
        vols = volumes(dep)
        assert "blobs" not in vols
        assert vols["s3-credentials"]["secret"]["secretName"] == "atlasflow-s3"
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "s3-credentials"]
        assert mount["readOnly"] is True and mount["mountPath"] == "/var/run/secrets/atlasflow/s3"


def test_local_blob_store_keeps_the_shared_volume(local_docs: list[dict[str, Any]]) -> None:
    claims = by_kind(local_docs, "PersistentVolumeClaim")
    assert claims[f"{RELEASE}-atlasflow-blobs"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for component in BLOB_USERS:
        dep = deployment(local_docs, component)
        env = literal_env(main_container(dep))
        assert env[f"ATLASFLOW_{component.upper()}_BLOB_DIR"] == "/var/lib/atlasflow/blobs"
        assert f"ATLASFLOW_{component.upper()}_BLOB_URL" not in env
        assert volumes(dep)["blobs"]["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-atlasflow-blobs"


def test_blob_url_must_be_s3_or_empty() -> None:
    proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, "--set", "blobs.url=ftp://x/y")
    assert proc.returncode != 0 and "/blobs/url" in proc.stderr, proc.stderr


def test_renders_are_identical(scale_docs: list[dict[str, Any]]) -> None:
    """No value is drawn at render time (the Triton token was `randAlphaNum` once): two
    renders of the same values are byte-identical, so GitOps diffs and upgrades are stable."""
    args = ("template", RELEASE, str(CHART), *AUTH_ARGS, *SCALE)
    first, second = helm(*args), helm(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert f"{RELEASE}-atlasflow-triton-access-token" not in by_kind(scale_docs, "Secret")


@pytest.mark.parametrize("setting", ["triton.accessToken.value=" + "t" * 40, "triton.accessToken.existingSecret=old"])
def test_the_removed_triton_token_fails_the_render_with_the_way_forward(setting: str) -> None:
    proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, "--set", setting)
    assert proc.returncode != 0
    assert "triton.accessToken is removed" in proc.stderr and "mutual TLS" in proc.stderr, proc.stderr


def test_pod_disruption_budgets(scale_docs: list[dict[str, Any]]) -> None:
    pdbs = by_kind(scale_docs, "PodDisruptionBudget")
    for component in (*SERVICES, "gateway", "triton"):
        dep = deployment(scale_docs, component)
        (pdb,) = [p for p in pdbs.values() if p["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert selector == dep["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels(dep).items()
    off = render("--set", "podDisruptionBudget.enabled=false")
    assert not by_kind(off, "PodDisruptionBudget")


def test_autoscalers(scale_docs: list[dict[str, Any]]) -> None:
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind(scale_docs, "HorizontalPodAutoscaler").values()}
    assert set(hpas) == {f"{RELEASE}-atlasflow-gateway", f"{RELEASE}-atlasflow-triton"}
    for component in ("gateway", "triton"):
        dep = deployment(scale_docs, component)
        hpa = hpas[dep["metadata"]["name"]]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert "replicas" not in dep["spec"]  # the HPA owns it
        cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
        assert cpu[0]["resource"]["name"] == "cpu"
        assert cpu[0]["resource"]["target"]["type"] == "Utilization"
        assert main_container(dep)["resources"]["requests"]["cpu"]  # utilisation needs a request
    (ext,) = [m for m in hpas[f"{RELEASE}-atlasflow-triton"]["spec"]["metrics"] if m["type"] == "External"]
    assert ext["external"]["metric"] == {
        "name": "atlasflow_segmentation_queue_depth",
        "selector": {"matchLabels": {"queue": "jobs"}},
    }
    assert ext["external"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    # the four SQLite services get no autoscaler and stay at their replica count
    assert not by_kind(render(), "HorizontalPodAutoscaler")


def test_topology_spread(scale_docs: list[dict[str, Any]]) -> None:
    for component in (*SERVICES, "gateway", "triton"):
        dep = deployment(scale_docs, component)
        spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert [s["topologyKey"] for s in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
        for s in spread:
            assert s["labelSelector"]["matchLabels"].items() <= pod_labels(dep).items()
            assert s["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
            assert s["whenUnsatisfiable"] == "ScheduleAnyway"


def test_replicas_strategies_probes_resources(scale_docs: list[dict[str, Any]]) -> None:
    for component in SERVICES:
        dep = deployment(scale_docs, component)
        # one writer of SQLite state on a ReadWriteOnce volume until the replica work
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
        c = main_container(dep)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" in c[probe], (component, probe)
    for component in ("gateway", "triton"):
        dep = deployment(scale_docs, component)
        assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for component in (*SERVICES, "gateway", "triton"):
        for c in all_containers(deployment(scale_docs, component)):
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), component


@pytest.mark.parametrize("component", SERVICES)
def test_sqlite_services_refuse_several_replicas(component: str) -> None:
    proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, "--set", f"{component}.replicas=2")
    assert proc.returncode != 0 and f"'/{component}/replicas': maximum: got 2, want 1" in proc.stderr, proc.stderr


def test_triton_own_deployment_on_gpu_nodes() -> None:
    docs = render(
        "--set-string", "triton.nodeSelector.nvidia\\.com/gpu\\.present=true",
        "--set", "triton.tolerations[0].key=nvidia.com/gpu",
        "--set", "triton.tolerations[0].operator=Exists",
        "--set", "triton.tolerations[0].effect=NoSchedule",
    )  # fmt: skip
    dep = deployment(docs, "triton")
    spec = dep["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert main_container(dep)["resources"]["limits"]["nvidia.com/gpu"] == 1
    # nothing else asks for a GPU
    for component in (*SERVICES,):
        assert "nvidia.com/gpu" not in main_container(deployment(docs, component))["resources"].get("limits", {})


def test_triton_autoscaling_refuses_a_shared_writable_repository() -> None:
    proc = helm(
        "template", RELEASE, str(CHART), *AUTH_ARGS,
        "--set", "triton.autoscaling.enabled=true",
        "--set", "triton.strategy.type=Recreate", "--set", "triton.strategy.rollingUpdate=null",
        "--set", "triton.modelRepository.persistence.enabled=true",
        "--set", "triton.modelRepository.persistence.accessModes={ReadWriteOnce}",
    )  # fmt: skip
    assert proc.returncode != 0 and "triton.autoscaling needs a model repository" in proc.stderr, proc.stderr


def test_lint_strict_with_scale_values() -> None:
    proc = helm("lint", "--strict", str(CHART), *AUTH_ARGS, *SCALE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_objects_validate_against_recent_kubernetes(kube_version: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--kube-version", kube_version, *AUTH_ARGS, *SCALE)
    assert proc.returncode == 0, proc.stderr
    import yaml

    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kube_version} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


RANKING_PG = ("--set", "ranking.database.existingSecret=atlasflow-ranking-db", "--set", "ranking.replicas=3")


def test_ranking_replicas_need_postgresql_and_roll() -> None:
    docs = render(*RANKING_PG)
    dep = deployment(docs, "ranking")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert "emptyDir" in volumes(dep)["data"]  # nothing durable on the pod, no ReadWriteOnce claim
    assert not [p for p in by_kind(docs, "PersistentVolumeClaim") if "ranking" in p]
    (pdb,) = [p for p in by_kind(docs, "PodDisruptionBudget").values() if "ranking" in p["metadata"]["name"]]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(dep).items()
    # SQLite (the default): one replica, Recreate, its PVC
    sqlite = render()
    dep = deployment(sqlite, "ranking")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert [p for p in by_kind(sqlite, "PersistentVolumeClaim") if "ranking" in p]


def test_ranking_autoscaler_on_postgresql_only() -> None:
    docs = render(*RANKING_PG, "--set", "ranking.autoscaling.enabled=true")
    dep = deployment(docs, "ranking")
    (hpa,) = [h for h in by_kind(docs, "HorizontalPodAutoscaler").values() if "ranking" in h["metadata"]["name"]]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)
    assert "replicas" not in dep["spec"]  # the HPA owns it
    for doc in (dep, hpa):
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
    # SQLite: refused by the schema (replicas, autoscaling) with a clear message
    for setting in ("ranking.replicas=2", "ranking.autoscaling.enabled=true"):
        proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, "--set", setting)
        assert proc.returncode != 0 and "/ranking/" in proc.stderr, proc.stderr


# segmentation on PostgreSQL: several replicas follow the activated ensemble version recorded in
# the database (segmentation/activation.py); nothing durable on the pod, no ReadWriteMany of its own
SEG_PG = ("--set", "segmentation.database.existingSecret=seg-pg", "--set", "segmentation.replicas=3")
SEG_ROLLOUT = (
    "--set", "training.enabled=true",
    "--set", "triton.modelRepository.persistence.enabled=true",
    "--set-json", 'triton.modelRepository.persistence.accessModes=["ReadWriteMany"]',
    "--set", "triton.strategy.type=Recreate",
)  # fmt: skip


def test_segmentation_replicas_on_postgresql() -> None:
    docs = render(*S3, *SEG_PG, *SEG_ROLLOUT)
    dep = deployment(docs, "segmentation")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    vols = volumes(dep)
    assert vols["data"] == {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}  # a per-pod scratch
    claims = by_kind(docs, "PersistentVolumeClaim")
    assert not [c for c in claims.values() if c["metadata"]["labels"]["app.kubernetes.io/component"] == "segmentation"]
    # the promoted versions: the training state volume (ReadWriteMany for training's own Job
    # pods), mounted read-only by every segmentation replica; segmentation writes nothing there
    assert vols["training-state"]["persistentVolumeClaim"]["readOnly"] is True
    container = main_container(dep)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "training-state"]
    assert mount["readOnly"] is True
    env = literal_env(container)
    assert env["ATLASFLOW_SEGMENTATION_VERSIONS_DIR"] == "/training-state/versions"
    assert env["ATLASFLOW_SEGMENTATION_ACTIVATION"] == "repository"
    assert "ATLASFLOW_SEGMENTATION_DATABASE_URL_FILE" in env
    pdb = by_kind(docs, "PodDisruptionBudget")[dep["metadata"]["name"]]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(dep).items()
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
    auto = render(*S3, *SEG_PG, "--set", "segmentation.autoscaling.enabled=true")
    dep = deployment(auto, "segmentation")
    assert "replicas" not in dep["spec"]  # the HPA owns it
    hpa = by_kind(auto, "HorizontalPodAutoscaler")[dep["metadata"]["name"]]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    # SQLite stays one replica, Recreate, on its PVC
    dep = deployment(render(), "segmentation")
    assert dep["spec"]["strategy"] == {"type": "Recreate"} and "persistentVolumeClaim" in volumes(dep)["data"]


@pytest.mark.parametrize("setting", ["segmentation.replicas=2", "segmentation.autoscaling.enabled=true"])
def test_segmentation_replicas_need_postgresql(setting: str) -> None:
    proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, "--set", setting)
    assert proc.returncode != 0 and "/segmentation/" in proc.stderr, proc.stderr
    # the template refuses it too (a render that skips the schema)
    proc = helm("template", RELEASE, str(CHART), "--skip-schema-validation", *AUTH_ARGS, "--set", setting)
    assert proc.returncode != 0 and "needs PostgreSQL (segmentation.database.existingSecret" in proc.stderr, proc.stderr


LABELS_PG = (
    "--set", "labels.database.existingSecret=atlasflow-labels-db",
    "--set", "labels.deid.existingSecret=atlasflow-deid",
    "--set", "labels.exports.persistence.accessModes={ReadWriteMany}",
    "--set", "labels.replicas=3",
)  # fmt: skip


def test_labels_replicas_need_postgresql_the_deid_secret_and_shared_exports() -> None:
    """labels on PostgreSQL (version events claimed with leases, export jobs leased to one
    replica) with the key in a Secret and a ReadWriteMany exports volume: several replicas,
    RollingUpdate, no data claim. SQLite, or a missing key Secret or shared exports volume:
    refused with the way forward."""
    docs = render(*LABELS_PG)
    dep = deployment(docs, "labels")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert "emptyDir" in volumes(dep)["data"] and "persistentVolumeClaim" in volumes(dep)["exports"]
    claims = [c for c in by_kind(docs, "PersistentVolumeClaim").values() if "labels" in c["metadata"]["name"]]
    assert [c["spec"]["accessModes"] for c in claims] == [["ReadWriteMany"]]  # the exports claim only
    kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)
    # SQLite (the default): one replica, Recreate, its data claim
    sqlite = deployment(render(), "labels")
    assert sqlite["spec"]["replicas"] == 1 and sqlite["spec"]["strategy"] == {"type": "Recreate"}
    assert "persistentVolumeClaim" in volumes(sqlite)["data"]
    # PostgreSQL with a ReadWriteOnce exports claim: one pod mounts it at a time -> Recreate
    one = deployment(render(*LABELS_PG[:4]), "labels")
    assert one["spec"]["replicas"] == 1 and one["spec"]["strategy"] == {"type": "Recreate"}
    refusals = {
        ("--set", "labels.replicas=2"): "/labels/replicas",  # the schema: SQLite
        (*LABELS_PG[:2], "--set", "labels.replicas=2"): "needs labels.deid.existingSecret",
        (*LABELS_PG[:4], "--set", "labels.replicas=2"): "accessModes [ReadWriteMany]",
    }
    for args, message in refusals.items():
        proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, *args)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    proc = helm("template", RELEASE, str(CHART), "--skip-schema-validation", *AUTH_ARGS, "--set", "labels.replicas=2")
    assert proc.returncode != 0 and "labels.replicas > 1 needs PostgreSQL" in proc.stderr, proc.stderr


EXPORTS_S3 = (
    "--set",
    "labels.exports.objectStore.bucket=atlasflow-exports",
    "--set",
    "labels.exports.objectStore.prefix=site-a/",
)


def test_labels_replicas_with_exports_on_the_object_store_need_no_shared_volume() -> None:
    """Exports to the object store (labels.exports.objectStore): several labels replicas,
    RollingUpdate, no exports volume or claim (no ReadWriteMany volume at all), the allowed
    prefix and the blob store's credentials in the pod; without blobs.url s3:// refused."""
    docs = render(*S3, *LABELS_PG[:4], *EXPORTS_S3, "--set", "labels.replicas=3")
    dep = deployment(docs, "labels")
    assert dep["spec"]["replicas"] == 3 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "exports" not in volumes(dep) and "s3-credentials" in volumes(dep)
    container = main_container(dep)
    env = literal_env(container)
    assert env["ATLASFLOW_LABELS_EXPORT_S3_PREFIXES"] == "s3://atlasflow-exports/site-a"
    assert "ATLASFLOW_LABELS_EXPORT_DIR" not in env and "AWS_SHARED_CREDENTIALS_FILE" in env
    assert "exports" not in {m["name"] for m in container["volumeMounts"]}
    claims = by_kind(docs, "PersistentVolumeClaim")
    assert not [n for n in claims if "labels" in n], sorted(claims)
    kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)
    proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, *EXPORTS_S3)
    assert proc.returncode != 0 and "/blobs/url" in proc.stderr, proc.stderr  # the schema
    proc = helm("template", RELEASE, str(CHART), "--skip-schema-validation", *AUTH_ARGS, *EXPORTS_S3)
    assert proc.returncode != 0 and "needs blobs.url s3://" in proc.stderr, proc.stderr
