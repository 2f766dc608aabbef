"""Typed per-service settings, read once from the environment with a per-service prefix.

    @dataclass(frozen=True)
    class IngestSettings(ServiceSettings):
        dicom_port: int = 11112

    IngestSettings.from_env("ATLASFLOW_INGEST_")   # reads ATLASFLOW_INGEST_DICOM_PORT, ...

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
from atlasflow.common.errors import InvalidArgument

S = TypeVar("S", bound="ServiceSettings")

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


@dataclass(frozen=True)
class ServiceSettings:
    """Settings every service has."""

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int = 0  # 0: no Prometheus endpoint
    data_dir: str = ".atlasflow/data"
    blob_dir: str = ".atlasflow/blobs"
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
    # No token checked, and the caller-set x-atlasflow-principal names the caller: only for an
    # isolated test. A service with neither auth_jwks nor this refuses to start.
    auth_disabled: bool = False
    # The bearer token of this service's own outbound calls (role `service`): a file, re-read
    # when it changes (never a value on a command line or in the environment).
    token_file: str = ""

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
            if key in env:
                values[field.name] = _convert(key, env[key], hints[field.name])
        return cls(**values)
