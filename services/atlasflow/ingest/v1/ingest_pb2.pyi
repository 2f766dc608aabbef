import datetime

from atlasflow.common.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SeriesState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERIES_STATE_UNSPECIFIED: _ClassVar[SeriesState]
    SERIES_STATE_RECEIVING: _ClassVar[SeriesState]
    SERIES_STATE_ASSEMBLED: _ClassVar[SeriesState]
    SERIES_STATE_DISPATCHED: _ClassVar[SeriesState]
    SERIES_STATE_FAILED: _ClassVar[SeriesState]
SERIES_STATE_UNSPECIFIED: SeriesState
SERIES_STATE_RECEIVING: SeriesState
SERIES_STATE_ASSEMBLED: SeriesState
SERIES_STATE_DISPATCHED: SeriesState
SERIES_STATE_FAILED: SeriesState

class Series(_message.Message):
    __slots__ = ("series_id", "case_id", "version", "state", "instance_count", "geometry", "volume", "failure_reason", "create_time", "update_time", "trace_id", "duplicate_count", "conflict_count")
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_COUNT_FIELD_NUMBER: _ClassVar[int]
    series_id: str
    case_id: str
    version: int
    state: SeriesState
    instance_count: int
    geometry: _common_pb2.VolumeGeometry
    volume: _common_pb2.BlobRef
    failure_reason: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    trace_id: str
    duplicate_count: int
    conflict_count: int
    def __init__(self, series_id: _Optional[str] = ..., case_id: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[SeriesState, str]] = ..., instance_count: _Optional[int] = ..., geometry: _Optional[_Union[_common_pb2.VolumeGeometry, _Mapping]] = ..., volume: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., failure_reason: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ..., duplicate_count: _Optional[int] = ..., conflict_count: _Optional[int] = ...) -> None: ...

class UploadInstancesRequest(_message.Message):
    __slots__ = ("client_ref", "chunk", "last_chunk", "sha256", "upload_id", "offset")
    CLIENT_REF_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    client_ref: str
    chunk: bytes
    last_chunk: bool
    sha256: str
    upload_id: str
    offset: int
    def __init__(self, client_ref: _Optional[str] = ..., chunk: _Optional[bytes] = ..., last_chunk: _Optional[bool] = ..., sha256: _Optional[str] = ..., upload_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class InstanceReceipt(_message.Message):
    __slots__ = ("client_ref", "series_id", "duplicate", "conflict", "upload_id")
    CLIENT_REF_FIELD_NUMBER: _ClassVar[int]
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    client_ref: str
    series_id: str
    duplicate: bool
    conflict: bool
    upload_id: str
    def __init__(self, client_ref: _Optional[str] = ..., series_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., conflict: _Optional[bool] = ..., upload_id: _Optional[str] = ...) -> None: ...

class GetUploadStatusRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class GetUploadStatusResponse(_message.Message):
    __slots__ = ("upload_id", "committed_offset", "complete", "receipt")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    committed_offset: int
    complete: bool
    receipt: InstanceReceipt
    def __init__(self, upload_id: _Optional[str] = ..., committed_offset: _Optional[int] = ..., complete: _Optional[bool] = ..., receipt: _Optional[_Union[InstanceReceipt, _Mapping]] = ...) -> None: ...

class UploadInstancesResponse(_message.Message):
    __slots__ = ("receipts",)
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    receipts: _containers.RepeatedCompositeFieldContainer[InstanceReceipt]
    def __init__(self, receipts: _Optional[_Iterable[_Union[InstanceReceipt, _Mapping]]] = ...) -> None: ...

class CommitSeriesRequest(_message.Message):
    __slots__ = ("series_id",)
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    series_id: str
    def __init__(self, series_id: _Optional[str] = ...) -> None: ...

class CommitSeriesResponse(_message.Message):
    __slots__ = ("series",)
    SERIES_FIELD_NUMBER: _ClassVar[int]
    series: Series
    def __init__(self, series: _Optional[_Union[Series, _Mapping]] = ...) -> None: ...

class GetSeriesRequest(_message.Message):
    __slots__ = ("series_id",)
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    series_id: str
    def __init__(self, series_id: _Optional[str] = ...) -> None: ...

class GetSeriesResponse(_message.Message):
    __slots__ = ("series",)
    SERIES_FIELD_NUMBER: _ClassVar[int]
    series: Series
    def __init__(self, series: _Optional[_Union[Series, _Mapping]] = ...) -> None: ...

class ListSeriesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSeriesResponse(_message.Message):
    __slots__ = ("series", "next_page_token")
    SERIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    series: _containers.RepeatedCompositeFieldContainer[Series]
    next_page_token: str
    def __init__(self, series: _Optional[_Iterable[_Union[Series, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StreamSeriesInstancesRequest(_message.Message):
    __slots__ = ("series_id", "series_version", "volume_digest", "headers_only")
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_VERSION_FIELD_NUMBER: _ClassVar[int]
    VOLUME_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HEADERS_ONLY_FIELD_NUMBER: _ClassVar[int]
    series_id: str
    series_version: int
    volume_digest: str
    headers_only: bool
    def __init__(self, series_id: _Optional[str] = ..., series_version: _Optional[int] = ..., volume_digest: _Optional[str] = ..., headers_only: _Optional[bool] = ...) -> None: ...

class StreamSeriesInstancesResponse(_message.Message):
    __slots__ = ("series", "instance_count", "instance_index", "offset", "chunk", "last_chunk", "sha256", "instance", "headers_only")
    SERIES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    HEADERS_ONLY_FIELD_NUMBER: _ClassVar[int]
    series: Series
    instance_count: int
    instance_index: int
    offset: int
    chunk: bytes
    last_chunk: bool
    sha256: str
    instance: _common_pb2.BlobRef
    headers_only: bool
    def __init__(self, series: _Optional[_Union[Series, _Mapping]] = ..., instance_count: _Optional[int] = ..., instance_index: _Optional[int] = ..., offset: _Optional[int] = ..., chunk: _Optional[bytes] = ..., last_chunk: _Optional[bool] = ..., sha256: _Optional[str] = ..., instance: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., headers_only: _Optional[bool] = ...) -> None: ...

class DeleteStudyRequest(_message.Message):
    __slots__ = ("study_instance_uid", "case_id", "reason")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    case_id: str
    reason: str
    def __init__(self, study_instance_uid: _Optional[str] = ..., case_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteStudyResponse(_message.Message):
    __slots__ = ("deletion",)
    DELETION_FIELD_NUMBER: _ClassVar[int]
    deletion: Deletion
    def __init__(self, deletion: _Optional[_Union[Deletion, _Mapping]] = ...) -> None: ...

class GetDeletionRequest(_message.Message):
    __slots__ = ("deletion_id",)
    DELETION_ID_FIELD_NUMBER: _ClassVar[int]
    deletion_id: str
    def __init__(self, deletion_id: _Optional[str] = ...) -> None: ...

class GetDeletionResponse(_message.Message):
    __slots__ = ("deletion",)
    DELETION_FIELD_NUMBER: _ClassVar[int]
    deletion: Deletion
    def __init__(self, deletion: _Optional[_Union[Deletion, _Mapping]] = ...) -> None: ...

class DeletionStep(_message.Message):
    __slots__ = ("service", "state", "counts", "last_error", "done_time")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    DONE_TIME_FIELD_NUMBER: _ClassVar[int]
    service: str
    state: _common_pb2.OperationState
    counts: _containers.ScalarMap[str, int]
    last_error: str
    done_time: _timestamp_pb2.Timestamp
    def __init__(self, service: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.OperationState, str]] = ..., counts: _Optional[_Mapping[str, int]] = ..., last_error: _Optional[str] = ..., done_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Deletion(_message.Message):
    __slots__ = ("deletion_id", "case_id", "state", "reason", "requested_by", "steps", "create_time", "update_time")
    DELETION_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    deletion_id: str
    case_id: str
    state: _common_pb2.OperationState
    reason: str
    requested_by: str
    steps: _containers.RepeatedCompositeFieldContainer[DeletionStep]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, deletion_id: _Optional[str] = ..., case_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.OperationState, str]] = ..., reason: _Optional[str] = ..., requested_by: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[DeletionStep, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
