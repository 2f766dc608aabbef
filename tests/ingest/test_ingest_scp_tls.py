"""DICOM TLS of the ingest SCP (PS3.15 Annex B), with dcmtk's storescu (+tls, OpenSSL) and
certificates made here (a CA, the SCP's certificate, a client certificate, and a client
certificate of another CA): a TLS association stores, plaintext on the TLS port fails, a client
without a certificate (or with one of another CA) is refused when a CA is configured, and a
silent connection does not hold the TLS listener. The settings reach the service
(ATLASFLOW_INGEST_DICOM_TLS_*) in the last test."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.metrics import Metrics
from atlasflow.common.ports import free_ports
from atlasflow.ingest.reception import Reception
from atlasflow.ingest.scp import ScpConfig, StoreScp
from atlasflow.ingest.store import IngestStore
from atlasflow.testing import peers


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_file, cert_file = path.with_suffix(".key"), path.with_suffix(".pem")
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def make_ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert, _write(directory / name, key, cert)[1]


def issue(
    directory: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path], *, server: bool
) -> tuple[Path, Path]:
    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return _write(directory / name, key, builder.sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "hospital-ca")
    other = make_ca(d, "other-ca")
    server_key, server_cert = issue(d, "scp", ca, server=True)
    client_key, client_cert = issue(d, "modality", ca, server=False)
    rogue_key, rogue_cert = issue(d, "rogue", other, server=False)
    return {
        "ca": ca[2],
        "server_key": server_key,
        "server_cert": server_cert,
        "client_key": client_key,
        "client_cert": client_cert,
        "rogue_key": rogue_key,
        "rogue_cert": rogue_cert,
    }


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[StoreScp]:
    root = tmp_path_factory.mktemp("scp")
    store = IngestStore(root / "data", LocalBlobStore(root / "blobs"), spool_segment_bytes=1 << 20, spool_spares=1)
    server = StoreScp(
        ScpConfig(
            port=0,
            tls_port=0,
            accepted_calling_aets=("STORESCU",),
            tls_cert_file=str(pki["server_cert"]),
            tls_key_file=str(pki["server_key"]),
            tls_ca_file=str(pki["ca"]),
            acse_timeout_s=30,
        ),
        Reception(store, Metrics("ingest")),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return peers.build_ct_series(tmp_path_factory.mktemp("series"), 2, seed="dicom-tls")


def events(scp: StoreScp, name: str) -> float:
    return scp.metrics.registry.get_sample_value("atlasflow_events_total", {"service": "ingest", "event": name}) or 0.0


def tls_args(pki: dict[str, Path], client: str | None = "client") -> list[str]:
    """storescu TLS options: our client certificate (or anonymous TLS), the CA it checks the
    SCP's certificate against."""
    own = ["+tls", str(pki[f"{client}_key"]), str(pki[f"{client}_cert"])] if client else ["+tla"]
    return [*own, "+cf", str(pki["ca"])]


def test_dcmtk_is_built_with_tls() -> None:
    exe = shutil.which("storescu")
    assert exe, "dcmtk storescu is required"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "+tls" in out, "this dcmtk has no TLS (OpenSSL) support"


def test_tls_association_stores(scp: StoreScp, pki: dict[str, Path], series: list[Path]) -> None:
    before = events(scp, "instances_stored")
    r = peers.storescu(series, scp.tls_port, extra=tls_args(pki))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert len(peers.acknowledged_files(out)) == 2, out[-3000:]
    assert events(scp, "instances_stored") == before + 2


def test_plaintext_on_the_tls_port_fails(scp: StoreScp, series: list[Path]) -> None:
    before = events(scp, "dicom_tls_handshakes_failed")
    r = peers.storescu(series, scp.tls_port, timeout_s=60)
    assert r.returncode != 0
    assert peers.acknowledged_files(r.stdout + r.stderr) == []
    assert events(scp, "dicom_tls_handshakes_failed") == before + 1


@pytest.mark.parametrize("client", [None, "rogue"], ids=["no-certificate", "certificate-of-another-ca"])
def test_client_without_a_certificate_of_the_ca_is_refused(
    scp: StoreScp, pki: dict[str, Path], series: list[Path], client: str | None
) -> None:
    before = events(scp, "dicom_tls_handshakes_failed")
    r = peers.storescu(series, scp.tls_port, extra=tls_args(pki, client), timeout_s=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert peers.acknowledged_files(out) == []
    assert events(scp, "dicom_tls_handshakes_failed") == before + 1


def test_a_silent_connection_does_not_hold_the_tls_listener(
    scp: StoreScp, pki: dict[str, Path], series: list[Path]
) -> None:
    """pynetdicom runs the TLS handshake on its accept loop: one peer that connects and sends
    nothing would hold every other until it goes. Here the handshake runs on the connection's
    thread."""
    silent = [socket.create_connection(("127.0.0.1", scp.tls_port), timeout=10) for _ in range(3)]
    try:
        t0 = time.monotonic()
        r = peers.storescu(series, scp.tls_port, extra=tls_args(pki), timeout_s=25)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert time.monotonic() - t0 < 25
    finally:
        for s in silent:
            s.close()


def test_plaintext_port_still_serves_and_tls_only_has_no_plaintext_port(
    scp: StoreScp, pki: dict[str, Path], series: list[Path], tmp_path: Path
) -> None:
    r = peers.storescu(series, scp.port)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    store = IngestStore(tmp_path / "data", LocalBlobStore(tmp_path / "blobs"), spool_segment_bytes=1 << 20)
    only_tls = StoreScp(
        ScpConfig(
            port=0,
            tls_port=0,
            plaintext=False,
            accepted_calling_aets=("STORESCU",),
            tls_cert_file=str(pki["server_cert"]),
            tls_key_file=str(pki["server_key"]),
        ),
        Reception(store, Metrics("ingest")),
    )
    only_tls.start()
    try:
        assert only_tls.port == 0 and only_tls.tls_port > 0
        # no CA configured: server-authenticated TLS, a client without a certificate associates
        r = peers.storescu(series, only_tls.tls_port, extra=tls_args(pki, None))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    finally:
        only_tls.stop()
    with pytest.raises(ValueError, match="DICOM_PLAINTEXT off needs DICOM TLS"):
        ScpConfig(plaintext=False)


def test_settings_reach_the_service(pki: dict[str, Path], series: list[Path], tmp_path: Path) -> None:
    (tls_port,) = free_ports(1)
    env = {
        "DICOM_TLS_CERT_FILE": str(pki["server_cert"]),
        "DICOM_TLS_KEY_FILE": str(pki["server_key"]),
        "DICOM_TLS_CA_FILE": str(pki["ca"]),
        "DICOM_TLS_PORT": str(tls_port),
    }
    with peers.IngestProcess(tmp_path, env=env):
        peers.wait_port(tls_port, 30)
        r = peers.storescu(series, tls_port, extra=tls_args(pki))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        r = peers.storescu(series, tls_port, extra=tls_args(pki, None), timeout_s=60)
        assert r.returncode != 0
