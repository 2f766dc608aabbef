import datetime

from atlasflow.common.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OrganAttention(_message.Message):
    __slots__ = ("organ", "attention_ml", "heatmap_ml", "volume_ml")
    ORGAN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_ML_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_ML_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    organ: _common_pb2.Organ
    attention_ml: float
    heatmap_ml: float
    volume_ml: float
    def __init__(self, organ: _Optional[_Union[_common_pb2.Organ, str]] = ..., attention_ml: _Optional[float] = ..., heatmap_ml: _Optional[float] = ..., volume_ml: _Optional[float] = ...) -> None: ...

class WorklistItem(_message.Message):
    __slots__ = ("case_id", "series_id", "rank", "priority", "organs", "heatmap", "source_job_id", "update_time")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ORGANS_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    series_id: str
    rank: int
    priority: float
    organs: _containers.RepeatedCompositeFieldContainer[OrganAttention]
    heatmap: _common_pb2.BlobRef
    source_job_id: str
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, case_id: _Optional[str] = ..., series_id: _Optional[str] = ..., rank: _Optional[int] = ..., priority: _Optional[float] = ..., organs: _Optional[_Iterable[_Union[OrganAttention, _Mapping]]] = ..., heatmap: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., source_job_id: _Optional[str] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

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

class ListWorklistRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

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
