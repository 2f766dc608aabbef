import datetime

from atlasflow.common.v1 import common_pb2 as _common_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STAGE_UNSPECIFIED: _ClassVar[JobStage]
    JOB_STAGE_LOADING: _ClassVar[JobStage]
    JOB_STAGE_INFERENCE: _ClassVar[JobStage]
    JOB_STAGE_POSTPROCESSING: _ClassVar[JobStage]
    JOB_STAGE_HANDOFF: _ClassVar[JobStage]
JOB_STAGE_UNSPECIFIED: JobStage
JOB_STAGE_LOADING: JobStage
JOB_STAGE_INFERENCE: JobStage
JOB_STAGE_POSTPROCESSING: JobStage
JOB_STAGE_HANDOFF: JobStage

class OrganStatistics(_message.Message):
    __slots__ = ("organ", "volume_ml", "attention_ml", "heatmap_ml", "component_count")
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_ML_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_ML_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    volume_ml: float
    attention_ml: float
    heatmap_ml: float
    component_count: int
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., volume_ml: _Optional[float] = ..., attention_ml: _Optional[float] = ..., heatmap_ml: _Optional[float] = ..., component_count: _Optional[int] = ...) -> None: ...

class SegmentationProgress(_message.Message):
    __slots__ = ("stage", "fraction")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    stage: JobStage
    fraction: float
    def __init__(self, stage: _Optional[_Union[JobStage, str]] = ..., fraction: _Optional[float] = ...) -> None: ...

class SegmentationResult(_message.Message):
    __slots__ = ("label_map", "heatmap", "organs", "members", "weights_trained", "inference_seconds")
    LABEL_MAP_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    ORGANS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    label_map: _common_pb2.BlobRef
    heatmap: _common_pb2.BlobRef
    organs: _containers.RepeatedCompositeFieldContainer[OrganStatistics]
    members: _containers.RepeatedScalarFieldContainer[str]
    weights_trained: bool
    inference_seconds: float
    def __init__(self, label_map: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., heatmap: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., organs: _Optional[_Iterable[_Union[OrganStatistics, _Mapping]]] = ..., members: _Optional[_Iterable[str]] = ..., weights_trained: _Optional[bool] = ..., inference_seconds: _Optional[float] = ...) -> None: ...

class SegmentationJob(_message.Message):
    __slots__ = ("job_id", "case_id", "series_id", "series_version", "ensemble_version", "state", "progress", "result", "error_reason", "attempts", "create_time", "update_time", "next_attempt_time")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    case_id: str
    series_id: str
    series_version: int
    ensemble_version: str
    state: _common_pb2.OperationState
    progress: SegmentationProgress
    result: SegmentationResult
    error_reason: str
    attempts: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    next_attempt_time: _timestamp_pb2.Timestamp
    def __init__(self, job_id: _Optional[str] = ..., case_id: _Optional[str] = ..., series_id: _Optional[str] = ..., series_version: _Optional[int] = ..., ensemble_version: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.OperationState, str]] = ..., progress: _Optional[_Union[SegmentationProgress, _Mapping]] = ..., result: _Optional[_Union[SegmentationResult, _Mapping]] = ..., error_reason: _Optional[str] = ..., attempts: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SegmentSeriesRequest(_message.Message):
    __slots__ = ("case_id", "series_id", "series_version", "volume", "ensemble_version", "labelled_organs")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_VERSION_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELLED_ORGANS_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    series_id: str
    series_version: int
    volume: _common_pb2.BlobRef
    ensemble_version: str
    labelled_organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    def __init__(self, case_id: _Optional[str] = ..., series_id: _Optional[str] = ..., series_version: _Optional[int] = ..., volume: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., ensemble_version: _Optional[str] = ..., labelled_organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ...) -> None: ...

class SegmentSeriesResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: SegmentationJob
    def __init__(self, job: _Optional[_Union[SegmentationJob, _Mapping]] = ...) -> None: ...

class GetSegmentationJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetSegmentationJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: SegmentationJob
    def __init__(self, job: _Optional[_Union[SegmentationJob, _Mapping]] = ...) -> None: ...

class ListSegmentationJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "case_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    case_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., case_id: _Optional[str] = ...) -> None: ...

class ListSegmentationJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[SegmentationJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[SegmentationJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelSegmentationJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelSegmentationJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: SegmentationJob
    def __init__(self, job: _Optional[_Union[SegmentationJob, _Mapping]] = ...) -> None: ...

class WaitSegmentationJobRequest(_message.Message):
    __slots__ = ("job_id", "timeout")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    timeout: _duration_pb2.Duration
    def __init__(self, job_id: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WaitSegmentationJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: SegmentationJob
    def __init__(self, job: _Optional[_Union[SegmentationJob, _Mapping]] = ...) -> None: ...

class PurgeStudyRequest(_message.Message):
    __slots__ = ("case_id", "check_digests")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    CHECK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    check_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, case_id: _Optional[str] = ..., check_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class PurgeStudyResponse(_message.Message):
    __slots__ = ("deleted_rows", "released_digests", "referenced_digests")
    class DeletedRowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DELETED_ROWS_FIELD_NUMBER: _ClassVar[int]
    RELEASED_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    REFERENCED_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    deleted_rows: _containers.ScalarMap[str, int]
    released_digests: _containers.RepeatedScalarFieldContainer[str]
    referenced_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_rows: _Optional[_Mapping[str, int]] = ..., released_digests: _Optional[_Iterable[str]] = ..., referenced_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class ActivateEnsembleVersionRequest(_message.Message):
    __slots__ = ("ensemble_version",)
    ENSEMBLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ensemble_version: str
    def __init__(self, ensemble_version: _Optional[str] = ...) -> None: ...

class ActivateEnsembleVersionResponse(_message.Message):
    __slots__ = ("ensemble_version", "model_name", "previous_version", "served_versions", "already_active")
    ENSEMBLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ensemble_version: str
    model_name: str
    previous_version: str
    served_versions: _containers.RepeatedScalarFieldContainer[str]
    already_active: bool
    def __init__(self, ensemble_version: _Optional[str] = ..., model_name: _Optional[str] = ..., previous_version: _Optional[str] = ..., served_versions: _Optional[_Iterable[str]] = ..., already_active: _Optional[bool] = ...) -> None: ...

class ReinferCasesRequest(_message.Message):
    __slots__ = ("ensemble_version", "case_ids")
    ENSEMBLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CASE_IDS_FIELD_NUMBER: _ClassVar[int]
    ensemble_version: str
    case_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ensemble_version: _Optional[str] = ..., case_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReinferCasesResponse(_message.Message):
    __slots__ = ("jobs", "unknown_case_ids")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CASE_IDS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[SegmentationJob]
    unknown_case_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, jobs: _Optional[_Iterable[_Union[SegmentationJob, _Mapping]]] = ..., unknown_case_ids: _Optional[_Iterable[str]] = ...) -> None: ...
