"""Typed per-service settings, read once from the environment with a per-service prefix.

    @dataclass(frozen=True)
    class IngestSettings(ServiceSettings):
        dicom_port: int = 11112

    IngestSettings.from_env("ATLASFLOW_INGEST_")   # reads ATLASFLOW_INGEST_DICOM_PORT, ...

A secret setting (FILE_SETTINGS: the database URL, which may hold a password) may instead be
read from a file: ATLASFLOW_INGEST_DATABASE_URL_FILE=/var/run/secrets/.../database-url (a
Secret mounted read-only; the chart does this, so the URL is never an environment value of the
pod spec). The file is read once at start, surrounding whitespace stripped; both variables set,
an unreadable file or an empty one is an InvalidArgument naming the variable and the path, never
the value. The value's repr() is redacted (`SecretStr`), so a logged settings object shows no URL.

OpenTelemetry reads its own OTEL_* variables; they are not duplicated here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from atlasflow.common.auth import AuthConfig, TokenSource, TokenVerifier
from atlasflow.common.blobstore import BlobStore, S3Options, open_blob_store
from atlasflow.common.errors import InvalidArgument
from atlasflow.common.tls import PLAINTEXT, ClientTLS, ServerTLS

S = TypeVar("S", bound="ServiceSettings")

# Settings that may come from a file named by <PREFIX><FIELD>_FILE (module docstring).
FILE_SETTINGS = frozenset({"database_url"})

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(name: str, raw: str, typ: Any) -> Any:
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if typ in (int, float, str):
            return typ(raw)
        if typing.get_origin(typ) is tuple:
            return tuple(x.strip() for x in raw.split(",") if x.strip())
    except ValueError:
        pass
    else:
        raise TypeError(f"unsupported settings type {typ!r} for {name}")
    raise InvalidArgument(
        "INVALID_SETTING",
        f"environment variable {name} has an invalid value",
        domain="atlasflow.settings",
        metadata={"variable": name},
    )


class SecretStr(str):
    """A str whose repr() hides the value (a settings object in a log shows no password)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'" if self else "''"


def _settings_error(reason: str, message: str, variable: str, path: str = "") -> InvalidArgument:
    metadata = {"variable": variable}
    if path:
        metadata["path"] = path
    return InvalidArgument(reason, message, domain="atlasflow.settings", metadata=metadata)


def read_secret_setting(key: str, env: Mapping[str, str]) -> str | None:
    """The value of secret setting `key` (e.g. ATLASFLOW_RANKING_DATABASE_URL) from the
    variable itself or from the file `key`_FILE names; None when neither is set.

    Raises InvalidArgument SETTING_CONFLICT (both set), SETTING_FILE_UNREADABLE or
    SETTING_FILE_EMPTY; the messages name the variable and the path, never the value."""
    file_key = key + "_FILE"
    if file_key not in env:
        return SecretStr(env[key]) if key in env else None
    if key in env:
        raise _settings_error("SETTING_CONFLICT", f"set {key} or {file_key}, not both", key)
    path = env[file_key]
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise _settings_error(
            "SETTING_FILE_UNREADABLE", f"{file_key}: cannot read {path}: {reason}", file_key, path
        ) from None
    if not value:
        # an empty mounted Secret must not fall back silently to the embedded SQLite default
        raise _settings_error("SETTING_FILE_EMPTY", f"{file_key}: {path} is empty", file_key, path)
    return SecretStr(value)


@dataclass(frozen=True)
class ServiceSettings:
    """Settings every service has."""

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int = 0  # 0: no Prometheus endpoint
    data_dir: str = ".atlasflow/data"
    blob_dir: str = ".atlasflow/blobs"
    # The shared blob store (common.blobstore.open_blob_store): a directory, file:///path or
    # s3://bucket/prefix; empty: blob_dir. For s3://: the endpoint (MinIO, Ceph RGW; empty: AWS),
    # region and addressing style (auto, virtual, path); credentials come from boto3's standard
    # chain (AWS_SHARED_CREDENTIALS_FILE at a mounted Secret, web identity, instance profile).
    blob_url: str = ""
    blob_s3_endpoint_url: str = ""
    blob_s3_region: str = ""
    blob_s3_addressing_style: str = "auto"
    max_message_bytes: int = 64 * 1024 * 1024
    # calls in progress at once; more answer RESOURCE_EXHAUSTED (common.server.build_server)
    max_concurrent_rpcs: int = 64
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    # Authentication (docs/security.md). auth_jwks: the token issuer's JWKS, an https:// URL (the
    # OIDC provider's jwks_uri) or a file path; auth_issuer / auth_audience: required iss / aud;
    # auth_role_claim: dotted path of the roles claim (Keycloak: realm_access.roles).
    auth_jwks: str = ""
    auth_issuer: str = ""
    auth_audience: str = "atlasflow"
    auth_role_claim: str = "roles"
    auth_algorithms: tuple[str, ...] = ("ES256", "RS256")
    # auth_service_claim: dotted path of the claim holding a service token's identity
    # (svc:<service>; docs/security.md "One identity per service"); default the subject.
    auth_service_claim: str = "sub"
    # No token checked, and the caller-set x-atlasflow-principal names the caller: only for an
    # isolated test. A service with neither auth_jwks nor this refuses to start.
    auth_disabled: bool = False
    # The bearer token of this service's own outbound calls (role `service`): a file, re-read
    # when it changes (never a value on a command line or in the environment).
    token_file: str = ""
    # TLS (common.tls, docs/security.md "Transport"). tls_cert_file + tls_key_file: this
    # listener's certificate and key (unset: plaintext, logged as a warning); tls_client_ca_file:
    # CA bundle client certificates must chain to (set: mutual TLS, a client without one is
    # refused). Files, re-read when they change. For this service's own calls to the others:
    # tls_ca_file (CA bundle the servers must chain to; set: the calls use TLS) and
    # tls_client_cert_file / tls_client_key_file (default: tls_cert_file / tls_key_file).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    tls_ca_file: str = ""
    tls_client_cert_file: str = ""
    tls_client_key_file: str = ""
    # A plaintext listener serving grpc.health.v1 only (0: none), for probes that cannot speak
    # TLS (the kubelet's gRPC probes); it answers nothing else.
    health_port: int = 0

    def blob_store(self) -> BlobStore:
        """The shared blob store ``blob_url`` (or the directory ``blob_dir``) names."""
        s3 = S3Options(
            endpoint_url=self.blob_s3_endpoint_url,
            region=self.blob_s3_region,
            addressing_style=self.blob_s3_addressing_style,
        )
        return open_blob_store(self.blob_url or self.blob_dir, s3)

    def local_blob_dir(self) -> str | None:
        """The blob directory when the blob store is local (disk-floor checks), else None."""
        store_url = self.blob_url or self.blob_dir
        if store_url.startswith("s3://"):
            return None
        return store_url.removeprefix("file://")

    def server_tls(self) -> ServerTLS | None:
        """This service's listener TLS (None: plaintext)."""
        if not self.tls_cert_file and not self.tls_key_file:
            if self.tls_client_ca_file:
                raise InvalidArgument(
                    "TLS_NOT_CONFIGURED",
                    "TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE",
                    domain="atlasflow.settings",
                    metadata={},
                )
            return None
        if not self.tls_cert_file or not self.tls_key_file:
            raise InvalidArgument(
                "TLS_NOT_CONFIGURED",
                "TLS needs both TLS_CERT_FILE and TLS_KEY_FILE",
                domain="atlasflow.settings",
                metadata={},
            )
        return ServerTLS(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)

    def client_tls(self) -> ClientTLS:
        """TLS of this service's calls to the others (`PLAINTEXT` without ``tls_ca_file``)."""
        if not self.tls_ca_file:
            return PLAINTEXT
        return ClientTLS(
            ca_file=self.tls_ca_file,
            cert_file=self.tls_client_cert_file or self.tls_cert_file,
            key_file=self.tls_client_key_file or self.tls_key_file,
        )

    def verifier(self) -> TokenVerifier | None:
        """The token check every RPC passes (None only with ``auth_disabled``)."""
        if self.auth_disabled:
            logging.getLogger(__name__).warning(
                "AUTHENTICATION DISABLED (AUTH_DISABLED=true): every caller is trusted; isolated tests only"
            )
            return None
        if not self.auth_jwks or not self.auth_issuer:
            raise InvalidArgument(
                "AUTH_NOT_CONFIGURED",
                "authentication needs AUTH_JWKS and AUTH_ISSUER (see docs/security.md); "
                "AUTH_DISABLED=true only for an isolated test",
                domain="atlasflow.settings",
                metadata={},
            )
        return TokenVerifier(
            AuthConfig(
                jwks=self.auth_jwks,
                issuer=self.auth_issuer,
                audience=self.auth_audience,
                role_claim=self.auth_role_claim,
                algorithms=self.auth_algorithms,
                service_claim=self.auth_service_claim,
            )
        )

    def token_source(self) -> TokenSource:
        """The bearer token of this service's outbound calls (empty without ``token_file``)."""
        return TokenSource(path=self.token_file)

    @classmethod
    def from_env(cls: type[S], prefix: str, environ: Mapping[str, str] | None = None) -> S:
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = prefix + field.name.upper()
            if field.name in FILE_SETTINGS:
                secret = read_secret_setting(key, env)
                if secret is not None:
                    values[field.name] = secret
            elif key in env:
                values[field.name] = _convert(key, env[key], hints[field.name])
        return cls(**values)
