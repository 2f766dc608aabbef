from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Organ(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORGAN_UNSPECIFIED: _ClassVar[Organ]
    ORGAN_AORTA: _ClassVar[Organ]
    ORGAN_GALL_BLADDER: _ClassVar[Organ]
    ORGAN_KIDNEY_LEFT: _ClassVar[Organ]
    ORGAN_KIDNEY_RIGHT: _ClassVar[Organ]
    ORGAN_LIVER: _ClassVar[Organ]
    ORGAN_PANCREAS: _ClassVar[Organ]
    ORGAN_POSTCAVA: _ClassVar[Organ]
    ORGAN_SPLEEN: _ClassVar[Organ]
    ORGAN_STOMACH: _ClassVar[Organ]

class OperationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_STATE_UNSPECIFIED: _ClassVar[OperationState]
    OPERATION_STATE_QUEUED: _ClassVar[OperationState]
    OPERATION_STATE_RUNNING: _ClassVar[OperationState]
    OPERATION_STATE_SUCCEEDED: _ClassVar[OperationState]
    OPERATION_STATE_FAILED: _ClassVar[OperationState]
    OPERATION_STATE_CANCELLED: _ClassVar[OperationState]
ORGAN_UNSPECIFIED: Organ
ORGAN_AORTA: Organ
ORGAN_GALL_BLADDER: Organ
ORGAN_KIDNEY_LEFT: Organ
ORGAN_KIDNEY_RIGHT: Organ
ORGAN_LIVER: Organ
ORGAN_PANCREAS: Organ
ORGAN_POSTCAVA: Organ
ORGAN_SPLEEN: Organ
ORGAN_STOMACH: Organ
OPERATION_STATE_UNSPECIFIED: OperationState
OPERATION_STATE_QUEUED: OperationState
OPERATION_STATE_RUNNING: OperationState
OPERATION_STATE_SUCCEEDED: OperationState
OPERATION_STATE_FAILED: OperationState
OPERATION_STATE_CANCELLED: OperationState

class BlobRef(_message.Message):
    __slots__ = ("digest", "size_bytes", "media_type")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size_bytes: int
    media_type: str
    def __init__(self, digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., media_type: _Optional[str] = ...) -> None: ...

class VolumeGeometry(_message.Message):
    __slots__ = ("shape", "affine", "spacing_mm")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    SPACING_MM_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    affine: _containers.RepeatedScalarFieldContainer[float]
    spacing_mm: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., affine: _Optional[_Iterable[float]] = ..., spacing_mm: _Optional[_Iterable[float]] = ...) -> None: ...
