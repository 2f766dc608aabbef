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

class WorklistStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKLIST_STATUS_UNSPECIFIED: _ClassVar[WorklistStatus]
    WORKLIST_STATUS_PENDING: _ClassVar[WorklistStatus]
    WORKLIST_STATUS_LEASED: _ClassVar[WorklistStatus]
    WORKLIST_STATUS_ACCEPTED: _ClassVar[WorklistStatus]
    WORKLIST_STATUS_REVISED: _ClassVar[WorklistStatus]

class ReviewOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_OUTCOME_UNSPECIFIED: _ClassVar[ReviewOutcome]
    REVIEW_OUTCOME_ACCEPTED: _ClassVar[ReviewOutcome]
    REVIEW_OUTCOME_REVISED: _ClassVar[ReviewOutcome]

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_OPEN: _ClassVar[RoundState]
    ROUND_STATE_CLOSED: _ClassVar[RoundState]
WORKLIST_STATUS_UNSPECIFIED: WorklistStatus
WORKLIST_STATUS_PENDING: WorklistStatus
WORKLIST_STATUS_LEASED: WorklistStatus
WORKLIST_STATUS_ACCEPTED: WorklistStatus
WORKLIST_STATUS_REVISED: WorklistStatus
REVIEW_OUTCOME_UNSPECIFIED: ReviewOutcome
REVIEW_OUTCOME_ACCEPTED: ReviewOutcome
REVIEW_OUTCOME_REVISED: ReviewOutcome
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_OPEN: RoundState
ROUND_STATE_CLOSED: RoundState

class VoxelBox(_message.Message):
    __slots__ = ("x_min", "y_min", "z_min", "x_max", "y_max", "z_max")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    Z_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    Z_MAX_FIELD_NUMBER: _ClassVar[int]
    x_min: int
    y_min: int
    z_min: int
    x_max: int
    y_max: int
    z_max: int
    def __init__(self, x_min: _Optional[int] = ..., y_min: _Optional[int] = ..., z_min: _Optional[int] = ..., x_max: _Optional[int] = ..., y_max: _Optional[int] = ..., z_max: _Optional[int] = ...) -> None: ...

class WorldBox(_message.Message):
    __slots__ = ("x_min_mm", "y_min_mm", "z_min_mm", "x_max_mm", "y_max_mm", "z_max_mm")
    X_MIN_MM_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_MM_FIELD_NUMBER: _ClassVar[int]
    Z_MIN_MM_FIELD_NUMBER: _ClassVar[int]
    X_MAX_MM_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_MM_FIELD_NUMBER: _ClassVar[int]
    Z_MAX_MM_FIELD_NUMBER: _ClassVar[int]
    x_min_mm: float
    y_min_mm: float
    z_min_mm: float
    x_max_mm: float
    y_max_mm: float
    z_max_mm: float
    def __init__(self, x_min_mm: _Optional[float] = ..., y_min_mm: _Optional[float] = ..., z_min_mm: _Optional[float] = ..., x_max_mm: _Optional[float] = ..., y_max_mm: _Optional[float] = ..., z_max_mm: _Optional[float] = ...) -> None: ...

class SliceRange(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class AttentionPointer(_message.Message):
    __slots__ = ("voxel_box", "world_box", "slices")
    VOXEL_BOX_FIELD_NUMBER: _ClassVar[int]
    WORLD_BOX_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    voxel_box: VoxelBox
    world_box: WorldBox
    slices: SliceRange
    def __init__(self, voxel_box: _Optional[_Union[VoxelBox, _Mapping]] = ..., world_box: _Optional[_Union[WorldBox, _Mapping]] = ..., slices: _Optional[_Union[SliceRange, _Mapping]] = ...) -> None: ...

class OrganAttention(_message.Message):
    __slots__ = ("organ", "attention_ml", "heatmap_ml", "volume_ml", "reasons", "pointer", "score", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_ML_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_ML_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    POINTER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    attention_ml: float
    heatmap_ml: float
    volume_ml: float
    reasons: _containers.RepeatedScalarFieldContainer[str]
    pointer: AttentionPointer
    score: float
    features: _containers.ScalarMap[str, float]
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., attention_ml: _Optional[float] = ..., heatmap_ml: _Optional[float] = ..., volume_ml: _Optional[float] = ..., reasons: _Optional[_Iterable[str]] = ..., pointer: _Optional[_Union[AttentionPointer, _Mapping]] = ..., score: _Optional[float] = ..., features: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("reviewer", "start_time", "expire_time")
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    reviewer: str
    start_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, reviewer: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Review(_message.Message):
    __slots__ = ("outcome", "reviewer", "label_version_id", "complete_time", "round_number")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    LABEL_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    outcome: ReviewOutcome
    reviewer: str
    label_version_id: str
    complete_time: _timestamp_pb2.Timestamp
    round_number: int
    def __init__(self, outcome: _Optional[_Union[ReviewOutcome, str]] = ..., reviewer: _Optional[str] = ..., label_version_id: _Optional[str] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., round_number: _Optional[int] = ...) -> None: ...

class WorklistItem(_message.Message):
    __slots__ = ("case_id", "series_id", "rank", "priority", "organs", "heatmap", "source_job_id", "update_time", "status", "round_number", "lease", "review", "labelled_organs", "label_version_id", "human_decided_organs")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ORGANS_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    LABELLED_ORGANS_FIELD_NUMBER: _ClassVar[int]
    LABEL_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    HUMAN_DECIDED_ORGANS_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    series_id: str
    rank: int
    priority: float
    organs: _containers.RepeatedCompositeFieldContainer[OrganAttention]
    heatmap: _common_pb2.BlobRef
    source_job_id: str
    update_time: _timestamp_pb2.Timestamp
    status: WorklistStatus
    round_number: int
    lease: Lease
    review: Review
    labelled_organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    label_version_id: str
    human_decided_organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    def __init__(self, case_id: _Optional[str] = ..., series_id: _Optional[str] = ..., rank: _Optional[int] = ..., priority: _Optional[float] = ..., organs: _Optional[_Iterable[_Union[OrganAttention, _Mapping]]] = ..., heatmap: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., source_job_id: _Optional[str] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[WorklistStatus, str]] = ..., round_number: _Optional[int] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., review: _Optional[_Union[Review, _Mapping]] = ..., labelled_organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ..., label_version_id: _Optional[str] = ..., human_decided_organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("round_number", "budget_fraction", "candidate_count", "case_count", "accepted_count", "revised_count", "unreviewed_count", "state", "creator", "create_time", "close_time")
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CASE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REVISED_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNREVIEWED_COUNT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CLOSE_TIME_FIELD_NUMBER: _ClassVar[int]
    round_number: int
    budget_fraction: float
    candidate_count: int
    case_count: int
    accepted_count: int
    revised_count: int
    unreviewed_count: int
    state: RoundState
    creator: str
    create_time: _timestamp_pb2.Timestamp
    close_time: _timestamp_pb2.Timestamp
    def __init__(self, round_number: _Optional[int] = ..., budget_fraction: _Optional[float] = ..., candidate_count: _Optional[int] = ..., case_count: _Optional[int] = ..., accepted_count: _Optional[int] = ..., revised_count: _Optional[int] = ..., unreviewed_count: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., creator: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., close_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubmitAttentionRequest(_message.Message):
    __slots__ = ("case_id", "series_id", "source_job_id", "organs", "heatmap", "labelled_organs")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANS_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    LABELLED_ORGANS_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    series_id: str
    source_job_id: str
    organs: _containers.RepeatedCompositeFieldContainer[OrganAttention]
    heatmap: _common_pb2.BlobRef
    labelled_organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    def __init__(self, case_id: _Optional[str] = ..., series_id: _Optional[str] = ..., source_job_id: _Optional[str] = ..., organs: _Optional[_Iterable[_Union[OrganAttention, _Mapping]]] = ..., heatmap: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., labelled_organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ...) -> None: ...

class SubmitAttentionResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: WorklistItem
    def __init__(self, item: _Optional[_Union[WorklistItem, _Mapping]] = ...) -> None: ...

class RecordLabelVersionRequest(_message.Message):
    __slots__ = ("case_id", "label_version_id", "version_number", "human_decided_organs", "revised_organs", "reviewer", "human_organ_geometry", "organ_changes")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_NUMBER_FIELD_NUMBER: _ClassVar[int]
    HUMAN_DECIDED_ORGANS_FIELD_NUMBER: _ClassVar[int]
    REVISED_ORGANS_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    HUMAN_ORGAN_GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    ORGAN_CHANGES_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    label_version_id: str
    version_number: int
    human_decided_organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    revised_organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    reviewer: str
    human_organ_geometry: _containers.RepeatedCompositeFieldContainer[OrganGeometry]
    organ_changes: _containers.RepeatedCompositeFieldContainer[OrganChange]
    def __init__(self, case_id: _Optional[str] = ..., label_version_id: _Optional[str] = ..., version_number: _Optional[int] = ..., human_decided_organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ..., revised_organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ..., reviewer: _Optional[str] = ..., human_organ_geometry: _Optional[_Iterable[_Union[OrganGeometry, _Mapping]]] = ..., organ_changes: _Optional[_Iterable[_Union[OrganChange, _Mapping]]] = ...) -> None: ...

class OrganChange(_message.Message):
    __slots__ = ("organ", "changed_ml")
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    CHANGED_ML_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    changed_ml: float
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., changed_ml: _Optional[float] = ...) -> None: ...

class OrganGeometry(_message.Message):
    __slots__ = ("organ", "volume_ml", "centroid_mm", "fov_cut")
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    CENTROID_MM_FIELD_NUMBER: _ClassVar[int]
    FOV_CUT_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    volume_ml: float
    centroid_mm: _containers.RepeatedScalarFieldContainer[float]
    fov_cut: bool
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., volume_ml: _Optional[float] = ..., centroid_mm: _Optional[_Iterable[float]] = ..., fov_cut: _Optional[bool] = ...) -> None: ...

class GetPopulationPriorRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPopulationPriorResponse(_message.Message):
    __slots__ = ("prior_json", "learned_cases")
    PRIOR_JSON_FIELD_NUMBER: _ClassVar[int]
    LEARNED_CASES_FIELD_NUMBER: _ClassVar[int]
    prior_json: str
    learned_cases: int
    def __init__(self, prior_json: _Optional[str] = ..., learned_cases: _Optional[int] = ...) -> None: ...

class RecordLabelVersionResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: WorklistItem
    def __init__(self, item: _Optional[_Union[WorklistItem, _Mapping]] = ...) -> None: ...

class ListWorklistRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "organs", "round_number", "statuses")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ORGANS_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    organs: _containers.RepeatedScalarFieldContainer[_common_pb2.Organ]
    round_number: int
    statuses: _containers.RepeatedScalarFieldContainer[WorklistStatus]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., organs: _Optional[_Iterable[_Union[_common_pb2.Organ, str]]] = ..., round_number: _Optional[int] = ..., statuses: _Optional[_Iterable[_Union[WorklistStatus, str]]] = ...) -> None: ...

class ListWorklistResponse(_message.Message):
    __slots__ = ("items", "next_page_token", "total_size")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[WorklistItem]
    next_page_token: str
    total_size: int
    def __init__(self, items: _Optional[_Iterable[_Union[WorklistItem, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class GetWorklistItemRequest(_message.Message):
    __slots__ = ("case_id",)
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    def __init__(self, case_id: _Optional[str] = ...) -> None: ...

class GetWorklistItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: WorklistItem
    def __init__(self, item: _Optional[_Union[WorklistItem, _Mapping]] = ...) -> None: ...

class LeaseCaseRequest(_message.Message):
    __slots__ = ("case_id", "lease_duration")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    lease_duration: _duration_pb2.Duration
    def __init__(self, case_id: _Optional[str] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LeaseCaseResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: WorklistItem
    def __init__(self, item: _Optional[_Union[WorklistItem, _Mapping]] = ...) -> None: ...

class LeaseNextCaseRequest(_message.Message):
    __slots__ = ("lease_duration",)
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    lease_duration: _duration_pb2.Duration
    def __init__(self, lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LeaseNextCaseResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: WorklistItem
    def __init__(self, item: _Optional[_Union[WorklistItem, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("case_id", "lease_duration")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    lease_duration: _duration_pb2.Duration
    def __init__(self, case_id: _Optional[str] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: WorklistItem
    def __init__(self, item: _Optional[_Union[WorklistItem, _Mapping]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("case_id",)
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    def __init__(self, case_id: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: WorklistItem
    def __init__(self, item: _Optional[_Union[WorklistItem, _Mapping]] = ...) -> None: ...

class CompleteReviewRequest(_message.Message):
    __slots__ = ("case_id", "outcome", "label_version_id")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LABEL_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    outcome: ReviewOutcome
    label_version_id: str
    def __init__(self, case_id: _Optional[str] = ..., outcome: _Optional[_Union[ReviewOutcome, str]] = ..., label_version_id: _Optional[str] = ...) -> None: ...

class CompleteReviewResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: WorklistItem
    def __init__(self, item: _Optional[_Union[WorklistItem, _Mapping]] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("budget_fraction", "request_id")
    BUDGET_FRACTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    budget_fraction: float
    request_id: str
    def __init__(self, budget_fraction: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class StartRoundResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: Round
    def __init__(self, round: _Optional[_Union[Round, _Mapping]] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round_number",)
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    round_number: int
    def __init__(self, round_number: _Optional[int] = ...) -> None: ...

class GetRoundResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: Round
    def __init__(self, round: _Optional[_Union[Round, _Mapping]] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds", "next_page_token", "total_size")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[Round]
    next_page_token: str
    total_size: int
    def __init__(self, rounds: _Optional[_Iterable[_Union[Round, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

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
