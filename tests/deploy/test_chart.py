"""Tests of the Helm chart `charts/atlasflow`, without a cluster.

`helm lint --strict` and `helm template` run the real Helm 4 binary at `<repo>/.tools/helm`
(installed by `scripts/bootstrap.sh --test`; the tests FAIL without it). Every rendered
document is validated against the Kubernetes 1.35 JSON schemas of `kubernetes-validate` in
strict mode (unknown fields are errors), except custom resources (CRD_KINDS: the Prometheus
Operator's ServiceMonitor, for which kubernetes-validate has no schema; test_chart_triton.py
checks it structurally). The chart is rendered once per values set per module.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "atlasflow"
HELM = REPO / ".tools" / "helm"
KUBE_VERSION = "1.35.0"
# Custom resources kubernetes-validate has no schema for (SchemaNotFoundError).
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
RELEASE = "af"
NAMESPACE = "atlas"

# The service contract (ports of each component's container; see deploy/README.md).
GRPC_PORTS = {"ingest": 50051, "segmentation": 50052, "ranking": 50053, "labels": 50054}
ATLASFLOW = tuple(GRPC_PORTS)
COMPONENTS = (*ATLASFLOW, "triton")
# Components with state on a PersistentVolumeClaim of their own (DATA_DIR).
STATEFUL = ATLASFLOW
# Components that mount the shared blob store at BLOB_DIR.
BLOB_USERS = ("ingest", "segmentation", "labels")
CONTAINER_PORTS = {
    "ingest": {"grpc": 50051, "dicom": 11112, "metrics": 9464},
    "segmentation": {"grpc": 50052, "metrics": 9464},
    "ranking": {"grpc": 50053, "metrics": 9464},
    "labels": {"grpc": 50054, "metrics": 9464},
    # Triton's HTTP binds 127.0.0.1 (in-pod exec probes): no HTTP port on the pod or Service
    "triton": {"grpc": 8001, "metrics": 8002},
}

# The values every render needs: the services refuse to start without a token issuer (docs/security.md).
AUTH_ISSUER = "https://keycloak.example/realms/radiology"
AUTH_JWKS = "https://keycloak.example/realms/radiology/protocol/openid-connect/certs"
AUTH_SECRET = "atlasflow-service-token"
AUTH_ARGS = (
    "--set",
    f"auth.issuer={AUTH_ISSUER}",
    "--set",
    f"auth.jwksUrl={AUTH_JWKS}",
    "--set",
    f"auth.serviceToken.existingSecret={AUTH_SECRET}",
)

# A values file that switches every optional branch of the templates the other way.
ALTERNATIVE_VALUES: dict[str, Any] = {
    "fullnameOverride": "atlas",
    "global": {"storageClass": "fast-ssd", "imagePullSecrets": [{"name": "regcred"}]},
    "image": {"tag": "0.2.0-rc1"},
    "otel": {"endpoint": "", "resourceAttributes": {"deployment.environment": "staging"}},
    "config": {"env": {"ATLASFLOW_FEATURE_X": "on"}},
    "metrics": {"podAnnotations": False, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "networkPolicy": {"enabled": False},
    "auth": {
        "audience": "atlasflow-prod",
        "roleClaim": "realm_access.roles",
        "algorithms": ["RS256"],
        "serviceToken": {"key": "access-token"},
    },
    "blobs": {"persistence": {"existingClaim": "shared-blobs"}},
    "ingest": {
        "acceptedCallingAETs": ["PACS1", "PACS2"],
        "dicom": {
            "service": {
                "type": "LoadBalancer",
                "nodePort": 31112,
                "loadBalancerSourceRanges": ["10.20.0.0/16"],
                "externalTrafficPolicy": "Local",
                "annotations": {"example.com/lb": "internal"},
            }
        },
        "persistence": {"storageClass": "-"},
        "extraEnv": [{"name": "ATLASFLOW_INGEST_QUIET_PERIOD_S", "value": "2.5"}],
        "nodeSelector": {"pool": "io"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "io", "effect": "NoSchedule"}],
        "priorityClassName": "high",
        "podAnnotations": {"example.com/team": "imaging"},
        "podLabels": {"team": "imaging"},
    },
    "ranking": {"persistence": {"enabled": False}},
    "labels": {"exports": {"persistence": {"enabled": False}}},
    "segmentation": {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cpu"]}]}]
                }
            }
        }
    },
    "triton": {
        "gpu": 0,
        "replicas": 2,
        # a pre-populated read-only volume: no initContainer, several replicas may share it
        "modelRepository": {"populate": False, "persistence": {"enabled": True}},
        "tracing": {"enabled": True},
        "extraArgs": ["--log-verbose=1"],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


# ----------------------------------------------------------------------------- helpers


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the repository's Helm binary; fail (never skip) when it is missing."""
    if not HELM.is_file():
        pytest.fail(f"helm not found at {HELM}: run scripts/bootstrap.sh --test")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, check=False)


def render(*extra: str) -> list[dict[str, Any]]:
    """`helm template` the chart with the required auth values (AUTH_ARGS; `extra` may override
    them with later --set); return the non-empty documents."""
    proc = helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *AUTH_ARGS, *extra
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, "helm template rendered nothing"
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{len(found)} Deployments for component {component}"
    return found[0]


def main_container(dep: dict[str, Any]) -> dict[str, Any]:
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per pod expected"
    return containers[0]


def all_containers(dep: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = dep["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def volume(dep: dict[str, Any], name: str) -> dict[str, Any]:
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert name in vols, f"volume {name!r} missing; have {sorted(vols)}"
    return vols[name]


def mount_path(container: dict[str, Any], name: str) -> str:
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    assert name in mounts, f"volumeMount {name!r} missing; have {sorted(mounts)}"
    return mounts[name]


def checksums(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {c: deployment(docs, c)["spec"]["template"]["metadata"]["annotations"]["checksum/config"] for c in ATLASFLOW}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def alt_values_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "alternative.yaml"
    path.write_text(yaml.safe_dump(ALTERNATIVE_VALUES))
    return path


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def alt_docs(alt_values_file: Path) -> list[dict[str, Any]]:
    return render("-f", str(alt_values_file))


@pytest.fixture(scope="module", params=["defaults", "alternative"])
def any_docs(
    request: pytest.FixtureRequest, docs: list[dict[str, Any]], alt_docs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    return docs if request.param == "defaults" else alt_docs


# ----------------------------------------------------------------------------- lint + schema


def test_helm_lint_strict(alt_values_file: Path) -> None:
    for extra in ((), ("-f", str(alt_values_file))):
        proc = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *AUTH_ARGS, *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0 chart(s) failed" in proc.stdout


def test_every_document_validates_against_kubernetes_schema(any_docs: list[dict[str, Any]]) -> None:
    assert kubernetes_validate.utils.major_minor(KUBE_VERSION) <= kubernetes_validate.latest_version()
    errors = []
    for doc in any_docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except Exception as exc:  # ValidationError / SchemaNotFoundError: collect them all
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not errors, "\n".join(errors)


def test_rendered_object_inventory(docs: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 5
    assert kinds.count("ConfigMap") == 1
    assert kinds.count("ServiceAccount") == 1
    # data PVC per stateful component + blobs + label exports
    assert kinds.count("PersistentVolumeClaim") == len(STATEFUL) + 2
    # one per component + the DICOM-only Service of ingest + Triton's headless Service
    assert kinds.count("Service") == len(COMPONENTS) + 2
    for doc in docs:
        meta = doc["metadata"]
        assert meta["namespace"] == NAMESPACE, meta["name"]
        assert meta["name"].startswith(f"{RELEASE}-atlasflow"), meta["name"]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "atlasflow"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "atlasflow"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (("--set", "ingest.replicas=2"), "'/ingest/replicas': maximum: got 2, want 1"),
        (("--set", "image.tag=latest"), "/image/tag"),
        (("--set", "triton.image.tag=latest"), "/triton/image/tag"),
        (("--set", "triton.gpu=-1"), "/triton/gpu"),
        (("--set", "ingest.dicom.service.type=Ingress"), "/ingest/dicom/service/type"),
        (("--set", "ingest.aeTitle=AN_AE_TITLE_TOO_LONG"), "/ingest/aeTitle"),
        (("--set", "ranking.grpc.port=70000"), "/ranking/grpc/port"),
        (("--set", "labels.persistence.size=lots"), "/labels/persistence/size"),
        (("--set", "segmentation.resources=null"), "segmentation"),
        (("--set", "auth.algorithms={HS256}"), "/auth/algorithms"),
        (("--set", "auth.jwksUrl=ftp://keys.example/jwks"), "/auth/jwksUrl"),
        (("--set", "auth.serviceToken.key=a/b"), "/auth/serviceToken/key"),
        (("--set", "auth.issuer=null"), "issuer"),
    ],
)
def test_values_schema_rejects(override: tuple[str, str], message: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *AUTH_ARGS, *override)
    assert proc.returncode != 0, f"{override} was accepted"
    assert message in proc.stderr, proc.stderr


def test_triton_disabled_requires_an_external_url() -> None:
    proc = helm("template", RELEASE, str(CHART), *AUTH_ARGS, "--set", "triton.enabled=false")
    assert proc.returncode != 0 and "segmentation.tritonUrl" in proc.stderr, proc.stderr
    docs = render("--set", "triton.enabled=false", "--set", "segmentation.tritonUrl=triton.gpu.svc:8001")
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "triton"]
    env = literal_env(main_container(deployment(docs, "segmentation")))
    assert env["ATLASFLOW_SEGMENTATION_TRITON_URL"] == "triton.gpu.svc:8001"


# ----------------------------------------------------------------------------- per Deployment


@pytest.mark.parametrize("component", ATLASFLOW)
def test_grpc_probes_on_grpc_port(docs: list[dict[str, Any]], component: str) -> None:
    container = main_container(deployment(docs, component))
    port = GRPC_PORTS[component]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["grpc"] == port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": port}, probe
        assert "httpGet" not in container[probe] and "exec" not in container[probe]
    assert container["livenessProbe"]["periodSeconds"] >= container["readinessProbe"]["periodSeconds"]


def test_triton_http_probes_and_startup(docs: list[dict[str, Any]]) -> None:
    container = main_container(deployment(docs, "triton"))
    # exec probes against the loopback HTTP endpoint (it binds 127.0.0.1; test_chart_triton.py runs them)
    assert "--http-address=127.0.0.1" in container["args"]
    assert "127.0.0.1:8000/v2/health/ready" in container["readinessProbe"]["exec"]["command"][2]
    assert "127.0.0.1:8000/v2/health/live" in container["livenessProbe"]["exec"]["command"][2]
    startup = container["startupProbe"]
    assert "127.0.0.1:8000/v2/health/ready" in startup["exec"]["command"][2]
    # Model loading: at least 5 minutes before the liveness probe may restart the container.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert container["command"] == ["tritonserver"]
    assert "--model-repository=/models" in container["args"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {f"--{n}-port={named[n]}" for n in ("grpc", "metrics")} | {"--http-port=8000"} <= set(container["args"])
    # /dev/shm for the Python backend is a memory-backed emptyDir
    assert mount_path(container, "dshm") == "/dev/shm"
    assert volume(deployment(docs, "triton"), "dshm")["emptyDir"]["medium"] == "Memory"


def test_triton_gpu_configurable(docs: list[dict[str, Any]], alt_docs: list[dict[str, Any]]) -> None:
    gpu = main_container(deployment(docs, "triton"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--allow-gpu-metrics=true" in gpu["args"]
    cpu = main_container(deployment(alt_docs, "triton"))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu["resources"].get("requests", {})
    assert literal_env(cpu)["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "--allow-gpu-metrics=false" in cpu["args"]
    assert deployment(alt_docs, "triton")["spec"]["replicas"] == 2
    # model repository volume mounted read-only over the baked-in one
    assert mount_path(cpu, "models") == "/models"
    claim = volume(deployment(alt_docs, "triton"), "models")["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind(alt_docs, "PersistentVolumeClaim")
    assert any(a.startswith("--trace-config=mode=opentelemetry") for a in cpu["args"])
    assert cpu["args"][-1] == "--log-verbose=1"


@pytest.mark.parametrize("component", COMPONENTS)
def test_hardened_security_context(any_docs: list[dict[str, Any]], component: str) -> None:
    dep = deployment(any_docs, component)
    pod = dep["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001 and psc["runAsGroup"] == 10001 and psc["fsGroup"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod.get("hostNetwork", False) is False and pod.get("hostPID", False) is False
    for container in all_containers(dep):
        csc = container["securityContext"]
        assert csc["runAsNonRoot"] is True
        assert csc["runAsUser"] == 10001
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["allowPrivilegeEscalation"] is False
        assert csc.get("privileged", False) is False
        assert csc["capabilities"] == {"drop": ["ALL"]}
        assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
        # read-only root filesystem: /tmp is a writable emptyDir
        assert mount_path(container, "tmp") == "/tmp"
    assert "emptyDir" in volume(dep, "tmp")


def test_service_account_token_not_mounted(docs: list[dict[str, Any]]) -> None:
    (sa,) = by_kind(docs, "ServiceAccount").values()
    assert sa["automountServiceAccountToken"] is False
    for component in COMPONENTS:
        assert deployment(docs, component)["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_resources_requested_and_limited(any_docs: list[dict[str, Any]], component: str) -> None:
    for container in all_containers(deployment(any_docs, component)):
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), (component, kind, resources)


@pytest.mark.parametrize("component", COMPONENTS)
def test_images_pinned(any_docs: list[dict[str, Any]], component: str) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    alternative = deployment(any_docs, component)["metadata"]["name"].startswith("atlas-")
    expected_tag = ALTERNATIVE_VALUES["image"]["tag"] if alternative else chart["appVersion"]
    for container in all_containers(deployment(any_docs, component)):
        image = container["image"]
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image} has no tag"
        assert tag != "latest", image
        assert tag == expected_tag, image
        # Triton's model-repository initContainer runs the segmentation image's CLI
        expected = "segmentation" if container["name"] == "model-repository" else component
        assert name.endswith(f"atlasflow/{expected}"), image


@pytest.mark.parametrize("component", STATEFUL)
def test_stateful_single_replica_recreate(any_docs: list[dict[str, Any]], component: str) -> None:
    spec = deployment(any_docs, component)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("component", STATEFUL)
def test_data_pvc_exists_and_is_mounted_at_data_dir(docs: list[dict[str, Any]], component: str) -> None:
    dep = deployment(docs, component)
    container = main_container(dep)
    claim = volume(dep, "data")["persistentVolumeClaim"]["claimName"]
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    assert claim in pvcs, f"{component} mounts missing PVC {claim}"
    pvc = pvcs[claim]
    assert pvc["metadata"]["labels"]["app.kubernetes.io/component"] == component
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    data_dir = literal_env(container)[f"ATLASFLOW_{component.upper()}_DATA_DIR"]
    assert mount_path(container, "data") == data_dir


@pytest.mark.parametrize("component", BLOB_USERS)
def test_shared_blobs_pvc_mounted_at_blob_dir(docs: list[dict[str, Any]], component: str) -> None:
    dep = deployment(docs, component)
    container = main_container(dep)
    claim = volume(dep, "blobs")["persistentVolumeClaim"]["claimName"]
    assert claim == f"{RELEASE}-atlasflow-blobs"
    pvc = by_kind(docs, "PersistentVolumeClaim")[claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert mount_path(container, "blobs") == literal_env(container)[f"ATLASFLOW_{component.upper()}_BLOB_DIR"]


def test_labels_exports_volume(docs: list[dict[str, Any]], alt_docs: list[dict[str, Any]]) -> None:
    dep = deployment(docs, "labels")
    container = main_container(dep)
    claim = volume(dep, "exports")["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind(docs, "PersistentVolumeClaim")
    assert mount_path(container, "exports") == literal_env(container)["ATLASFLOW_LABELS_EXPORT_DIR"]
    # persistence disabled: an emptyDir, and no PVC rendered for it
    alt = deployment(alt_docs, "labels")
    assert "emptyDir" in volume(alt, "exports")
    assert not [n for n in by_kind(alt_docs, "PersistentVolumeClaim") if n.endswith("-exports")]


def test_persistence_options(alt_docs: list[dict[str, Any]]) -> None:
    pvcs = by_kind(alt_docs, "PersistentVolumeClaim")
    # existingClaim: no PVC rendered, the pods use the named claim
    assert "atlas-blobs" not in pvcs
    for component in BLOB_USERS:
        assert volume(deployment(alt_docs, component), "blobs")["persistentVolumeClaim"]["claimName"] == "shared-blobs"
    # storageClass "-" -> "" (static provisioning); "" -> global.storageClass
    assert pvcs["atlas-ingest-data"]["spec"]["storageClassName"] == ""
    assert pvcs["atlas-segmentation-data"]["spec"]["storageClassName"] == "fast-ssd"
    # persistence disabled -> emptyDir
    assert "atlas-ranking-data" not in pvcs
    assert "emptyDir" in volume(deployment(alt_docs, "ranking"), "data")


# ----------------------------------------------------------------------------- Services


@pytest.mark.parametrize("component", COMPONENTS)
def test_cluster_ip_service_with_named_ports(any_docs: list[dict[str, Any]], component: str) -> None:
    dep = deployment(any_docs, component)
    services = by_kind(any_docs, "Service")
    name = dep["metadata"]["name"]
    svc = services[name]
    assert svc["spec"]["type"] == "ClusterIP"
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    container_ports = {p["name"]: p["containerPort"] for p in main_container(dep)["ports"]}
    assert container_ports == CONTAINER_PORTS[component]
    svc_ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert svc_ports == {n: (p, n) for n, p in CONTAINER_PORTS[component].items()}


def test_ingest_dicom_service_exposable(docs: list[dict[str, Any]], alt_docs: list[dict[str, Any]]) -> None:
    default = by_kind(docs, "Service")[f"{RELEASE}-atlasflow-ingest-dicom"]
    assert default["spec"]["type"] == "ClusterIP"
    assert [p["name"] for p in default["spec"]["ports"]] == ["dicom"]
    exposed = by_kind(alt_docs, "Service")["atlas-ingest-dicom"]
    assert exposed["spec"]["type"] == "LoadBalancer"
    assert exposed["spec"]["loadBalancerSourceRanges"] == ["10.20.0.0/16"]
    assert exposed["spec"]["externalTrafficPolicy"] == "Local"
    assert exposed["spec"]["ports"] == [
        {"name": "dicom", "port": 11112, "targetPort": "dicom", "protocol": "TCP", "nodePort": 31112}
    ]
    assert exposed["metadata"]["annotations"] == {"example.com/lb": "internal"}
    # only DICOM is exposed: the main ingest Service stays ClusterIP
    assert by_kind(alt_docs, "Service")["atlas-ingest"]["spec"]["type"] == "ClusterIP"


# ----------------------------------------------------------------------------- env contract


@pytest.mark.parametrize("component", ATLASFLOW)
def test_otel_and_common_config(docs: list[dict[str, Any]], component: str) -> None:
    container = main_container(deployment(docs, component))
    env = literal_env(container)
    assert env["OTEL_SERVICE_NAME"] == f"atlasflow-{component}"
    assert "k8s.pod.name=$(K8S_POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]
    names = [e["name"] for e in container["env"]]
    # $(VAR) references only expand variables defined earlier in the list
    assert names.index("K8S_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    (ref,) = container["envFrom"]
    config = by_kind(docs, "ConfigMap")[ref["configMapRef"]["name"]]
    assert config["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
    for key in ("OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_PROPAGATORS"):
        assert config["data"][key]
    assert all(isinstance(v, str) for v in config["data"].values())


def test_alternative_config_values(alt_docs: list[dict[str, Any]]) -> None:
    (config,) = by_kind(alt_docs, "ConfigMap").values()
    assert config["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""
    assert config["data"]["ATLASFLOW_FEATURE_X"] == "on"
    ingest = deployment(alt_docs, "ingest")
    env = literal_env(main_container(ingest))
    assert env["OTEL_RESOURCE_ATTRIBUTES"].endswith(",deployment.environment=staging")
    assert env["ATLASFLOW_INGEST_ACCEPTED_CALLING_AETS"] == "PACS1,PACS2"
    assert env["ATLASFLOW_INGEST_QUIET_PERIOD_S"] == "2.5"
    pod = ingest["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "imaging"
    assert pod["metadata"]["annotations"]["example.com/team"] == "imaging"
    assert "prometheus.io/scrape" not in pod["metadata"]["annotations"]
    assert pod["spec"]["nodeSelector"] == {"pool": "io"}
    assert pod["spec"]["priorityClassName"] == "high"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


@pytest.mark.parametrize("component", ATLASFLOW)
def test_env_matches_service_settings(docs: list[dict[str, Any]], component: str) -> None:
    """Every ATLASFLOW_<COMPONENT>_* variable the chart sets is a field of that service's
    settings class, parses with it, and the parsed settings match the pod (ports, volumes,
    Service addresses of the peers)."""
    from atlasflow.common.settings import ServiceSettings

    module = importlib.import_module(f"atlasflow.{component}.settings")
    prefix = f"ATLASFLOW_{component.upper()}_"
    assert module.PREFIX == prefix
    (cls,) = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, ServiceSettings) and v is not ServiceSettings
    ]
    fields = {f.name.upper() for f in dataclasses.fields(cls)}
    dep = deployment(docs, component)
    container = main_container(dep)
    env = literal_env(container)
    unknown = sorted(k for k in env if k.startswith(prefix) and k[len(prefix) :] not in fields)
    assert not unknown, f"{cls.__name__} has no field for {unknown}"

    settings = cls.from_env(prefix, env)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.grpc_host == "0.0.0.0"  # reachable by the kubelet's probes and other pods
    assert settings.grpc_port == ports["grpc"] == GRPC_PORTS[component]
    assert settings.metrics_port == ports["metrics"]
    assert settings.data_dir == mount_path(container, "data")
    assert 0 < settings.shutdown_grace_s < dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    if component in BLOB_USERS:
        assert settings.blob_dir == mount_path(container, "blobs")
    services = by_kind(docs, "Service")
    for field in dataclasses.fields(cls):
        if field.name.endswith("_target") or field.name == "triton_url":
            value = getattr(settings, field.name)
            if field.name == "triton_url":  # dns:///<Triton's headless Service>.<namespace>.svc:<port>
                value = value.removeprefix("dns:///").replace(f".{NAMESPACE}.svc:", ":")
            host, _, port = value.rpartition(":")
            assert host in services, f"{field.name}={host} is no Service of the release"
            assert int(port) == {p["name"]: p["port"] for p in services[host]["spec"]["ports"]}["grpc"]
    if component == "ingest":
        assert settings.dicom_host == "0.0.0.0"
        assert settings.dicom_port == ports["dicom"]


# ----------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("component", ATLASFLOW)
def test_auth_env_and_service_token_file(any_docs: list[dict[str, Any]], component: str) -> None:
    """Every service gets the token check settings and the file of its own token: the Secret
    mounted read-only (a directory, so the kubelet refreshes the file) at TOKEN_FILE's folder;
    the token is never an env value or an argument."""
    from atlasflow.common.settings import ServiceSettings

    dep = deployment(any_docs, component)
    alternative = dep["metadata"]["name"].startswith("atlas-")
    auth = ALTERNATIVE_VALUES["auth"] if alternative else {}
    key = auth.get("serviceToken", {}).get("key", "token")
    container = main_container(dep)
    env = literal_env(container)
    prefix = f"ATLASFLOW_{component.upper()}_"
    assert env[prefix + "AUTH_ISSUER"] == AUTH_ISSUER
    assert env[prefix + "AUTH_JWKS"] == AUTH_JWKS
    assert env[prefix + "AUTH_AUDIENCE"] == auth.get("audience", "atlasflow")
    assert env[prefix + "AUTH_ROLE_CLAIM"] == auth.get("roleClaim", "roles")
    assert env[prefix + "AUTH_ALGORITHMS"] == ",".join(auth.get("algorithms", ["RS256", "ES256"]))
    assert prefix + "AUTH_DISABLED" not in env
    token_file = env[prefix + "TOKEN_FILE"]
    assert token_file.startswith("/") and token_file.rsplit("/", 1)[1] == key

    # the settings the service parses: a verifier can be built (no AUTH_NOT_CONFIGURED)
    settings = ServiceSettings.from_env(prefix, {k: v for k, v in env.items() if k.startswith(prefix + "AUTH_")})
    assert settings.auth_algorithms == tuple(auth.get("algorithms", ["RS256", "ES256"]))
    assert settings.verifier() is not None

    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "service-token"]
    assert mount["readOnly"] is True and "subPath" not in mount
    assert token_file == f"{mount['mountPath']}/{key}"
    secret = volume(dep, "service-token")["secret"]
    assert secret["secretName"] == AUTH_SECRET
    assert secret["items"] == [{"key": key, "path": key}]
    assert secret["defaultMode"] == 0o440
    # secrets as files only
    for c in all_containers(dep):
        for e in c.get("env", []):
            assert "secretKeyRef" not in e.get("valueFrom", {}), e
        assert not any(AUTH_SECRET in a for a in c.get("args", []) + c.get("command", []))


@pytest.mark.parametrize(
    ("unset", "message"),
    [
        ("auth.issuer", "auth.issuer is required"),
        ("auth.jwksUrl", "auth.jwksUrl is required"),
        ("auth.serviceToken.existingSecret", "auth.serviceToken.existingSecret is required"),
    ],
)
def test_rendering_without_auth_fails(unset: str, message: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *AUTH_ARGS, "--set", f"{unset}=")
    assert proc.returncode != 0, f"rendered without {unset}"
    assert message in proc.stderr and "docs/security.md" in proc.stderr, proc.stderr
    # the chart's defaults alone do not render either
    bare = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION)
    assert bare.returncode != 0 and "is required" in bare.stderr, bare.stderr


def test_auth_change_rolls_pods(docs: list[dict[str, Any]]) -> None:
    before = {c: deployment(docs, c)["spec"]["template"] for c in ATLASFLOW}
    changed = render("--set", "auth.issuer=https://other.example/realms/r")
    for c in ATLASFLOW:
        assert deployment(changed, c)["spec"]["template"] != before[c], c


# ----------------------------------------------------------------------------- config checksum


def test_config_change_rolls_pods(docs: list[dict[str, Any]]) -> None:
    before = checksums(docs)
    assert all(len(v) == 64 for v in before.values())
    assert len(set(before.values())) == 1, "every atlasflow pod hashes the same ConfigMap"
    # same values -> same checksum (no spurious rollouts); a non-ConfigMap change -> same checksum
    assert checksums(render()) == before
    assert checksums(render("--set", "ranking.resources.limits.cpu=3")) == before
    changed = render("--set", "otel.endpoint=http://other-collector:4317")
    (config,) = by_kind(changed, "ConfigMap").values()
    assert config["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://other-collector:4317"
    after = checksums(changed)
    assert all(after[c] != before[c] for c in ATLASFLOW), (before, after)
    extra = checksums(render("--set", "config.env.ATLASFLOW_X=1"))
    assert all(extra[c] not in (before[c], after[c]) for c in ATLASFLOW)


def test_schema_file_is_valid_json_schema() -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    assert schema["additionalProperties"] is False
