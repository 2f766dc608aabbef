"""Typed per-service settings, read once from the environment with a per-service prefix.

    @dataclass(frozen=True)
    class IngestSettings(ServiceSettings):
        dicom_port: int = 11112

    IngestSettings.from_env("ATLASFLOW_INGEST_")   # reads ATLASFLOW_INGEST_DICOM_PORT, ...

OpenTelemetry reads its own OTEL_* variables; they are not duplicated here.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

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
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"

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
