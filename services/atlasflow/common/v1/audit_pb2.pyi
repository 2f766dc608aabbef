import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_FORMAT_UNSPECIFIED: _ClassVar[AuditFormat]
    AUDIT_FORMAT_FHIR_NDJSON: _ClassVar[AuditFormat]
    AUDIT_FORMAT_FHIR_BUNDLE: _ClassVar[AuditFormat]
    AUDIT_FORMAT_ATNA_JSON: _ClassVar[AuditFormat]
AUDIT_FORMAT_UNSPECIFIED: AuditFormat
AUDIT_FORMAT_FHIR_NDJSON: AuditFormat
AUDIT_FORMAT_FHIR_BUNDLE: AuditFormat
AUDIT_FORMAT_ATNA_JSON: AuditFormat

class AuditFilter(_message.Message):
    __slots__ = ("start_time", "end_time", "principal", "action", "outcome")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    principal: str
    action: str
    outcome: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ..., action: _Optional[str] = ..., outcome: _Optional[str] = ...) -> None: ...

class AuditTarget(_message.Message):
    __slots__ = ("kind", "value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    value: str
    def __init__(self, kind: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("record_id", "time", "service", "action", "method", "principal", "roles", "peer", "client_identity", "targets", "outcome", "reason", "cause", "suppressed", "prev_hash", "hash")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    time: _timestamp_pb2.Timestamp
    service: str
    action: str
    method: str
    principal: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    peer: str
    client_identity: str
    targets: _containers.RepeatedCompositeFieldContainer[AuditTarget]
    outcome: str
    reason: str
    cause: str
    suppressed: int
    prev_hash: str
    hash: str
    def __init__(self, record_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., service: _Optional[str] = ..., action: _Optional[str] = ..., method: _Optional[str] = ..., principal: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., peer: _Optional[str] = ..., client_identity: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[AuditTarget, _Mapping]]] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., cause: _Optional[str] = ..., suppressed: _Optional[int] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class ListAuditRecordsRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: AuditFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[AuditFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditRecordsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportAuditRecordsRequest(_message.Message):
    __slots__ = ("filter", "format")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    filter: AuditFilter
    format: AuditFormat
    def __init__(self, filter: _Optional[_Union[AuditFilter, _Mapping]] = ..., format: _Optional[_Union[AuditFormat, str]] = ...) -> None: ...

class ExportAuditRecordsResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
