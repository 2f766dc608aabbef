"""TLS and mutual TLS of the gRPC listeners (`atlasflow.common.tls`): a TLS listener refuses
plaintext; with a client CA it refuses clients without a certificate of that CA; renewed
certificate files are served to new connections without a restart; the local CA; the
settings; OTLP export over TLS. (The stack `atlasflow up` starts is checked in
tests/common/test_common_policy.py: test_the_stack_is_tls_with_client_certificates.)"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from atlasflow.common.app import build_service_server
from atlasflow.common.clients import aio_channel, raw_channel, sync_channel
from atlasflow.common.errors import InvalidArgument
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import BuiltServer
from atlasflow.common.settings import ServiceSettings
from atlasflow.common.telemetry import otlp_span_exporter
from atlasflow.common.tls import (
    PLAINTEXT,
    ClientTLS,
    LocalCA,
    default_client_tls,
    fingerprint,
    install_local_stack_tls,
    local_stack_tls,
)
from atlasflow.testing import auth


@dataclass
class Pki:
    ca: LocalCA
    other: LocalCA  # another CA: its certificates must not be accepted

    def client(self, name: str = "cli", ca: LocalCA | None = None) -> ClientTLS:
        issued = (ca or self.ca).issue(name, server=False)
        return ClientTLS(str(self.ca.ca_file), str(issued.cert_file), str(issued.key_file))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    return Pki(LocalCA.create_or_load(root / "ca"), LocalCA.create_or_load(root / "other"))


class Served:
    """A service's server built by `build_service_server` from settings, on an event loop thread."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.loop = asyncio.new_event_loop()

        async def start() -> BuiltServer:
            built = build_service_server(settings, lambda server: [], metrics=Metrics("tls"))
            await built.start()
            await built.set_serving(True)
            return built

        self.built = self.loop.run_until_complete(start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.built.port}"

    def run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.built.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _settings(pki: Pki, *, mutual: bool, name: str = "ranking", **extra: object) -> ServiceSettings:
    issued = pki.ca.issue(name)
    return ServiceSettings(
        grpc_port=0,
        tls_cert_file=str(issued.cert_file),
        tls_key_file=str(issued.key_file),
        tls_client_ca_file=str(pki.ca.ca_file) if mutual else "",
        tls_ca_file=str(pki.ca.ca_file),
        **auth.auth_settings(),
        **extra,
    )


@pytest.fixture()
def mtls_server(pki: Pki) -> Iterator[Served]:
    served = Served(_settings(pki, mutual=True))
    yield served
    served.close()


def _health(target: str, tls: ClientTLS) -> grpc.StatusCode:
    """OK when a health check over ``tls`` is answered SERVING, else the failure's code."""
    with raw_channel(target, tls) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


def _served_fingerprint(port: int, client: ClientTLS) -> str:
    """SHA-256 fingerprint of the certificate a new TLS connection to ``port`` is served."""
    ctx = ssl.create_default_context(cafile=client.ca_file)
    ctx.load_cert_chain(client.cert_file, client.key_file)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
            der = conn.getpeercert(binary_form=True)
    assert der is not None
    return fingerprint(ssl.DER_cert_to_PEM_cert(der).encode())


def test_a_tls_listener_refuses_plaintext_and_an_unknown_server_ca(pki: Pki) -> None:
    served = Served(_settings(pki, mutual=False))
    try:
        assert _health(served.target, PLAINTEXT) == grpc.StatusCode.UNAVAILABLE
        # the client does not trust the server's CA
        assert _health(served.target, ClientTLS(ca_file=str(pki.other.ca_file))) == grpc.StatusCode.UNAVAILABLE
        # server TLS only: a client without a certificate is served
        assert _health(served.target, ClientTLS(ca_file=str(pki.ca.ca_file))) == grpc.StatusCode.OK
    finally:
        served.close()


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("plaintext", grpc.StatusCode.UNAVAILABLE),
        ("no certificate", grpc.StatusCode.UNAVAILABLE),
        ("another CA's certificate", grpc.StatusCode.UNAVAILABLE),
        ("this CA's certificate", grpc.StatusCode.OK),
    ],
)
def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_client_ca(
    pki: Pki, mtls_server: Served, client: str, expected: grpc.StatusCode
) -> None:
    tls = {
        "plaintext": PLAINTEXT,
        "no certificate": ClientTLS(ca_file=str(pki.ca.ca_file)),
        "another CA's certificate": pki.client("intruder", ca=pki.other),
        "this CA's certificate": pki.client(),
    }[client]
    assert _health(mtls_server.target, tls) == expected


def test_an_rpc_over_mtls_still_needs_its_token(pki: Pki, mtls_server: Served) -> None:
    """TLS encrypts and identifies the peer; the bearer token still decides: reflection is
    open, and sync_channel carries the caller's token over the TLS channel."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with sync_channel(mtls_server.target, tls=pki.client()) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "grpc.health.v1.Health" in names


def test_a_service_calls_another_over_mtls_with_its_own_certificate(pki: Pki, mtls_server: Served) -> None:
    """`ServiceSettings.client_tls`: the caller's CA and, by default, its server certificate as
    its client certificate (the local CA issues both usages)."""
    caller = _settings(pki, mutual=True, name="segmentation")
    tls = caller.client_tls()
    assert tls.enabled and tls.cert_file == caller.tls_cert_file and tls.key_file == caller.tls_key_file

    async def check() -> int:
        async with aio_channel(mtls_server.target, token=caller.token_source(), tls=tls) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            return int(answer.status)

    assert asyncio.run(check()) == health_pb2.HealthCheckResponse.SERVING


def test_renewed_certificate_files_are_served_without_a_restart(pki: Pki, tmp_path: Path) -> None:
    """The certificate files are replaced on disk (a renewal): new connections get the new
    certificate (another serial and fingerprint), from the same server. A broken file in
    between (a renewal half written) keeps the previous certificate served."""
    ca = LocalCA.create_or_load(tmp_path / "ca")
    issued = ca.issue("labels")
    settings = ServiceSettings(
        grpc_port=0,
        tls_cert_file=str(issued.cert_file),
        tls_key_file=str(issued.key_file),
        tls_client_ca_file=str(ca.ca_file),
        **auth.auth_settings(),
    )
    client_issued = ca.issue("cli", server=False)
    client = ClientTLS(str(ca.ca_file), str(client_issued.cert_file), str(client_issued.key_file))
    served = Served(settings)
    try:
        first = _served_fingerprint(served.built.port, client)
        assert first == fingerprint(issued.cert_file.read_bytes())
        serial_before = x509.load_pem_x509_certificate(issued.cert_file.read_bytes()).serial_number

        issued.cert_file.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")  # half written
        assert _served_fingerprint(served.built.port, client) == first
        assert _health(served.target, client) == grpc.StatusCode.OK

        issued.cert_file.unlink()
        renewed = ca.issue("labels")  # a new key and certificate, written over the old files
        serial_after = x509.load_pem_x509_certificate(renewed.cert_file.read_bytes()).serial_number
        assert serial_after != serial_before
        second = _served_fingerprint(served.built.port, client)
        assert second != first
        assert second == fingerprint(renewed.cert_file.read_bytes())
        assert _health(served.target, client) == grpc.StatusCode.OK
    finally:
        served.close()


def test_a_plaintext_listener_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """TLS is configured, not forced: without certificate files the listener is plaintext and
    logs a warning naming it; the health-only port is plaintext and answers health alone."""
    caplog.set_level(logging.WARNING, logger="atlasflow.common.server")
    from atlasflow.common.ports import free_ports

    (health_port,) = free_ports(1)
    served = Served(ServiceSettings(grpc_port=0, health_port=health_port, **auth.auth_settings()))
    try:
        assert any("plaintext" in r.getMessage() for r in caplog.records)
        assert _health(served.target, PLAINTEXT) == grpc.StatusCode.OK
        assert served.built.health_port == health_port
        assert _health(f"127.0.0.1:{health_port}", PLAINTEXT) == grpc.StatusCode.OK
    finally:
        served.close()


def test_the_health_only_port_beside_tls_answers_health_and_nothing_else(pki: Pki) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from atlasflow.common.ports import free_ports

    (health_port,) = free_ports(1)
    served = Served(_settings(pki, mutual=True, health_port=health_port))
    try:
        assert _health(f"127.0.0.1:{health_port}", PLAINTEXT) == grpc.StatusCode.OK
        assert _health(served.target, PLAINTEXT) == grpc.StatusCode.UNAVAILABLE
        with raw_channel(f"127.0.0.1:{health_port}", PLAINTEXT) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(
                    stub.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                    )
                )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # NOT_SERVING is seen there too (the kubelet takes the pod out of the Service)
        served.run(served.built.set_serving(False))
        with raw_channel(f"127.0.0.1:{health_port}", PLAINTEXT) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        served.close()


# ---------------------------------------------------------------------------- settings


def test_tls_settings_from_the_environment(pki: Pki) -> None:
    issued = pki.ca.issue("ingest")
    env = {
        "ATLASFLOW_INGEST_TLS_CERT_FILE": str(issued.cert_file),
        "ATLASFLOW_INGEST_TLS_KEY_FILE": str(issued.key_file),
        "ATLASFLOW_INGEST_TLS_CLIENT_CA_FILE": str(pki.ca.ca_file),
        "ATLASFLOW_INGEST_TLS_CA_FILE": str(pki.ca.ca_file),
        "ATLASFLOW_INGEST_TLS_CLIENT_CERT_FILE": "/run/client.pem",
        "ATLASFLOW_INGEST_TLS_CLIENT_KEY_FILE": "/run/client-key.pem",
    }
    settings = ServiceSettings.from_env("ATLASFLOW_INGEST_", env)
    server = settings.server_tls()
    assert server is not None and server.mutual and server.cert_file == str(issued.cert_file)
    client = settings.client_tls()
    assert (client.ca_file, client.cert_file, client.key_file) == (
        str(pki.ca.ca_file),
        "/run/client.pem",
        "/run/client-key.pem",
    )
    plain = ServiceSettings()
    assert plain.server_tls() is None and plain.client_tls() == PLAINTEXT


@pytest.mark.parametrize(
    "fields",
    [{"tls_cert_file": "/c.pem"}, {"tls_key_file": "/k.pem"}, {"tls_client_ca_file": "/ca.pem"}],
)
def test_incomplete_tls_settings_refuse_to_start(fields: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument) as err:
        ServiceSettings(**fields).server_tls()
    assert err.value.reason == "TLS_NOT_CONFIGURED"


def test_command_line_clients_take_tls_from_the_environment_or_the_local_stack(tmp_path: Path) -> None:
    assert default_client_tls({}) == PLAINTEXT
    env = {"ATLASFLOW_TLS_CA_FILE": "/ca.pem", "ATLASFLOW_TLS_CERT_FILE": "/c.pem", "ATLASFLOW_TLS_KEY_FILE": "/k.pem"}
    assert default_client_tls(env) == ClientTLS("/ca.pem", "/c.pem", "/k.pem")
    # a stack started by `atlasflow up` in tmp_path: run/endpoints.json names its TLS
    assert local_stack_tls(tmp_path) is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "endpoints.json").write_text(
        '{"tls": {"ca_file": "/s/ca.pem", "cert_file": "/s/cli.pem", "key_file": "/s/cli-key.pem"}}'
    )
    assert local_stack_tls(tmp_path) == ClientTLS("/s/ca.pem", "/s/cli.pem", "/s/cli-key.pem")
    environ: dict[str, str] = {}
    assert install_local_stack_tls(tmp_path, environ)
    assert default_client_tls(environ) == ClientTLS("/s/ca.pem", "/s/cli.pem", "/s/cli-key.pem")
    # explicit variables win
    assert not install_local_stack_tls(tmp_path, dict(env))


# ---------------------------------------------------------------------------- local CA


def test_the_local_ca_issues_identified_certificates_and_reuses_valid_ones(tmp_path: Path) -> None:
    ca = LocalCA.create_or_load(tmp_path / "tls")
    assert stat.S_IMODE(os.stat(ca.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ca.directory / LocalCA.CA_KEY_FILE).st_mode) == 0o600
    issued = ca.issue("ingest")
    assert stat.S_IMODE(os.stat(issued.key_file).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "ingest"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://atlasflow/ingest"]
    cli = x509.load_pem_x509_certificate(ca.issue("cli", server=False).cert_file.read_bytes())
    usage = cli.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [u.dotted_string for u in usage] == ["1.3.6.1.5.5.7.3.2"]  # client auth only
    # reused across `atlasflow up` while valid: the same CA, the same certificate
    again = LocalCA.create_or_load(tmp_path / "tls")
    assert again.ca_file.read_bytes() == ca.ca_file.read_bytes()
    assert again.issue("ingest").cert_file.read_bytes() == issued.cert_file.read_bytes()
    # a certificate another CA signed is issued again
    other = LocalCA.create_or_load(tmp_path / "other")
    (tmp_path / "tls" / "ingest.pem").write_bytes(other.issue("ingest").cert_file.read_bytes())
    fresh = ca.issue("ingest")
    x509.load_pem_x509_certificate(fresh.cert_file.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca.ca_file.read_bytes())
    )


# ---------------------------------------------------------------------------- OTLP


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.names: list[str] = []

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.names.extend(s.name for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_export_over_tls(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT=https://... + OTEL_EXPORTER_OTLP_CERTIFICATE: spans reach a
    TLS collector that a plaintext exporter cannot reach."""
    issued = pki.ca.issue("collector")
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    creds = grpc.ssl_server_credentials([(issued.key_file.read_bytes(), issued.cert_file.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "5")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://localhost:{port}")
        plain = otlp_span_exporter()
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"https://localhost:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(pki.ca.ca_file))
        secure = otlp_span_exporter()
        for exporter, name in ((plain, "plaintext-span"), (secure, "tls-span")):
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            provider.get_tracer("t").start_span(name).end()
            provider.shutdown()
        assert collector.names == ["tls-span"]
    finally:
        server.stop(0)


def test_outgoing_channels_follow_renewed_client_certificate_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service's outgoing channels (async and blocking) present a renewed client certificate
    without a restart; a renewal half written (new key, old certificate) keeps the previous one."""
    from atlasflow.common import clients
    from atlasflow.common.auth import TokenSource
    from atlasflow.common.tls import ServerTLS

    monkeypatch.setattr(clients, "RELOAD_CHECK_S", 0.0)
    ca = LocalCA.create_or_load(tmp_path / "ca")
    served_cert = ca.issue("echo")

    def client_cert_of(_request: bytes, context: grpc.ServicerContext) -> bytes:
        return context.auth_context()["x509_pem_cert"][0]

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Echo", {"Who": grpc.unary_unary_rpc_method_handler(client_cert_of)}),)
    )
    listener = ServerTLS(str(served_cert.cert_file), str(served_cert.key_file), str(ca.ca_file))
    port = server.add_secure_port("127.0.0.1:0", listener.credentials())
    server.start()
    mounted = tmp_path / "mounted"  # the service's Secret mount: files replaced in place
    mounted.mkdir()
    cert, key = mounted / "tls.crt", mounted / "tls.key"

    def install(name: str, *, half: bool = False) -> bytes:
        issued = ca.issue(name, server=False)
        key.write_bytes(issued.key_file.read_bytes())
        if not half:
            cert.write_bytes(issued.cert_file.read_bytes())
        return issued.cert_file.read_bytes()

    first = install("svc-a")
    tls = ClientTLS(str(ca.ca_file), str(cert), str(key))
    target = f"127.0.0.1:{port}"
    blocking = sync_channel(target, token=TokenSource(), tls=tls)

    async def who_async(channel: grpc.aio.Channel) -> bytes:
        answer: bytes = await channel.unary_unary("/t.Echo/Who")(b"", timeout=10)
        return answer

    async def scenario() -> list[bytes]:
        seen = []
        async with aio_channel(target, token=TokenSource(), tls=tls) as channel:
            who_blocking = blocking.unary_unary("/t.Echo/Who")
            seen += [await who_async(channel), who_blocking(b"", timeout=10)]
            install("svc-b", half=True)  # key renewed, certificate not yet
            seen += [await who_async(channel), who_blocking(b"", timeout=10)]
            seen.append(install("svc-b"))
            seen += [await who_async(channel), who_blocking(b"", timeout=10)]
        return seen

    try:
        a1, b1, a_half, b_half, renewed, a2, b2 = asyncio.run(scenario())
    finally:
        blocking.close()
        server.stop(0)
    assert a1 == b1 == a_half == b_half == first
    assert renewed != first
    assert a2 == b2 == renewed
