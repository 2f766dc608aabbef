"""The web gateway in the Helm chart (gateway.enabled; docs/gateway.md, deploy/README.md): a
stateless Deployment, its Service and Ingress, OIDC settings (client secret from an existing
Secret, mounted as a file), the four services' gRPC targets, TLS like the other components,
and NetworkPolicies: the four services admit the gateway on gRPC, the gateway admits the
ingress controller on HTTP. Rendered by the real Helm binary, validated with
kubernetes-validate (strict) except custom resources."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from test_chart import (
    AUTH_ISSUER,
    AUTH_JWKS,
    CHART,
    GRPC_PORTS,
    KUBE_VERSION,
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

from atlasflow.common.settings import FILE_SETTINGS
from atlasflow.gateway.settings import PREFIX, GatewaySettings

HOST = "atlasflow.hospital.example"
GATEWAY = (
    "--set",
    "gateway.enabled=true",
    "--set",
    "gateway.oidc.clientId=atlasflow-gateway",
    "--set",
    f"gateway.ingress.host={HOST}",
    "--set",
    "gateway.ingress.className=nginx",
    "--set",
    "gateway.ingress.tlsSecret=atlasflow-public-tls",
    "--set",
    "gateway.oidc.clientSecret.existingSecret=gateway-oidc",
    "--set",
    "labels.database.existingSecret=atlasflow-labels-db",
)
TLS = (
    "--set",
    "tls.enabled=true",
    "--set",
    "tls.certManager.enabled=true",
    "--set",
    "tls.certManager.issuerRef.name=ca",
)
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("cert-manager.io/v1", "Certificate")}


@pytest.fixture(scope="module")
def gw_docs() -> list[dict[str, Any]]:
    return render(*GATEWAY)


@pytest.fixture(scope="module")
def gw_tls_docs() -> list[dict[str, Any]]:
    return render(*GATEWAY, *TLS)


def _name(component: str) -> str:
    return f"{RELEASE}-atlasflow-{component}"


def test_off_by_default() -> None:
    docs = render()
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"]


@pytest.mark.parametrize("tls", [False, True])
def test_every_document_validates(gw_docs: list[dict[str, Any]], gw_tls_docs: list[dict[str, Any]], tls: bool) -> None:
    docs = gw_tls_docs if tls else gw_docs
    assert {d["kind"] for d in docs if d["metadata"]["name"] == _name("gateway")} >= {
        "Deployment",
        "Service",
        "Ingress",
        "NetworkPolicy",
    }
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    proc = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *render_args(tls))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def render_args(tls: bool) -> tuple[str, ...]:
    from test_chart import AUTH_ARGS

    return (*AUTH_ARGS, *GATEWAY, *(TLS if tls else ()))


def test_env_matches_gateway_settings(gw_docs: list[dict[str, Any]]) -> None:
    """Every ATLASFLOW_GATEWAY_* variable is a GatewaySettings field and parses; the parsed
    settings match the pod (port, blob mount, secret file) and the release (targets, issuer)."""
    import dataclasses

    dep = deployment(gw_docs, "gateway")
    container = main_container(dep)
    env = literal_env(container)
    fields = {f.name.upper() for f in dataclasses.fields(GatewaySettings)}
    # a secret setting's <FIELD>_FILE (common.settings.FILE_SETTINGS) names a file of a mounted Secret
    from_file = {f"{PREFIX}{name.upper()}_FILE" for name in FILE_SETTINGS}
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k[len(PREFIX) :] not in fields and k not in from_file)
    assert not unknown, f"GatewaySettings has no field for {unknown}"
    s = GatewaySettings.from_env(PREFIX, {k: v for k, v in env.items() if k not in from_file})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert s.http_host == "0.0.0.0" and s.http_port == ports["http"] and s.metrics_port == ports["metrics"]
    assert s.blob_dir == mount_path(container, "blobs")
    assert 0 < s.shutdown_grace_s < dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    services = by_kind(gw_docs, "Service")
    for name, port in GRPC_PORTS.items():
        host, _, p = getattr(s, f"{name}_target").rpartition(":")
        assert host == _name(name) and host in services and int(p) == port
    assert (s.auth_issuer, s.auth_jwks, s.oidc_issuer) == (AUTH_ISSUER, AUTH_JWKS, AUTH_ISSUER)
    assert s.oidc_client_id == "atlasflow-gateway"
    assert s.oidc_redirect_uri == f"https://{HOST}/login/oidc/callback"
    assert "openid" in s.oidc_scopes.split()
    # the client secret is a file of the mounted Secret, never an env value
    assert s.oidc_client_secret_file.startswith(mount_path(container, "oidc-client-secret") + "/")
    assert volume(dep, "oidc-client-secret")["secret"]["secretName"] == "gateway-oidc"
    # no Secret in env: the audit database's URL too is a file of its mounted Secret
    secret_env = [e["name"] for e in container["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]
    assert secret_env == []
    assert s.database_url == "" and env[f"{PREFIX}DATABASE_URL_FILE"].startswith(mount_path(container, "database-url"))
    # no service token: the gateway calls the services as the user
    assert not any(k.endswith("TOKEN_FILE") for k in env)
    assert s.verifier() is not None  # the settings check tokens (AUTH_* complete)


def test_probes_and_hardening(gw_docs: list[dict[str, Any]], gw_tls_docs: list[dict[str, Any]]) -> None:
    for docs, scheme in ((gw_docs, "HTTP"), (gw_tls_docs, "HTTPS")):
        dep = deployment(docs, "gateway")
        c = main_container(dep)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": scheme}
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]
        assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_ingress(gw_docs: list[dict[str, Any]], gw_tls_docs: list[dict[str, Any]]) -> None:
    ing = by_kind(gw_docs, "Ingress")[_name("gateway")]
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"hosts": [HOST], "secretName": "atlasflow-public-tls"}]
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == HOST
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": _name("gateway"), "port": {"name": "http"}}
    svc = by_kind(gw_docs, "Service")[_name("gateway")]
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}
    assert "annotations" not in ing["metadata"]
    # with tls.enabled the gateway listens in https: the controller is told so
    tls_ing = by_kind(gw_tls_docs, "Ingress")[_name("gateway")]
    assert tls_ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"


def test_ingress_host_or_redirect_uri_required() -> None:
    from test_chart import AUTH_ARGS

    proc = helm(
        "template", RELEASE, str(CHART), "-n", NAMESPACE, *AUTH_ARGS, "--set", "gateway.enabled=true",
        "--set", "gateway.oidc.clientId=x",
    )  # fmt: skip
    assert proc.returncode != 0 and "gateway.ingress.host is required" in proc.stderr
    proc = helm(
        "template", RELEASE, str(CHART), "-n", NAMESPACE, *AUTH_ARGS, "--set", "gateway.enabled=true",
        "--set", f"gateway.ingress.host={HOST}",
    )  # fmt: skip
    assert proc.returncode != 0 and "gateway.oidc.clientId is required" in proc.stderr


def test_tls_like_the_other_components(gw_tls_docs: list[dict[str, Any]]) -> None:
    dep = deployment(gw_tls_docs, "gateway")
    c = main_container(dep)
    # (the database URL file exists only in the pod: leave it out)
    s = GatewaySettings.from_env(PREFIX, {k: v for k, v in literal_env(c).items() if k != f"{PREFIX}DATABASE_URL_FILE"})
    tls_dir = mount_path(c, "tls")
    assert (s.tls_cert_file, s.tls_key_file, s.tls_ca_file) == (
        f"{tls_dir}/tls.crt",
        f"{tls_dir}/tls.key",
        f"{tls_dir}/ca.crt",
    )
    assert s.client_tls().ca_file == s.tls_ca_file  # the gRPC calls verify the services and present this cert
    assert volume(dep, "tls")["secret"]["secretName"] == f"{_name('gateway')}-tls"
    certs = {d["metadata"]["name"]: d for d in gw_tls_docs if d["kind"] == "Certificate"}
    gw = certs[_name("gateway")]
    assert gw["spec"]["secretName"] == f"{_name('gateway')}-tls"
    assert "client auth" in gw["spec"]["usages"] and "server auth" in gw["spec"]["usages"]


def test_network_policies(gw_docs: list[dict[str, Any]]) -> None:
    """The four services admit the gateway on gRPC; the gateway admits only the ingress
    controller on HTTP (and Prometheus on metrics)."""
    policies = by_kind(gw_docs, "NetworkPolicy")
    gw_peer = {"podSelector": {"matchLabels": deployment(gw_docs, "gateway")["spec"]["selector"]["matchLabels"]}}
    for name in GRPC_PORTS:
        rules = policies[_name(name)]["spec"]["ingress"]
        grpc_rules = [r for r in rules if {"protocol": "TCP", "port": "grpc"} in r["ports"]]
        assert any(gw_peer in r["from"] for r in grpc_rules), name
    rules = policies[_name("gateway")]["spec"]["ingress"]
    by_port = {r["ports"][0]["port"]: r.get("from") for r in rules}
    assert by_port["http"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    assert set(by_port) == {"http", "metrics"}
    # without the gateway, no service admits it
    plain = by_kind(render(), "NetworkPolicy")
    for name in GRPC_PORTS:
        assert "gateway" not in str(plain[_name(name)]["spec"])


def test_the_audit_log_is_on_postgresql(gw_docs: list[dict[str, Any]]) -> None:
    """The gateway's audit log is one PostgreSQL log for every replica: labels' database Secret by
    default, its own when named; no database at all fails the render (a file in the pod would
    lose the audit with the pod)."""
    from test_chart import AUTH_ARGS

    def db_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
        dep = deployment(docs, "gateway")
        env = {e["name"]: e for e in main_container(dep)["env"]}
        assert env[f"{PREFIX}DATABASE_URL_FILE"]["value"] == "/var/run/secrets/atlasflow/database/database-url"
        (source,) = volume(dep, "database-url")["projected"]["sources"]
        (item,) = source["secret"]["items"]
        assert item["path"] == "database-url"
        return {"name": source["secret"]["name"], "key": item["key"]}

    assert db_env(gw_docs) == {"name": "atlasflow-labels-db", "key": "database-url"}
    own = render(
        *GATEWAY, "--set", "gateway.database.existingSecret=gw-audit", "--set", "gateway.database.secretKey=url"
    )
    assert db_env(own) == {"name": "gw-audit", "key": "url"}
    assert GATEWAY[-1] == "labels.database.existingSecret=atlasflow-labels-db"
    no_db = GATEWAY[:-2]
    proc = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *AUTH_ARGS, *no_db)
    assert proc.returncode != 0 and "gateway.database.existingSecret" in proc.stderr
