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

class LabelSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_SOURCE_UNSPECIFIED: _ClassVar[LabelSource]
    LABEL_SOURCE_AI: _ClassVar[LabelSource]
    LABEL_SOURCE_RADIOLOGIST: _ClassVar[LabelSource]
    LABEL_SOURCE_ORIGINAL: _ClassVar[LabelSource]

class ExportIdentity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_IDENTITY_UNSPECIFIED: _ClassVar[ExportIdentity]
    EXPORT_IDENTITY_DEIDENTIFIED: _ClassVar[ExportIdentity]
    EXPORT_IDENTITY_IDENTIFIED: _ClassVar[ExportIdentity]

class DeidentificationDates(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEIDENTIFICATION_DATES_UNSPECIFIED: _ClassVar[DeidentificationDates]
    DEIDENTIFICATION_DATES_REMOVED: _ClassVar[DeidentificationDates]
    DEIDENTIFICATION_DATES_MODIFIED: _ClassVar[DeidentificationDates]
    DEIDENTIFICATION_DATES_FULL: _ClassVar[DeidentificationDates]

class DicomSegState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DICOM_SEG_STATE_UNSPECIFIED: _ClassVar[DicomSegState]
    DICOM_SEG_STATE_WRITTEN: _ClassVar[DicomSegState]
    DICOM_SEG_STATE_SENT: _ClassVar[DicomSegState]
    DICOM_SEG_STATE_SEND_FAILED: _ClassVar[DicomSegState]
    DICOM_SEG_STATE_REFUSED: _ClassVar[DicomSegState]
    DICOM_SEG_STATE_FAILED: _ClassVar[DicomSegState]
LABEL_SOURCE_UNSPECIFIED: LabelSource
LABEL_SOURCE_AI: LabelSource
LABEL_SOURCE_RADIOLOGIST: LabelSource
LABEL_SOURCE_ORIGINAL: LabelSource
EXPORT_IDENTITY_UNSPECIFIED: ExportIdentity
EXPORT_IDENTITY_DEIDENTIFIED: ExportIdentity
EXPORT_IDENTITY_IDENTIFIED: ExportIdentity
DEIDENTIFICATION_DATES_UNSPECIFIED: DeidentificationDates
DEIDENTIFICATION_DATES_REMOVED: DeidentificationDates
DEIDENTIFICATION_DATES_MODIFIED: DeidentificationDates
DEIDENTIFICATION_DATES_FULL: DeidentificationDates
DICOM_SEG_STATE_UNSPECIFIED: DicomSegState
DICOM_SEG_STATE_WRITTEN: DicomSegState
DICOM_SEG_STATE_SENT: DicomSegState
DICOM_SEG_STATE_SEND_FAILED: DicomSegState
DICOM_SEG_STATE_REFUSED: DicomSegState
DICOM_SEG_STATE_FAILED: DicomSegState

class Provenance(_message.Message):
    __slots__ = ("source", "model_version", "job_id", "reviewer", "weights_trained")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    source: LabelSource
    model_version: str
    job_id: str
    reviewer: str
    weights_trained: bool
    def __init__(self, source: _Optional[_Union[LabelSource, str]] = ..., model_version: _Optional[str] = ..., job_id: _Optional[str] = ..., reviewer: _Optional[str] = ..., weights_trained: _Optional[bool] = ...) -> None: ...

class LabelVersion(_message.Message):
    __slots__ = ("version_id", "case_id", "parent_version_id", "label_map", "ct", "provenance", "organs", "create_time", "geometry", "organ_provenance", "review_seconds", "organ_review_seconds", "organ_changed_ml")
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_MAP_FIELD_NUMBER: _ClassVar[int]
    CT_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    ORGANS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    ORGAN_PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    REVIEW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ORGAN_REVIEW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ORGAN_CHANGED_ML_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    case_id: str
    parent_version_id: str
    label_map: _common_pb2.BlobRef
    ct: _common_pb2.BlobRef
    provenance: Provenance
    organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    create_time: _timestamp_pb2.Timestamp
    geometry: _common_pb2.VolumeGeometry
    organ_provenance: _containers.RepeatedCompositeFieldContainer[OrganProvenance]
    review_seconds: float
    organ_review_seconds: _containers.RepeatedCompositeFieldContainer[OrganReviewTime]
    organ_changed_ml: _containers.RepeatedCompositeFieldContainer[OrganChangedVolume]
    def __init__(self, version_id: _Optional[str] = ..., case_id: _Optional[str] = ..., parent_version_id: _Optional[str] = ..., label_map: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., ct: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., geometry: _Optional[_Union[_common_pb2.VolumeGeometry, _Mapping]] = ..., organ_provenance: _Optional[_Iterable[_Union[OrganProvenance, _Mapping]]] = ..., review_seconds: _Optional[float] = ..., organ_review_seconds: _Optional[_Iterable[_Union[OrganReviewTime, _Mapping]]] = ..., organ_changed_ml: _Optional[_Iterable[_Union[OrganChangedVolume, _Mapping]]] = ...) -> None: ...

class OrganChangedVolume(_message.Message):
    __slots__ = ("organ", "ml")
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    ML_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    ml: float
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., ml: _Optional[float] = ...) -> None: ...

class OrganReviewTime(_message.Message):
    __slots__ = ("organ", "seconds")
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    seconds: float
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class OrganProvenance(_message.Message):
    __slots__ = ("organ", "provenance", "version_id")
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    provenance: Provenance
    version_id: str
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., version_id: _Optional[str] = ...) -> None: ...

class CreateLabelVersionRequest(_message.Message):
    __slots__ = ("case_id", "expected_parent_version_id", "label_map", "ct", "provenance", "request_id", "labelled_organs")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PARENT_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_MAP_FIELD_NUMBER: _ClassVar[int]
    CT_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELLED_ORGANS_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    expected_parent_version_id: str
    label_map: _common_pb2.BlobRef
    ct: _common_pb2.BlobRef
    provenance: Provenance
    request_id: str
    labelled_organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    def __init__(self, case_id: _Optional[str] = ..., expected_parent_version_id: _Optional[str] = ..., label_map: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., ct: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., request_id: _Optional[str] = ..., labelled_organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ...) -> None: ...

class CreateLabelVersionResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: LabelVersion
    def __init__(self, version: _Optional[_Union[LabelVersion, _Mapping]] = ...) -> None: ...

class GetLabelVersionRequest(_message.Message):
    __slots__ = ("version_id",)
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    def __init__(self, version_id: _Optional[str] = ...) -> None: ...

class GetLabelVersionResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: LabelVersion
    def __init__(self, version: _Optional[_Union[LabelVersion, _Mapping]] = ...) -> None: ...

class ListLabelVersionsRequest(_message.Message):
    __slots__ = ("case_id", "page_size", "page_token")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    page_size: int
    page_token: str
    def __init__(self, case_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLabelVersionsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[LabelVersion]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[LabelVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportProgress(_message.Message):
    __slots__ = ("cases_done", "cases_total")
    CASES_DONE_FIELD_NUMBER: _ClassVar[int]
    CASES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    cases_done: int
    cases_total: int
    def __init__(self, cases_done: _Optional[int] = ..., cases_total: _Optional[int] = ...) -> None: ...

class ExportJob(_message.Message):
    __slots__ = ("job_id", "state", "progress", "destination_uri", "error_reason", "create_time", "include_dicom_seg", "dicom_seg_outcomes", "pacs_destination_id", "identity", "deidentification")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_URI_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DICOM_SEG_FIELD_NUMBER: _ClassVar[int]
    DICOM_SEG_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    PACS_DESTINATION_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DEIDENTIFICATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: _common_pb2.OperationState
    progress: ExportProgress
    destination_uri: str
    error_reason: str
    create_time: _timestamp_pb2.Timestamp
    include_dicom_seg: bool
    dicom_seg_outcomes: _containers.RepeatedCompositeFieldContainer[DicomSegOutcome]
    pacs_destination_id: str
    identity: ExportIdentity
    deidentification: DeidentificationOptions
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.OperationState, str]] = ..., progress: _Optional[_Union[ExportProgress, _Mapping]] = ..., destination_uri: _Optional[str] = ..., error_reason: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., include_dicom_seg: _Optional[bool] = ..., dicom_seg_outcomes: _Optional[_Iterable[_Union[DicomSegOutcome, _Mapping]]] = ..., pacs_destination_id: _Optional[str] = ..., identity: _Optional[_Union[ExportIdentity, str]] = ..., deidentification: _Optional[_Union[DeidentificationOptions, _Mapping]] = ...) -> None: ...

class DeidentificationOptions(_message.Message):
    __slots__ = ("dates", "clean_descriptors")
    DATES_FIELD_NUMBER: _ClassVar[int]
    CLEAN_DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    dates: DeidentificationDates
    clean_descriptors: bool
    def __init__(self, dates: _Optional[_Union[DeidentificationDates, str]] = ..., clean_descriptors: _Optional[bool] = ...) -> None: ...

class ExportDatasetRequest(_message.Message):
    __slots__ = ("case_ids", "destination_uri", "include_dicom_seg", "pacs_destination_id", "identity", "deidentification")
    CASE_IDS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_URI_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DICOM_SEG_FIELD_NUMBER: _ClassVar[int]
    PACS_DESTINATION_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DEIDENTIFICATION_FIELD_NUMBER: _ClassVar[int]
    case_ids: _containers.RepeatedScalarFieldContainer[str]
    destination_uri: str
    include_dicom_seg: bool
    pacs_destination_id: str
    identity: ExportIdentity
    deidentification: DeidentificationOptions
    def __init__(self, case_ids: _Optional[_Iterable[str]] = ..., destination_uri: _Optional[str] = ..., include_dicom_seg: _Optional[bool] = ..., pacs_destination_id: _Optional[str] = ..., identity: _Optional[_Union[ExportIdentity, str]] = ..., deidentification: _Optional[_Union[DeidentificationOptions, _Mapping]] = ...) -> None: ...

class DicomSegOutcome(_message.Message):
    __slots__ = ("case_id", "version_id", "state", "path", "sha256", "organs", "referenced_instance_count", "reason", "reason_metadata", "c_store_status")
    class ReasonMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ORGANS_FIELD_NUMBER: _ClassVar[int]
    REFERENCED_INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REASON_METADATA_FIELD_NUMBER: _ClassVar[int]
    C_STORE_STATUS_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    version_id: str
    state: DicomSegState
    path: str
    sha256: str
    organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    referenced_instance_count: int
    reason: str
    reason_metadata: _containers.ScalarMap[str, str]
    c_store_status: int
    def __init__(self, case_id: _Optional[str] = ..., version_id: _Optional[str] = ..., state: _Optional[_Union[DicomSegState, str]] = ..., path: _Optional[str] = ..., sha256: _Optional[str] = ..., organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ..., referenced_instance_count: _Optional[int] = ..., reason: _Optional[str] = ..., reason_metadata: _Optional[_Mapping[str, str]] = ..., c_store_status: _Optional[int] = ...) -> None: ...

class ExportDatasetResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: ExportJob
    def __init__(self, job: _Optional[_Union[ExportJob, _Mapping]] = ...) -> None: ...

class GetExportJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetExportJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: ExportJob
    def __init__(self, job: _Optional[_Union[ExportJob, _Mapping]] = ...) -> None: ...

class OrganRevision(_message.Message):
    __slots__ = ("organ", "mask_blob", "xor_delta", "review_seconds")
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    MASK_BLOB_FIELD_NUMBER: _ClassVar[int]
    XOR_DELTA_FIELD_NUMBER: _ClassVar[int]
    REVIEW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    mask_blob: _common_pb2.BlobRef
    xor_delta: bytes
    review_seconds: float
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., mask_blob: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., xor_delta: _Optional[bytes] = ..., review_seconds: _Optional[float] = ...) -> None: ...

class ReviseLabelsRequest(_message.Message):
    __slots__ = ("case_id", "expected_parent_version_id", "revisions", "request_id", "review_seconds")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PARENT_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    expected_parent_version_id: str
    revisions: _containers.RepeatedCompositeFieldContainer[OrganRevision]
    request_id: str
    review_seconds: float
    def __init__(self, case_id: _Optional[str] = ..., expected_parent_version_id: _Optional[str] = ..., revisions: _Optional[_Iterable[_Union[OrganRevision, _Mapping]]] = ..., request_id: _Optional[str] = ..., review_seconds: _Optional[float] = ...) -> None: ...

class ReviseLabelsResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: LabelVersion
    def __init__(self, version: _Optional[_Union[LabelVersion, _Mapping]] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("record_id", "time", "principal", "method", "case_id", "version_ids", "job_id", "outcome")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_IDS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    time: _timestamp_pb2.Timestamp
    principal: str
    method: str
    case_id: str
    version_ids: _containers.RepeatedScalarFieldContainer[str]
    job_id: str
    outcome: str
    def __init__(self, record_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ..., method: _Optional[str] = ..., case_id: _Optional[str] = ..., version_ids: _Optional[_Iterable[str]] = ..., job_id: _Optional[str] = ..., outcome: _Optional[str] = ...) -> None: ...

class ListAuditRecordsRequest(_message.Message):
    __slots__ = ("case_id", "principal", "page_size", "page_token")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    principal: str
    page_size: int
    page_token: str
    def __init__(self, case_id: _Optional[str] = ..., principal: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditRecordsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

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

class StreamLabelVersionSegRequest(_message.Message):
    __slots__ = ("case_id", "version_id", "headers_only")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEADERS_ONLY_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    version_id: str
    headers_only: bool
    def __init__(self, case_id: _Optional[str] = ..., version_id: _Optional[str] = ..., headers_only: _Optional[bool] = ...) -> None: ...

class StreamLabelVersionSegResponse(_message.Message):
    __slots__ = ("version", "size_bytes", "offset", "chunk", "last_chunk", "sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    version: LabelVersion
    size_bytes: int
    offset: int
    chunk: bytes
    last_chunk: bool
    sha256: str
    def __init__(self, version: _Optional[_Union[LabelVersion, _Mapping]] = ..., size_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., chunk: _Optional[bytes] = ..., last_chunk: _Optional[bool] = ..., sha256: _Optional[str] = ...) -> None: ...
