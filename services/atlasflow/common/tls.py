"""TLS and mutual TLS of the gRPC listeners and channels, and the local stack's own CA.

Server side (`ServerTLS`): the certificate and key come from files, and so does the CA that
client certificates must chain to (``client_ca_file``; set: mutual TLS, a client without a
certificate of that CA is refused during the handshake). The credentials are
``grpc.dynamic_ssl_server_credentials``: gRPC asks `_ServerFiles.fetch` at every new
handshake, which re-reads the files when their (inode, mtime, size) changed, so a renewed
certificate (cert-manager, a Kubernetes Secret update, `atlasflow up`) is served to new
connections without a restart; established connections keep the old one. A half-written or
mismatched pair (the key does not belong to the certificate) is not taken: the previous
configuration stays and a warning is logged.

Client side (`ClientTLS`): the CA that server certificates must chain to and this client's
own certificate and key (mutual TLS). The files are read when a channel is built
(`atlasflow.common.clients`): a channel keeps the client certificate it was built with, so a
renewed client certificate is used by channels built after the change (the services build
theirs at start; their certificates are renewed long before they expire, see
docs/security.md). ``ATLASFLOW_TLS_CA_FILE``, ``ATLASFLOW_TLS_CERT_FILE`` and
``ATLASFLOW_TLS_KEY_FILE`` give a command-line client its TLS (`default_client_tls`), as
``ATLASFLOW_TOKEN_FILE`` gives it its token.

`LocalCA`: the CA of a stack started by `atlasflow up` (`<state>/tls/`): ``ca.pem`` and
``ca-key.pem`` (0600), one certificate per service (server and client use, SANs
``localhost``, ``127.0.0.1``, the service name and ``spiffe://atlasflow/<service>``) and one
for the command line (``cli``, client use only). Files still valid are reused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

#: environment variables of a command-line client's TLS (`default_client_tls`)
CA_FILE_ENV = "ATLASFLOW_TLS_CA_FILE"
CERT_FILE_ENV = "ATLASFLOW_TLS_CERT_FILE"
KEY_FILE_ENV = "ATLASFLOW_TLS_KEY_FILE"

#: URI SAN prefix naming an atlasflow workload (SPIFFE-style) in the local CA's certificates
SPIFFE_PREFIX = "spiffe://atlasflow/"


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)  # follows symlinks: a Secret update swaps the ..data link
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Raise ValueError unless ``key_pem`` is the private key of the first certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise ValueError("the private key does not belong to the certificate")


@dataclass(frozen=True)
class ServerTLS:
    """A listener's TLS: certificate chain and key files; ``client_ca_file`` set = mutual TLS
    (client certificates required and verified against that CA bundle)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that pick up changed files at the next handshake."""
        files = _ServerFiles(self)
        initial = files.load()
        # grpc's stubs type the fetcher as always returning a configuration; its documented
        # contract (and the core) take None as "no change", which is what `fetch` answers mostly.
        fetch = cast("Callable[[], grpc.ServerCertificateConfiguration]", files.fetch)
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=self.mutual)


@dataclass
class _ServerFiles:
    """The certificate fetcher of `ServerTLS.credentials` (called by gRPC per handshake)."""

    tls: ServerTLS
    stamp: tuple[tuple[int, int, int], ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _paths(self) -> list[str]:
        return [p for p in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file) if p]

    def load(self) -> grpc.ServerCertificateConfiguration:
        """Read and check the files (raises OSError / ValueError on unusable files)."""
        stamp = tuple(_stamp(p) for p in self._paths())
        cert = Path(self.tls.cert_file).read_bytes()
        key = Path(self.tls.key_file).read_bytes()
        _check_pair(cert, key)
        ca = Path(self.tls.client_ca_file).read_bytes() if self.tls.client_ca_file else None
        if ca is not None:
            x509.load_pem_x509_certificates(ca)  # a bundle that parses
        self.stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when a file changed since the last load; None keeps the current."""
        with self.lock:
            try:
                if tuple(_stamp(p) for p in self._paths()) == self.stamp:
                    return None
                config = self.load()
            except (OSError, ValueError) as exc:
                # a renewal in progress (one file written, not the other) or a broken file:
                # keep serving the previous certificate; never log the file's content
                log.warning("TLS files not reloaded", extra={"fields": {"error": type(exc).__name__}})
                return None
            log.info("TLS certificate reloaded", extra={"fields": {"cert_file": self.tls.cert_file}})
            return config


@dataclass(frozen=True)
class ClientTLS:
    """A client's TLS: ``ca_file`` (CA bundle the server must chain to; "" = the system's
    roots), ``cert_file`` + ``key_file`` (this client's certificate, for mutual TLS; "" =
    none), ``server_name`` (expected name in the server certificate when it differs from the
    target's host). ``enabled=False`` (`PLAINTEXT`) is a plaintext channel."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    enabled: bool = True

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """Identity of the files as they are now (inode, mtime, size; raises OSError)."""
        return tuple(_stamp(p) for p in (self.ca_file, self.cert_file, self.key_file) if p)

    def checked_credentials(self) -> grpc.ChannelCredentials:
        """`credentials`, after checking that the key belongs to the certificate and the CA
        bundle parses (ValueError / OSError otherwise: e.g. a renewal half written)."""
        if self.cert_file or self.key_file:
            _check_pair(Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes())
        if self.ca_file:
            x509.load_pem_x509_certificates(Path(self.ca_file).read_bytes())
        return self.credentials()


#: an explicitly plaintext channel (a service or test without TLS configured)
PLAINTEXT = ClientTLS(enabled=False)


def default_client_tls(environ: Mapping[str, str] | None = None) -> ClientTLS:
    """A command-line client's TLS from ``ATLASFLOW_TLS_CA_FILE`` / ``_CERT_FILE`` /
    ``_KEY_FILE`` (`PLAINTEXT` when none is set)."""
    env = os.environ if environ is None else environ
    ca, cert, key = (env.get(k, "") for k in (CA_FILE_ENV, CERT_FILE_ENV, KEY_FILE_ENV))
    if not (ca or cert or key):
        return PLAINTEXT
    return ClientTLS(ca_file=ca, cert_file=cert, key_file=key)


def local_stack_tls(state_dir: Path) -> ClientTLS | None:
    """The client TLS a stack started by `atlasflow up` in ``state_dir`` wrote to
    ``run/endpoints.json`` ("tls": its CA, the command line's certificate); None when there is
    no such stack."""
    import json

    try:
        doc = json.loads((Path(state_dir) / "run" / "endpoints.json").read_text())
    except (OSError, ValueError):
        return None
    tls = doc.get("tls") if isinstance(doc, dict) else None
    if not isinstance(tls, dict) or not tls.get("ca_file"):
        return None
    return ClientTLS(
        ca_file=str(tls["ca_file"]), cert_file=str(tls.get("cert_file", "")), key_file=str(tls.get("key_file", ""))
    )


def install_local_stack_tls(state_dir: Path, environ: MutableMapping[str, str] | None = None) -> bool:
    """Point ``ATLASFLOW_TLS_*`` at the TLS of the stack in ``state_dir`` unless one of them is
    already set (the command line's clients then connect to that stack with TLS); True if set."""
    env = os.environ if environ is None else environ
    if any(env.get(k) for k in (CA_FILE_ENV, CERT_FILE_ENV, KEY_FILE_ENV)):
        return False
    tls = local_stack_tls(state_dir)
    if tls is None:
        return False
    env[CA_FILE_ENV], env[CERT_FILE_ENV], env[KEY_FILE_ENV] = tls.ca_file, tls.cert_file, tls.key_file
    return True


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of a PEM certificate's DER encoding, hex (what `openssl x509 -fingerprint` shows)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


# ---------------------------------------------------------------------------------- local CA


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Issued:
    """Paths of an issued certificate and its key."""

    cert_file: Path
    key_file: Path


@dataclass
class LocalCA:
    """The CA of a local stack, under ``directory`` (0700). ES256 (P-256) keys."""

    directory: Path
    #: lifetime of the CA and of the certificates it issues, in days
    ca_days: int = 3650
    leaf_days: int = 365
    #: a certificate expiring within this many days is issued again
    renew_days: int = 30

    CA_FILE = "ca.pem"
    CA_KEY_FILE = "ca-key.pem"

    @property
    def ca_file(self) -> Path:
        return self.directory / self.CA_FILE

    @classmethod
    def create_or_load(cls, directory: Path) -> LocalCA:
        ca = cls(Path(directory))
        ca.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca.directory.chmod(0o700)
        if not ca._valid(ca.ca_file, None):
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atlasflow local CA")])
            now = _now()
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=ca.ca_days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256())
            )
            _write_private(ca.directory / cls.CA_KEY_FILE, _key_pem(key))
            ca.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        key = serialization.load_pem_private_key((self.directory / self.CA_KEY_FILE).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the local CA key is not an EC key")
        return cert, key

    def _valid(self, cert_file: Path, issuer: x509.Certificate | None) -> bool:
        """A certificate that exists, is not within ``renew_days`` of its end and (``issuer``)
        was signed by that CA."""
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except (OSError, ValueError):
            return False
        if cert.not_valid_after_utc - _now() < dt.timedelta(days=self.renew_days):
            return False
        if issuer is not None:
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and friends
                return False
        return True

    def issue(self, name: str, *, server: bool = True, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Issued:
        """``<name>.pem`` + ``<name>-key.pem`` (0600): client use (URI SAN
        ``spiffe://atlasflow/<name>``) and, with ``server``, server use for ``hosts`` and
        ``name``. Reused while still valid and issued by this CA."""
        issued = Issued(self.directory / f"{name}.pem", self.directory / f"{name}-key.pem")
        ca_cert, ca_key = self._ca()
        if issued.key_file.exists() and self._valid(issued.cert_file, ca_cert):
            return issued
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(SPIFFE_PREFIX + name)]
        if server:
            for host in (*hosts, name):
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    sans.append(x509.DNSName(host))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"atlasflow-{name}")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=self.leaf_days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        # key first, certificate last: a reloading server never sees a new certificate with an old key
        tmp_key = issued.key_file.with_suffix(".tmp")
        _write_private(tmp_key, _key_pem(key))
        tmp_cert = issued.cert_file.with_suffix(".tmp")
        tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp_key, issued.key_file)
        os.replace(tmp_cert, issued.cert_file)
        return issued


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
