"""Chart: the training service (templates/training/: Deployment, Service, state PVC,
NetworkPolicies, and the RBAC of rbac.yaml) with runner kubernetes. The rendered environment is
read back through the product's own settings (`TrainingSettings.from_env` ->
`k8s_runner.job_settings` -> `jobs_k8s.build_job`), so the Job the service would create from
this chart is validated against the Kubernetes schema too. Validated with `helm lint --strict`
and kubernetes-validate (strict, three versions). No cluster here: nothing is applied."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
import yaml
from test_chart import (
    AUTH_ARGS,
    CHART,
    CRD_KINDS,
    NAMESPACE,
    RELEASE,
    by_kind,
    deployment,
    helm,
    literal_env,
    main_container,
    render,
)

from atlasflow.training.jobs_k8s import build_job
from atlasflow.training.k8s_runner import job_settings
from atlasflow.training.settings import PREFIX, TrainingSettings

KUBE_VERSIONS = ("1.35.0", "1.36.0", "1.37.0")
TRAINING = ("--set", "training.enabled=true", "--set", "training.job.gpus=4", "--set", "networkPolicy.enabled=true")
S3 = (
    "--set",
    "blobs.url=s3://atlasflow-blobs/site-a",
    "--set",
    "blobs.s3.endpointUrl=https://minio.storage.svc:9000",
    "--set",
    "blobs.s3.credentials.existingSecret=atlasflow-s3",
)
NAME = f"{RELEASE}-atlasflow-training"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render(*TRAINING)


def _settings(container: dict[str, Any]) -> TrainingSettings:
    env = literal_env(container)
    env = {k: v for k, v in env.items() if k.startswith(PREFIX)}
    import os

    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return TrainingSettings.from_env(PREFIX)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_training_deployment(docs: list[dict[str, Any]]) -> None:
    dep = deployment(docs, "training")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == NAME and pod["automountServiceAccountToken"] is True
    c = main_container(dep)
    assert c["command"] == ["atlasflow", "serve", "training"]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c) and c["resources"]["limits"]["memory"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    env = literal_env(c)
    assert env["ATLASFLOW_TRAINING_RUNNER"] == "kubernetes"
    assert env["ATLASFLOW_TRAINING_STATE_DIR"] == "/state"
    assert env["ATLASFLOW_TRAINING_LABELS_TARGET"] == f"{RELEASE}-atlasflow-labels:50054"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["state"] == "/state"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["state"]["persistentVolumeClaim"]["claimName"] == f"{NAME}-data"
    claim = by_kind(docs, "PersistentVolumeClaim")[f"{NAME}-data"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    svc = by_kind(docs, "Service")[NAME]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50055, "metrics": 9464}
    # the RBAC comes with runner kubernetes, and its ServiceAccount is the pod's
    assert f"{NAME}-jobs" in by_kind(docs, "Role") and NAME in by_kind(docs, "ServiceAccount")


def test_the_job_the_service_would_create(docs: list[dict[str, Any]]) -> None:
    """The chart's env -> TrainingSettings -> JobSettings -> the batch/v1 Job: valid, on the GPU
    nodes, the same state PVC as the service, the blob PVC read-only."""
    settings = _settings(main_container(deployment(docs, "training")))
    js = job_settings(settings)
    assert js.namespace == NAMESPACE and js.state_pvc == f"{NAME}-data" and js.blob_pvc == f"{RELEASE}-atlasflow-blobs"
    job = build_job(js, "sha256:" + "ab" * 32, "abdomen-trio-v1", run_id="tr-0123")
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4" and "--nproc_per_node=4" in c["command"]
    assert c["image"] == settings.job_image and c["image"].endswith("/atlasflow/training:0.1.0")
    assert (job["spec"]["backoffLimit"], job["spec"]["ttlSecondsAfterFinished"]) == (2, 3600)


def test_job_on_s3_blobs_and_its_own_image() -> None:
    docs = render(
        *TRAINING,
        *S3,
        "--set",
        "training.job.image.repository=atlasflow/training-cuda",
        "--set",
        "training.job.image.tag=1.2.3",
    )
    env = literal_env(main_container(deployment(docs, "training")))
    assert "ATLASFLOW_TRAINING_JOB_BLOB_PVC" not in env
    assert env["ATLASFLOW_TRAINING_JOB_IMAGE"].endswith("atlasflow/training-cuda:1.2.3")
    js = job_settings(_settings(main_container(deployment(docs, "training"))))
    assert js.blob_url == "s3://atlasflow-blobs/site-a" and not js.blob_pvc
    assert js.env["ATLASFLOW_TRAINING_BLOB_S3_ENDPOINT_URL"] == "https://minio.storage.svc:9000"
    pod = build_job(js, "sha256:" + "ab" * 32, "abdomen-trio-v1", run_id="tr-1")["spec"]["template"]["spec"]
    assert {"name": "s3-credentials", "mountPath": "/var/run/secrets/atlasflow/s3", "readOnly": True} in pod[
        "containers"
    ][0]["volumeMounts"]
    assert [v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "s3-credentials"] == ["atlasflow-s3"]


def test_network_policies(docs: list[dict[str, Any]]) -> None:
    policies = by_kind(docs, "NetworkPolicy")
    own = policies[NAME]
    assert own["spec"]["policyTypes"] == ["Ingress"]
    job = policies[f"{NAME}-job"]
    assert job["spec"]["ingress"] == [] and job["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "atlasflow",
        "app.kubernetes.io/component": "training-job",
    }
    labels_from = policies[f"{RELEASE}-atlasflow-labels"]["spec"]["ingress"][0]["from"]
    assert {
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/name": "atlasflow",
    } in [p["podSelector"]["matchLabels"] for p in labels_from]
    # off by default: the labels policy does not admit a training pod that does not exist
    default_labels = by_kind(render("--set", "networkPolicy.enabled=true"), "NetworkPolicy")[
        f"{RELEASE}-atlasflow-labels"
    ]
    assert "training" not in json.dumps(default_labels["spec"])


def test_runner_local_has_no_api_access() -> None:
    docs = render(*TRAINING, "--set", "training.runner=local")
    pod = deployment(docs, "training")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert not [n for n in by_kind(docs, "Role") if "training" in n]
    assert not [k for k in literal_env(pod["containers"][0]) if "_JOB_" in k]


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("--set", "training.replicas=2"), "/training/replicas"),
        (("--set", "training.runner=slurm"), "/training/runner"),
        (("--set", "training.persistence.enabled=false"), "/training/persistence/enabled"),
    ],
)
def test_schema_refuses(args: tuple[str, ...], path: str) -> None:
    proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, *TRAINING, *args)
    assert proc.returncode != 0 and path in proc.stderr, proc.stderr


def test_lint_strict_and_byte_stable() -> None:
    proc = helm("lint", "--strict", str(CHART), *AUTH_ARGS, *TRAINING, *S3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = ("template", RELEASE, str(CHART), *AUTH_ARGS, *TRAINING)
    first, second = helm(*args), helm(*args)
    assert first.returncode == 0 and first.stdout == second.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_objects_validate_against_recent_kubernetes(kube_version: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--kube-version", kube_version, *AUTH_ARGS, *TRAINING)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d and "training" in d["metadata"]["name"]]
    assert len(docs) == 8, [d["metadata"]["name"] for d in docs]
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kube_version} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
