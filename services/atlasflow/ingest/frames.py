"""Frame records of a CT series: what one frame (slice) says about itself (`FrameRef`) and
where its pixels are decoded from (`FrameSource`); `frame_refs` reads them from a pydicom
Dataset, single- or multi-frame (see `atlasflow.ingest.assemble` for the attributes read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, SupportsFloat, TypedDict, cast

import numpy as np
import numpy.typing as npt

from atlasflow.common.errors import InvalidArgument

if TYPE_CHECKING:  # pydicom is imported lazily: `atlasflow convert` may not need it at all
    from pydicom.dataset import Dataset

DOMAIN = "atlasflow.ingest"

#: Same limits as reception's (`atlasflow.ingest.dicom`), applied to every frame (the per-frame
#: functional groups of a multi-frame instance are only read here).
MAX_RESCALE_SLOPE = 1e4
MAX_RESCALE_INTERCEPT = 1e6
#: Most frames one instance may announce: NIfTI-1's largest axis.
MAX_FRAMES = 32767

_ENHANCED_CT = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}


class FrameSource(Protocol):
    """Decodes one frame's stored values, (rows, columns), sign-corrected, not rescaled."""

    def read(self) -> npt.NDArray[Any]: ...


@dataclass
class FrameRef:
    """Header facts of one frame (one slice) plus where to decode its pixels.

    ipp: (3,) mm LPS, (0020,0032). iop: (6,) (0020,0037). pixel_spacing: (2,) mm, (row
    spacing, column spacing) as (0028,0030). padding: stored-value range (low, high) from
    (0028,0120)/(0028,0121), or None. frame_number: 1-based within its instance.
    """

    rows: int
    cols: int
    ipp: npt.NDArray[np.float64]
    iop: npt.NDArray[np.float64]
    pixel_spacing: npt.NDArray[np.float64]
    slope: float
    intercept: float
    source: FrameSource
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    sop_instance_uid: str = ""
    frame_number: int = 1
    thickness_mm: float | None = None
    spacing_between_slices_mm: float | None = None
    padding: tuple[float, float] | None = None
    bits_stored: int = 16
    signed: bool = True
    rescale_type: str = ""
    gantry_tilt_deg: float | None = None
    multiframe: bool = False


def series_error(reason: str, message: str, **metadata: str) -> InvalidArgument:
    """An `InvalidArgument` of series assembly (metadata ``check`` names the failed test)."""
    return InvalidArgument(reason, message, domain=DOMAIN, metadata=metadata)


def _floats(ds: Dataset | None, keyword: str, n: int, index: int | str) -> npt.NDArray[np.float64]:
    value = ds.get(keyword) if ds is not None else None
    try:
        arr = np.array([float(v) for v in value or ()], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise series_error(
            "INCONSISTENT_SERIES",
            f"slice {index}: {keyword} missing or malformed",
            check="geometry_missing",
            attribute=keyword,
        )
    return arr


def _number(value: object, default: float | None) -> float | None:
    if value in (None, ""):
        return default
    try:
        return float(cast("SupportsFloat | str", value))  # DS, IS, int, float or str values
    except (TypeError, ValueError):
        return default


# ---------------------------------------------------------------- datasets -> FrameRefs


class DatasetFrame:
    """`FrameSource` over an in-memory pydicom Dataset (``file_meta.TransferSyntaxUID`` set)."""

    def __init__(self, ds: Dataset, index: int | None) -> None:
        self.ds = ds
        self.index = index

    def read(self) -> npt.NDArray[Any]:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            ts = self.ds.file_meta.TransferSyntaxUID
            array, _ = get_decoder(ts).as_array(self.ds, index=self.index)
        except Exception as exc:
            raise series_error(
                "CORRUPT_DICOM",
                f"pixel data does not decode ({type(exc).__name__})",
                check="pixel_decode",
            ) from None
        return array


def _item(ds: Dataset, sequence: str) -> Dataset | None:
    seq = ds.get(sequence)
    return seq[0] if seq else None


def _functional(per_frame: Dataset | None, shared: Dataset | None, top: Dataset, sequence: str, keyword: str) -> object:
    """`keyword` from `sequence` in the per-frame group, else the shared group, else top."""
    for group in (per_frame, shared):
        if group is not None:
            item = _item(group, sequence)
            if item is not None and keyword in item:
                return item.get(keyword)
    return top.get(keyword)


def _padding(ds: Dataset) -> tuple[float, float] | None:
    value = _number(ds.get("PixelPaddingValue"), None)
    if value is None:
        return None
    limit = _number(ds.get("PixelPaddingRangeLimit"), None)
    if limit is None:
        return (value, value)
    return (min(value, limit), max(value, limit))


def is_multiframe(ds: Dataset) -> bool:
    """True for multi-frame or Enhanced / Legacy Converted Enhanced CT instances."""
    frames = int(_number(ds.get("NumberOfFrames"), 1) or 1)
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop and getattr(ds, "file_meta", None) is not None:
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return frames > 1 or sop in _ENHANCED_CT


class _FrameCommon(TypedDict):
    """The `FrameRef` fields every frame of one instance shares."""

    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uid: str
    padding: tuple[float, float] | None
    bits_stored: int
    signed: bool
    gantry_tilt_deg: float | None
    spacing_between_slices_mm: float | None


def frame_refs(ds: Dataset, source_for: object = None, index: int = 0) -> list[FrameRef]:
    """One `FrameRef` per frame of `ds` (header only; pixels decoded later).

    `source_for(ds, frame_index | None) -> FrameSource` builds the pixel readers (default:
    `DatasetFrame` over `ds` itself). `index`: the instance's position, for messages.
    An attribute pydicom cannot convert (unknown VR, a DS that is not a number, a broken
    sequence: it converts lazily, here) is CORRUPT_DICOM (check ``elements``); a
    RescaleSlope/Intercept that is not finite or beyond the reception limits, CORRUPT_DICOM
    (check ``rescale``).
    """
    try:
        refs = _frame_refs(ds, source_for, index)
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's lazy conversion: NotImplementedError, ValueError, BytesLengthException...
        raise series_error(
            "CORRUPT_DICOM", f"slice {index}: a data element cannot be decoded ({type(exc).__name__})", check="elements"
        ) from None
    for ref in refs:
        if not (abs(ref.slope) <= MAX_RESCALE_SLOPE and abs(ref.intercept) <= MAX_RESCALE_INTERCEPT):
            raise series_error(
                "CORRUPT_DICOM", f"slice {index}: RescaleSlope/Intercept is not a usable number", check="rescale"
            )
    return refs


def _frame_refs(ds: Dataset, source_for: object, index: int) -> list[FrameRef]:
    make = source_for if callable(source_for) else DatasetFrame
    common = _FrameCommon(
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        padding=_padding(ds),
        bits_stored=int(_number(ds.get("BitsStored"), 16) or 16),
        signed=int(_number(ds.get("PixelRepresentation"), 0) or 0) == 1,
        gantry_tilt_deg=_number(ds.get("GantryDetectorTilt"), None),
        spacing_between_slices_mm=_number(ds.get("SpacingBetweenSlices"), None),
    )
    if not common["sop_instance_uid"] and getattr(ds, "file_meta", None) is not None:
        common["sop_instance_uid"] = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise series_error(
            "INCONSISTENT_SERIES", f"slice {index}: Rows/Columns missing", check="geometry_missing", attribute="Rows"
        ) from None
    if rows <= 0 or cols <= 0:  # an empty image (reception refuses it; a file read by `convert` may not)
        raise series_error(
            "CORRUPT_DICOM", f"slice {index}: image of {rows}x{cols} pixels", check="image_pixel", attribute="Rows"
        )
    if not is_multiframe(ds):
        return [
            FrameRef(
                rows=rows,
                cols=cols,
                ipp=_floats(ds, "ImagePositionPatient", 3, index),
                iop=_floats(ds, "ImageOrientationPatient", 6, index),
                pixel_spacing=_floats(ds, "PixelSpacing", 2, index),
                slope=_number(ds.get("RescaleSlope"), 1.0) or 1.0,
                intercept=_number(ds.get("RescaleIntercept"), 0.0) or 0.0,
                thickness_mm=_number(ds.get("SliceThickness"), None),
                rescale_type=str(ds.get("RescaleType", "") or ""),
                source=make(ds, None),
                **common,
            )
        ]
    n = int(_number(ds.get("NumberOfFrames"), 1) or 1)
    if not 1 <= n <= MAX_FRAMES:
        raise series_error(
            "CORRUPT_DICOM", f"slice {index}: NumberOfFrames out of range (1..{MAX_FRAMES})", check="image_size"
        )
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    refs = []
    for k in range(n):
        pf = per_frames[k] if k < len(per_frames) else None
        from pydicom.dataset import Dataset

        tmp = Dataset()
        for seq, kw in (
            ("PlanePositionSequence", "ImagePositionPatient"),
            ("PlaneOrientationSequence", "ImageOrientationPatient"),
            ("PixelMeasuresSequence", "PixelSpacing"),
        ):
            value = _functional(pf, shared, ds, seq, kw)
            if value is not None:
                setattr(tmp, kw, value)
        where = f"{index} frame {k + 1}"
        slope = _functional(pf, shared, ds, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(pf, shared, ds, "PixelValueTransformationSequence", "RescaleIntercept")
        refs.append(
            FrameRef(
                rows=rows,
                cols=cols,
                ipp=_floats(tmp, "ImagePositionPatient", 3, where),
                iop=_floats(tmp, "ImageOrientationPatient", 6, where),
                pixel_spacing=_floats(tmp, "PixelSpacing", 2, where),
                slope=_number(slope, 1.0) or 1.0,
                intercept=_number(intercept, 0.0) or 0.0,
                thickness_mm=_number(_functional(pf, shared, ds, "PixelMeasuresSequence", "SliceThickness"), None),
                rescale_type=str(_functional(pf, shared, ds, "PixelValueTransformationSequence", "RescaleType") or ""),
                frame_number=k + 1,
                multiframe=True,
                source=make(ds, k),
                **common,
            )
        )
    return refs
