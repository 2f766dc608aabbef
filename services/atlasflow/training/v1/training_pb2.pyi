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

class TrainingStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_STAGE_UNSPECIFIED: _ClassVar[TrainingStage]
    TRAINING_STAGE_MANIFEST: _ClassVar[TrainingStage]
    TRAINING_STAGE_FINETUNE: _ClassVar[TrainingStage]
    TRAINING_STAGE_VERSION: _ClassVar[TrainingStage]
    TRAINING_STAGE_EVALUATE: _ClassVar[TrainingStage]
    TRAINING_STAGE_GATE: _ClassVar[TrainingStage]
    TRAINING_STAGE_DONE: _ClassVar[TrainingStage]
    TRAINING_STAGE_ROLLOUT: _ClassVar[TrainingStage]
TRAINING_STAGE_UNSPECIFIED: TrainingStage
TRAINING_STAGE_MANIFEST: TrainingStage
TRAINING_STAGE_FINETUNE: TrainingStage
TRAINING_STAGE_VERSION: TrainingStage
TRAINING_STAGE_EVALUATE: TrainingStage
TRAINING_STAGE_GATE: TrainingStage
TRAINING_STAGE_DONE: TrainingStage
TRAINING_STAGE_ROLLOUT: TrainingStage

class ReinferProgress(_message.Message):
    __slots__ = ("cases_queued", "cases_done", "cases_failed", "cases_cancelled", "unknown_cases", "cancelled")
    CASES_QUEUED_FIELD_NUMBER: _ClassVar[int]
    CASES_DONE_FIELD_NUMBER: _ClassVar[int]
    CASES_FAILED_FIELD_NUMBER: _ClassVar[int]
    CASES_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CASES_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cases_queued: int
    cases_done: int
    cases_failed: int
    cases_cancelled: int
    unknown_cases: int
    cancelled: bool
    def __init__(self, cases_queued: _Optional[int] = ..., cases_done: _Optional[int] = ..., cases_failed: _Optional[int] = ..., cases_cancelled: _Optional[int] = ..., unknown_cases: _Optional[int] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("steps", "batch_size", "lr", "crop_size", "checkpoint_every", "autocast", "members", "pseudo_weight")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    CROP_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    AUTOCAST_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    steps: int
    batch_size: int
    lr: float
    crop_size: _containers.RepeatedScalarFieldContainer[int]
    checkpoint_every: int
    autocast: str
    members: _containers.RepeatedScalarFieldContainer[str]
    pseudo_weight: float
    def __init__(self, steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., crop_size: _Optional[_Iterable[int]] = ..., checkpoint_every: _Optional[int] = ..., autocast: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., pseudo_weight: _Optional[float] = ...) -> None: ...

class MemberProgress(_message.Message):
    __slots__ = ("member", "step", "steps", "loss")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    member: str
    step: int
    steps: int
    loss: float
    def __init__(self, member: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("stage", "fraction", "members", "job")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    stage: TrainingStage
    fraction: float
    members: _containers.RepeatedCompositeFieldContainer[MemberProgress]
    job: TrainingJob
    def __init__(self, stage: _Optional[_Union[TrainingStage, str]] = ..., fraction: _Optional[float] = ..., members: _Optional[_Iterable[_Union[MemberProgress, _Mapping]]] = ..., job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("name", "state", "failed_pods", "pods")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILED_PODS_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    failed_pods: int
    pods: _containers.RepeatedCompositeFieldContainer[TrainingJobPod]
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., failed_pods: _Optional[int] = ..., pods: _Optional[_Iterable[_Union[TrainingJobPod, _Mapping]]] = ...) -> None: ...

class TrainingJobPod(_message.Message):
    __slots__ = ("name", "phase", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    phase: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., phase: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LossSummary(_message.Message):
    __slots__ = ("member", "first_loss", "final_loss", "min_loss", "steps", "seconds")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOSS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    MIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    member: str
    first_loss: float
    final_loss: float
    min_loss: float
    steps: int
    seconds: float
    def __init__(self, member: _Optional[str] = ..., first_loss: _Optional[float] = ..., final_loss: _Optional[float] = ..., min_loss: _Optional[float] = ..., steps: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class OrganDice(_message.Message):
    __slots__ = ("organ", "current", "candidate", "ci_low", "ci_high", "cases", "passed")
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    current: float
    candidate: float
    ci_low: float
    ci_high: float
    cases: int
    passed: bool
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., current: _Optional[float] = ..., candidate: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., cases: _Optional[int] = ..., passed: _Optional[bool] = ...) -> None: ...

class GateResult(_message.Message):
    __slots__ = ("accepted", "reason", "margin", "organs")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    ORGANS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    margin: float
    organs: _containers.RepeatedCompositeFieldContainer[OrganDice]
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., margin: _Optional[float] = ..., organs: _Optional[_Iterable[_Union[OrganDice, _Mapping]]] = ...) -> None: ...

class TrainingRun(_message.Message):
    __slots__ = ("run_id", "state", "progress", "hyperparameters", "seed", "parent_version", "manifest_digest", "train_cases", "holdout_cases", "version", "version_digest", "promoted", "gate", "losses", "stage_seconds", "error_reason", "requested_by", "create_time", "update_time", "rollout", "reinfer")
    class StageSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRAIN_CASES_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_CASES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    REINFER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: _common_pb2.OperationState
    progress: TrainingProgress
    hyperparameters: Hyperparameters
    seed: int
    parent_version: str
    manifest_digest: str
    train_cases: int
    holdout_cases: int
    version: str
    version_digest: str
    promoted: bool
    gate: GateResult
    losses: _containers.RepeatedCompositeFieldContainer[LossSummary]
    stage_seconds: _containers.ScalarMap[str, float]
    error_reason: str
    requested_by: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    rollout: str
    reinfer: ReinferProgress
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.OperationState, str]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., seed: _Optional[int] = ..., parent_version: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., train_cases: _Optional[int] = ..., holdout_cases: _Optional[int] = ..., version: _Optional[str] = ..., version_digest: _Optional[str] = ..., promoted: _Optional[bool] = ..., gate: _Optional[_Union[GateResult, _Mapping]] = ..., losses: _Optional[_Iterable[_Union[LossSummary, _Mapping]]] = ..., stage_seconds: _Optional[_Mapping[str, float]] = ..., error_reason: _Optional[str] = ..., requested_by: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rollout: _Optional[str] = ..., reinfer: _Optional[_Union[ReinferProgress, _Mapping]] = ...) -> None: ...

class StartTrainingRunRequest(_message.Message):
    __slots__ = ("hyperparameters", "seed", "holdout_fraction", "holdout_case_ids", "margin", "request_id")
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_CASE_IDS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    hyperparameters: Hyperparameters
    seed: int
    holdout_fraction: float
    holdout_case_ids: _containers.RepeatedScalarFieldContainer[str]
    margin: float
    request_id: str
    def __init__(self, hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., seed: _Optional[int] = ..., holdout_fraction: _Optional[float] = ..., holdout_case_ids: _Optional[_Iterable[str]] = ..., margin: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class StartTrainingRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: TrainingRun
    def __init__(self, run: _Optional[_Union[TrainingRun, _Mapping]] = ...) -> None: ...

class GetTrainingRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetTrainingRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: TrainingRun
    def __init__(self, run: _Optional[_Union[TrainingRun, _Mapping]] = ...) -> None: ...

class ListTrainingRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTrainingRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[TrainingRun]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[TrainingRun, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelTrainingRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class CancelTrainingRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: TrainingRun
    def __init__(self, run: _Optional[_Union[TrainingRun, _Mapping]] = ...) -> None: ...
