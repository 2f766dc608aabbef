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
    mount_path,
    render,
    volume,
)
from test_chart_triton import admits

from atlasflow.segmentation.settings import PREFIX as SEG_PREFIX
from atlasflow.segmentation.settings import SegmentationSettings
from atlasflow.training.jobs_k8s import build_job
from atlasflow.training.k8s_runner import job_settings
from atlasflow.training.rollout import TritonRepositoryRollout, build_rollout, rollout_mode
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


def _settings(container: dict[str, Any], cls: Any = TrainingSettings, prefix: str = PREFIX) -> Any:
    env = literal_env(container)
    env = {k: v for k, v in env.items() if k.startswith(prefix)}
    import os

    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return cls.from_env(prefix)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_training_deployment(docs: list[dict[str, Any]]) -> None:
    dep = deployment(docs, "training")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    # no automount: the training container alone mounts the API token (a bound, renewed token,
    # the cluster CA, the namespace: what the in-cluster client reads)
    assert pod["serviceAccountName"] == NAME and pod["automountServiceAccountToken"] is False
    c = main_container(dep)
    assert mount_path(c, "kube-api-access") == "/var/run/secrets/kubernetes.io/serviceaccount"
    sources = volume(dep, "kube-api-access")["projected"]["sources"]
    assert sources[0]["serviceAccountToken"] == {"path": "token", "expirationSeconds": 3600}
    assert sources[1]["configMap"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert sources[2]["downwardAPI"]["items"][0]["path"] == "namespace"
    assert by_kind(docs, "ServiceAccount")[NAME]["automountServiceAccountToken"] is False
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
    assert "kube-api-access" not in {v["name"] for v in pod["volumes"]}
    assert not [n for n in by_kind(docs, "Role") if "training" in n]
    assert not [k for k in literal_env(pod["containers"][0]) if "_JOB_" in k]


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("--set", "training.replicas=2"), "/training/replicas"),
        (("--set", "training.runner=slurm"), "/training/runner"),
        (("--set", "training.persistence.enabled=false"), "/training/persistence/enabled"),
        # the embedded stack's PyTriton activation does not exist in the cluster
        (("--set", "training.rollout.mode=segmentation"), "/training/rollout/mode"),
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


# ------------------------------------------------------------------ roll-out of a promoted version

# Triton's model repository on a ReadWriteMany PVC that the training pod writes too (populate
# rewrites the base ensembles at Triton's start: one replica, Recreate).
ROLLOUT = (
    "--set",
    "triton.modelRepository.persistence.enabled=true",
    "--set-json",
    'triton.modelRepository.persistence.accessModes=["ReadWriteMany"]',
    "--set",
    "triton.strategy.type=Recreate",  # the default's rollingUpdate is dropped (the API refuses both)
)
TLS = ("--set", "tls.enabled=true", "--set", "tls.existingSecret=atlasflow-tls")
PODS = ("ingest", "segmentation", "ranking", "labels", "triton", "training")


def _mounts(container: dict[str, Any], pod: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """mount path -> (PVC claim, read-only) of the container's PVC-backed mounts."""
    vols = {v["name"]: v for v in pod["volumes"]}
    return {
        m["mountPath"]: (vols[m["name"]]["persistentVolumeClaim"]["claimName"], bool(m.get("readOnly")))
        for m in container["volumeMounts"]
        if "persistentVolumeClaim" in vols[m["name"]]
    }


def _grpc_calls(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(caller, callee) of every host:port value in the rendered env that names a gRPC port."""
    services = by_kind(docs, "Service")
    out = set()
    for caller in PODS:
        for value in literal_env(main_container(deployment(docs, caller))).values():
            # dns:///<service>.<namespace>.svc:<port>: Triton's headless Service (round-robin)
            host, _, port = value.removeprefix("dns:///").replace(f".{NAMESPACE}.svc:", ":").partition(":")
            if host in services and port.isdigit():
                svc = services[host]
                (target,) = [p["targetPort"] for p in svc["spec"]["ports"] if p["port"] == int(port)]
                if target == "grpc":
                    out.add((caller, svc["spec"]["selector"]["app.kubernetes.io/component"]))
    return out


def _admitted(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    policies = list(by_kind(docs, "NetworkPolicy").values())
    labels = {c: deployment(docs, c)["spec"]["template"]["metadata"]["labels"] for c in PODS}
    return {
        (src, dst)
        for src in PODS
        for dst in PODS
        if src != dst
        and admits(
            policies, {"labels": labels[src], "namespace": NAMESPACE, "namespace_labels": {}}, labels[dst], "grpc"
        )
    }


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mtls"])
def test_cluster_rollout_triton_repository(tls: bool) -> None:
    """auto -> triton-repository: the env parses into the product's roll-out (repository load on
    the PVC Triton serves, then segmentation's activation and the re-inference), segmentation
    activates in repository mode from the training state, read-only; the policies admit exactly
    the calls the env makes."""
    docs = render(*TRAINING, *ROLLOUT, *(TLS if tls else ()))
    dep = deployment(docs, "training")
    pod, c = dep["spec"]["template"]["spec"], main_container(dep)
    settings = _settings(c)
    assert rollout_mode(settings) == "triton-repository"
    # every Triton replica: the headless Service, round-robin (test_chart_triton.py)
    assert settings.triton_url == f"dns:///{RELEASE}-atlasflow-triton-headless.{NAMESPACE}.svc:8001"
    assert settings.segmentation_target == f"{RELEASE}-atlasflow-segmentation:50052"
    assert settings.ranking_target == f"{RELEASE}-atlasflow-ranking:50053"
    assert settings.triton_unload_previous is False
    models_claim = f"{RELEASE}-atlasflow-triton-models"
    assert _mounts(c, pod)[settings.triton_model_repository] == (models_claim, False)
    triton = deployment(docs, "triton")
    assert triton["spec"]["strategy"] == {"type": "Recreate"}
    assert (models_claim, True) in _mounts(main_container(triton), triton["spec"]["template"]["spec"]).values()
    # what app.py builds from these settings: the repository load, then the activation
    rollout = build_rollout(settings, lambda: pytest.fail("not called while building"))
    assert rollout.__name__ == "load_then_activate"
    (repo,) = [
        cell.cell_contents for cell in rollout.__closure__ if isinstance(cell.cell_contents, TritonRepositoryRollout)
    ]
    assert str(repo.repository) == settings.triton_model_repository and repo.unload_previous is False
    if tls:
        tls_dir = "/var/run/secrets/atlasflow/tls"
        assert (repo.tls.ca_file, repo.tls.cert_file, repo.tls.key_file) == (
            f"{tls_dir}/ca.crt",
            f"{tls_dir}/tls.crt",
            f"{tls_dir}/tls.key",
        )
        assert any(m["mountPath"] == tls_dir for m in c["volumeMounts"]) and not repo.allow_plaintext
        assert settings.client_tls().ca_file == f"{tls_dir}/ca.crt"  # to segmentation and ranking
    else:
        assert repo.allow_plaintext
    assert settings.token_file  # its service token, as every other caller
    # segmentation: repository activation from the training state volume, read-only
    seg = deployment(docs, "segmentation")
    seg_settings = _settings(main_container(seg), SegmentationSettings, SEG_PREFIX)
    assert seg_settings.activation == "repository"
    root = seg_settings.versions_dir.rsplit("/versions", 1)[0]
    assert _mounts(main_container(seg), seg["spec"]["template"]["spec"])[root] == (f"{NAME}-data", True)
    # NetworkPolicies: exactly the gRPC calls the rendered env makes
    calls = _grpc_calls(docs)
    assert {
        ("training", "segmentation"),
        ("training", "ranking"),
        ("training", "triton"),
        ("training", "labels"),
    } <= calls
    assert _admitted(docs) == calls
    if tls:
        for doc in docs:
            if doc["kind"] in ("Deployment", "NetworkPolicy"):
                kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_pointer_without_a_shared_repository(docs: list[dict[str, Any]]) -> None:
    """auto with Triton's emptyDir repository -> pointer: no Triton, segmentation or ranking
    target, segmentation keeps its own activation, the policies admit training to labels (and
    Triton, as before) only."""
    settings = _settings(main_container(deployment(docs, "training")))
    assert rollout_mode(settings) == "pointer" and settings.rollout == "pointer"
    assert not (settings.triton_url or settings.segmentation_target or settings.ranking_target)
    seg_env = literal_env(main_container(deployment(docs, "segmentation")))
    assert "ATLASFLOW_SEGMENTATION_VERSIONS_DIR" not in seg_env and "ATLASFLOW_SEGMENTATION_ACTIVATION" not in seg_env
    admitted = {(s, d) for s, d in _admitted(docs) if s == "training"}
    assert admitted == {("training", "labels"), ("training", "triton")}
    assert _grpc_calls(docs) >= {("training", "labels")}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "training.rollout.mode=triton-repository"), "triton.modelRepository.persistence.enabled"),
        (
            (
                "--set",
                "training.rollout.mode=triton-repository",
                "--set",
                "triton.modelRepository.persistence.enabled=true",
                "--set-json",
                'triton.strategy={"type":"Recreate"}',
                "--set-json",
                'triton.modelRepository.persistence.accessModes=["ReadWriteOnce"]',
            ),
            "must include ReadWriteMany",
        ),
    ],
)
def test_triton_repository_rollout_needs_a_shared_repository(args: tuple[str, ...], message: str) -> None:
    proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, *TRAINING, *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_rollout_lint_strict_and_byte_stable() -> None:
    proc = helm("lint", "--strict", str(CHART), *AUTH_ARGS, *TRAINING, *ROLLOUT, *TLS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = ("template", RELEASE, str(CHART), *AUTH_ARGS, *TRAINING, *ROLLOUT, *TLS)
    first, second = helm(*args), helm(*args)
    assert first.returncode == 0 and first.stdout == second.stdout


def test_cert_manager_issues_trainings_certificate() -> None:
    """With cert-manager TLS the training pod's TLS Secret (server + the client identity it
    presents to labels, segmentation, ranking and Triton) is one the release's Certificate
    writes, naming training's Service, for server and client auth."""
    docs = render(
        *TRAINING,
        *ROLLOUT,
        "--set",
        "tls.enabled=true",
        "--set",
        "tls.certManager.enabled=true",
        "--set",
        "tls.certManager.issuerRef.name=atlasflow-ca",
    )
    pod = deployment(docs, "training")["spec"]["template"]["spec"]
    (secret,) = [v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "tls"]
    cert = by_kind(docs, "Certificate")[NAME]["spec"]
    assert cert["secretName"] == secret and NAME in cert["dnsNames"]
    assert {"server auth", "client auth"} <= set(cert["usages"])
    assert cert["uris"] == ["spiffe://atlasflow/training"]


PG_URL = "postgresql://training:pw-7c1@db.example:5432/training"


@pytest.mark.parametrize(
    ("args", "secret", "key"),
    [
        (("--set", "training.database.existingSecret=training-pg"), "training-pg", "database-url"),
        (
            ("--set", "training.database.existingSecret=training-pg", "--set", "training.database.secretKey=url"),
            "training-pg",
            "url",
        ),
        (
            ("--set", "postgresql.enabled=true", "--set", "postgresql.auth.existingSecret=atlasflow-pg"),
            "atlasflow-pg",
            "training-database-url",
        ),
    ],
    ids=["existing-secret", "secret-key", "in-cluster-postgresql"],
)
def test_run_store_on_postgresql(args: tuple[str, ...], secret: str, key: str, tmp_path: Any) -> None:
    """training.database (or postgresql.enabled): the run store's URL is a file of the mounted
    Secret; the whole rendered env read back through TrainingSettings names that file and gives
    the PostgreSQL URL (the mount directory stood in by tmp_path). Still one replica, Recreate:
    the executor runs one training run at a time whatever the store."""
    dep = deployment(render(*TRAINING, *args), "training")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    c = main_container(dep)
    env = {k: v for k, v in literal_env(c).items() if k.startswith(PREFIX)}
    assert PREFIX + "DATABASE_URL" not in env
    path = env[PREFIX + "DATABASE_URL_FILE"]
    assert path == f"{mount_path(c, 'database-url')}/database-url"
    (source,) = volume(dep, "database-url")["projected"]["sources"]
    assert source["secret"] == {"name": secret, "items": [{"key": key, "path": "database-url"}]}
    (tmp_path / "database-url").write_text(PG_URL + "\n")
    settings = TrainingSettings.from_env(PREFIX, {**env, PREFIX + "DATABASE_URL_FILE": str(tmp_path / "database-url")})
    assert settings.database_url == PG_URL and "pw-7c1" not in repr(settings)
    assert settings.state_dir == "/state"  # the fine-tune Jobs' shared volume stays


def test_run_store_without_a_secret_is_sqlite_on_the_state_volume(docs: list[dict[str, Any]]) -> None:
    c = main_container(deployment(docs, "training"))
    settings = _settings(c)
    assert settings.database_url == "" and settings.data_dir == "/state/service"
    assert not any(m["name"] == "database-url" for m in c["volumeMounts"])


def test_triton_repository_rollout_with_imported_members() -> None:
    """segmentation.importedModels with the triton-repository roll-out: training gets the same
    members and registry (read-only, the same claim and path as segmentation's), read back
    through TrainingSettings into the roll-out the service builds; without members nothing of it."""
    members = (
        "--set", "segmentation.importedModels={tiny,bundle}",
        "--set", "segmentation.modelsRegistry.existingClaim=models-registry",
    )  # fmt: skip
    docs = render(*TRAINING, *ROLLOUT, *members)
    dep = deployment(docs, "training")
    pod, c = dep["spec"]["template"]["spec"], main_container(dep)
    settings = _settings(c)
    seg = deployment(docs, "segmentation")
    seg_settings = _settings(main_container(seg), SegmentationSettings, SEG_PREFIX)
    assert settings.imported_models == seg_settings.imported_models == "tiny,bundle"
    assert settings.models_state_dir == seg_settings.models_state_dir != ""
    assert _mounts(c, pod)[settings.models_state_dir] == ("models-registry", True)
    assert _mounts(main_container(seg), seg["spec"]["template"]["spec"])[settings.models_state_dir] == (
        "models-registry",
        True,
    )
    built = build_rollout(settings, None)  # what app.py builds (the repository load alone here)
    assert isinstance(built, TritonRepositoryRollout) and built.members == ("tiny", "bundle")
    assert str(built.models_state_dir) == settings.models_state_dir
    kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)
    # pointer roll-out with members: training mounts no registry
    pointer = deployment(render(*TRAINING, *members), "training")
    assert not _settings(main_container(pointer)).imported_models
    assert "models-registry" not in {v["name"] for v in pointer["spec"]["template"]["spec"]["volumes"]}
