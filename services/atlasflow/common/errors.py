"""Domain errors that carry their gRPC status, mapped once by the server's error interceptor.

Domain code raises these without importing grpc; `atlasflow.common.server` turns each into a
gRPC status with one `google.rpc.ErrorInfo` detail (AIP-193): `reason` in UPPER_SNAKE, a
fixed `domain` per service, the variables in `metadata`. Messages must never contain patient
data or internal details (paths, stack traces).
"""

from __future__ import annotations

from collections.abc import Mapping


class AtlasflowError(Exception):
    """Base class. `code` is the name of a grpc.StatusCode member."""

    code: str = "INTERNAL"

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        domain: str = "atlasflow",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.domain = domain
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r})"


class InvalidArgument(AtlasflowError):
    code = "INVALID_ARGUMENT"


class NotFound(AtlasflowError):
    code = "NOT_FOUND"


class AlreadyExists(AtlasflowError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(AtlasflowError):
    code = "FAILED_PRECONDITION"


class Aborted(AtlasflowError):
    code = "ABORTED"


class Unavailable(AtlasflowError):
    code = "UNAVAILABLE"


class ResourceExhausted(AtlasflowError):
    code = "RESOURCE_EXHAUSTED"


class DataLoss(AtlasflowError):
    code = "DATA_LOSS"


class Unauthenticated(AtlasflowError):
    """No caller identity."""

    code = "UNAUTHENTICATED"


class PermissionDenied(AtlasflowError):
    """The caller may not act on this resource (e.g. another reviewer's lease)."""

    code = "PERMISSION_DENIED"
