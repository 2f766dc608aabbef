"""TLS in the Helm chart (docs/security.md "Transport", deploy/README.md): with tls.enabled every
atlasflow service gets its certificate from a Secret mounted read-only as a directory (the
kubelet's updates reach the files the service re-reads), mutual TLS by default, its peers
verified against the same CA, probes on the plaintext health-only port; cert-manager
Certificates name every Service the other components call; OTLP over TLS with a CA Secret.
Rendered by the real Helm binary, validated with kubernetes-validate (strict) except the
cert-manager Certificate (a custom resource, checked structurally here)."""

from __future__ import annotations

from pathlib import Path
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
    deployment,
    helm,
    literal_env,
    main_container,
    render,
    volume,
)

from atlasflow.common.settings import ServiceSettings
from atlasflow.segmentation.triton_client import target_name

ATLASFLOW = ("ingest", "segmentation", "ranking", "labels")
CERT_MANAGER = (
    "--set",
    "tls.enabled=true",
    "--set",
    "tls.certManager.enabled=true",
    "--set",
    "tls.certManager.issuerRef.name=atlasflow-ca",
    "--set",
    "tls.certManager.issuerRef.kind=ClusterIssuer",
)
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("cert-manager.io/v1", "Certificate")}


@pytest.fixture(scope="module")
def tls_docs() -> list[dict[str, Any]]:
    return render(*CERT_MANAGER, "--set", "otel.caSecret.name=collector-ca")


def _settings(dep: dict[str, Any], component: str) -> ServiceSettings:
    prefix = f"ATLASFLOW_{component.upper()}_"
    env = literal_env(main_container(dep))
    return ServiceSettings.from_env(
        prefix,
        {k: v for k, v in env.items() if k.startswith(prefix + "TLS_")}
        | {k: v for k, v in env.items() if k == prefix + "HEALTH_PORT"},
    )


def test_tls_renders_valid_objects(tls_docs: list[dict[str, Any]]) -> None:
    errors = []
    for doc in tls_docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except Exception as exc:  # ValidationError / SchemaNotFoundError: collect them all
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not errors, "\n".join(errors)
    proc = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *AUTH_ARGS, *CERT_MANAGER)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("component", ATLASFLOW)
def test_every_service_serves_and_calls_with_mounted_certificates(
    tls_docs: list[dict[str, Any]], component: str
) -> None:
    dep = deployment(tls_docs, component)
    container = main_container(dep)
    settings = _settings(dep, component)
    server = settings.server_tls()
    assert server is not None and server.mutual  # mutual TLS by default
    client = settings.client_tls()
    assert client.enabled and client.ca_file == server.client_ca_file
    assert (client.cert_file, client.key_file) == (server.cert_file, server.key_file)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True and "subPath" not in mount  # the kubelet updates a directory
    for path in (server.cert_file, server.key_file, server.client_ca_file):
        assert Path(path).parent == Path(mount["mountPath"])
    secret = volume(dep, "tls")["secret"]
    assert secret["secretName"] == f"{RELEASE}-atlasflow-{component}-tls"
    assert {i["path"] for i in secret["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    assert secret["defaultMode"] == 0o440
    # the kubelet's gRPC probe speaks no TLS: the plaintext health-only port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.health_port == ports["health"] != ports["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe


def test_cert_manager_certificates_name_the_services_their_callers_dial(tls_docs: list[dict[str, Any]]) -> None:
    certs = by_kind(tls_docs, "Certificate")
    assert len(certs) == len(ATLASFLOW) + 1  # + Triton's (its gRPC is mutual TLS)
    services = by_kind(tls_docs, "Service")
    for component in (*ATLASFLOW, "triton"):
        name = f"{RELEASE}-atlasflow-{component}"
        spec = certs[name]["spec"]
        assert spec["secretName"] == volume(deployment(tls_docs, component), "tls")["secret"]["secretName"]
        assert name in services
        assert name in spec["dnsNames"] and f"{name}.{NAMESPACE}.svc" in spec["dnsNames"]
        assert spec["uris"] == [f"spiffe://atlasflow/{component}"]
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"] == {"name": "atlasflow-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert spec["privateKey"]["rotationPolicy"] == "Always"
    # every *_TARGET a service dials is a name in the callee's certificate
    for component in ATLASFLOW:
        env = literal_env(main_container(deployment(tls_docs, component)))
        for key, value in env.items():
            if key.endswith("_TARGET"):
                host = value.rpartition(":")[0]
                assert host in certs[host]["spec"]["dnsNames"], key
        triton_url = env.get(f"ATLASFLOW_{component.upper()}_TRITON_URL")
        if triton_url:  # dns:///<Triton's headless Service>.<ns>.svc:<port> (round-robin)
            host = target_name(triton_url)
            server_name = env[f"ATLASFLOW_{component.upper()}_TRITON_TLS_SERVER_NAME"]
            assert {host, server_name} <= set(certs[server_name]["spec"]["dnsNames"]), triton_url


def test_existing_secrets_one_for_all_or_one_per_component(tmp_path: Path) -> None:
    values = tmp_path / "tls.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "tls": {
                    "enabled": True,
                    "mutual": False,
                    "existingSecret": "all-tls",
                    "secrets": {"labels": "labels-tls"},
                }
            }
        )
    )
    docs = render("-f", str(values))
    assert not by_kind(docs, "Certificate")
    for component in ATLASFLOW:
        dep = deployment(docs, component)
        expected = "labels-tls" if component == "labels" else "all-tls"
        assert volume(dep, "tls")["secret"]["secretName"] == expected
        server = _settings(dep, component).server_tls()
        assert server is not None and not server.mutual  # tls.mutual=false: server TLS only
    # cert-manager for the others, the labels Secret kept
    docs = render(*CERT_MANAGER, "--set", "tls.secrets.labels=labels-tls")
    assert sorted(by_kind(docs, "Certificate")) == [
        f"{RELEASE}-atlasflow-{c}" for c in ("ingest", "ranking", "segmentation", "triton")
    ]


def test_tls_off_by_default_renders_no_tls(docs: list[dict[str, Any]]) -> None:
    assert not by_kind(docs, "Certificate")
    for component in ATLASFLOW:
        dep = deployment(docs, component)
        env = literal_env(main_container(dep))
        assert not [k for k in env if "TLS_" in k or k.endswith("HEALTH_PORT") or k.startswith("OTEL_EXPORTER")]
        assert "tls" not in {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (("--set", "tls.enabled=true"), "tls.enabled needs the certificate of"),
        (
            ("--set", "tls.enabled=true", "--set", "tls.certManager.enabled=true"),
            "tls.certManager.issuerRef.name is required",
        ),
        (("--set", "tls.healthPort=0"), "/tls/healthPort"),
        (("--set", "tls.secrets.gateway=x"), "additional properties 'gateway' not allowed"),
    ],
)
def test_incomplete_tls_values_fail_to_render(values: tuple[str, ...], message: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *AUTH_ARGS, *values)
    assert proc.returncode != 0, values
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("component", ATLASFLOW)
def test_otlp_collector_ca_mounted(tls_docs: list[dict[str, Any]], component: str) -> None:
    dep = deployment(tls_docs, component)
    container = main_container(dep)
    ca = literal_env(container)["OTEL_EXPORTER_OTLP_CERTIFICATE"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "otel-ca"]
    assert mount["readOnly"] is True and Path(ca).parent == Path(mount["mountPath"])
    assert volume(dep, "otel-ca")["secret"]["secretName"] == "collector-ca"
