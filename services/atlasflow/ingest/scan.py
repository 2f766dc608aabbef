"""Scan DICOM files on disk into CT frame records (`scan`), pixels left on disk.

Every file under the inputs (recursively; DICOMDIR and non-DICOM files are skipped with a note)
is read header-only: by `atlasflow.ingest.fastheader` for native single-frame slices, else by
pydicom (``defer_size``: pixel data stays on disk). Only CT images are kept (`CT_SOP_CLASSES`).
Each frame becomes a `FrameRef` whose pixel reader re-opens the file: native little-endian pixel
data is read straight from its file offset (`NativeFileFrame`); compressed data is decoded by
pydicom (+ pylibjpeg plugins), one frame at a time (`EncodedFileFrame`).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from atlasflow.common.errors import AtlasflowError
from atlasflow.ingest.fastheader import NATIVE_LE, FastFacts, fast_header
from atlasflow.ingest.frames import FrameRef, frame_refs, series_error

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Same set as `atlasflow.ingest.dicom.CT_SOP_CLASSES` (not imported: it imports pydicom, and
#: the fast path below converts native single-frame series without pydicom at all).
CT_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.2.2",
    }
)

_DEFER = 4096  # bytes: larger values (pixel data) stay on disk until read


# ---------------------------------------------------------------- pixel readers


class NativeFileFrame:
    """Reads one frame of native little-endian pixel data straight from its file offset."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype[Any], rows: int, cols: int) -> None:
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, (rows, cols)

    def read(self) -> npt.NDArray[Any]:
        count = self.shape[0] * self.shape[1]
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            buf = np.empty(count, dtype=self.dtype)
            got = f.readinto(buf.data)
        if got != buf.nbytes:
            raise series_error("CORRUPT_DICOM", "pixel data is shorter than Rows x Columns", check="pixel_length")
        return buf.reshape(self.shape)


class _LastDataset:
    """Caches the last fully read file (frames of one multi-frame file come together)."""

    path: Path | None = None
    ds: Dataset | None = None

    def get(self, path: Path) -> Dataset:
        import pydicom

        if self.path != path:
            self.ds, self.path = None, None
            self.ds, self.path = pydicom.dcmread(path), path
        assert self.ds is not None
        return self.ds


class EncodedFileFrame:
    """Decodes one frame of a file with pydicom's decoders (compressed transfer syntaxes)."""

    def __init__(self, path: Path, index: int | None, cache: _LastDataset) -> None:
        self.path, self.index, self.cache = path, index, cache

    def read(self) -> npt.NDArray[Any]:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            ds = self.cache.get(self.path)
            array, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=self.index)
        except AtlasflowError:
            raise
        except Exception as exc:
            raise series_error(
                "CORRUPT_DICOM", f"pixel data does not decode ({type(exc).__name__})", check="pixel_decode"
            ) from None
        return array


def _fast_frames(path: Path) -> tuple[list[FrameRef], list[str], int] | None:
    """(frame refs, ImageType, SeriesNumber) by the fast reader, or None (use pydicom)."""
    parsed = fast_header(path)
    if parsed is None:
        return None
    facts, offset = parsed
    sop = str(facts.get("SOPClassUID") or facts.get("MediaStorageSOPClassUID") or "")
    if sop not in CT_SOP_CLASSES or facts.get("SamplesPerPixel", 1) != 1:
        return None
    if str(facts.get("NumberOfFrames", "1") or "1").strip() not in ("", "1"):
        return None
    bits = facts.get("BitsAllocated")
    rows, cols = facts.get("Rows"), facts.get("Columns")
    if not isinstance(bits, int) or bits not in (8, 16, 32) or not isinstance(rows, int) or not isinstance(cols, int):
        return None
    dtype = np.dtype(f"<{'i' if facts.get('PixelRepresentation') == 1 else 'u'}{bits // 8}")
    pixel_length = facts["_pixel_length"]
    if not isinstance(pixel_length, int) or pixel_length < rows * cols * dtype.itemsize:
        return None  # short pixel data: let pydicom / the decoder report it
    if not facts.get("SOPInstanceUID"):
        facts["SOPInstanceUID"] = facts.get("MediaStorageSOPInstanceUID", "")
    view = FastFacts(facts)

    def make(_ds: object, _index: int | None) -> NativeFileFrame:
        return NativeFileFrame(path, offset, dtype, rows, cols)

    refs = frame_refs(view, make)  # type: ignore[arg-type]  # FastFacts duck-types the Dataset get/attributes
    raw_type = facts.get("ImageType") or []
    image_type = (
        [raw_type] if isinstance(raw_type, str) else list(raw_type) if isinstance(raw_type, (list, tuple)) else []
    )
    number = str(facts.get("SeriesNumber", "") or "").strip()
    return refs, [str(v).upper() for v in image_type], int(number) if number.lstrip("-").isdigit() else 0


# ---------------------------------------------------------------- scanning


@dataclass
class ScannedFrame:
    """A frame plus the file-level facts used for grouping (no patient data)."""

    ref: FrameRef
    series_number: int
    localizer: bool
    file: Path


@dataclass
class ScanResult:
    frames: list[ScannedFrame] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def iter_files(inputs: Iterable[Path]) -> Iterator[Path]:
    """Files under `inputs` (files or directories, recursively, sorted), DICOMDIR excluded."""
    for root in inputs:
        if root.is_file():
            yield root
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.upper() != "DICOMDIR":
                    yield Path(dirpath) / name


def _source_factory(
    path: Path, ds: Dataset, cache: _LastDataset
) -> Callable[[Dataset, int | None], NativeFileFrame | EncodedFileFrame]:
    from pydicom.errors import BytesLengthException  # pydicom is loaded: ds is a pydicom Dataset

    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    elem = ds.get_item(0x7FE00010, keep_deferred=True) if "PixelData" in ds else None
    try:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    # crafted values (BytesLengthException: a US/SS/FL value of the wrong length): the decode path reports
    except (AttributeError, TypeError, ValueError, OverflowError, NotImplementedError, BytesLengthException):
        bits, samples, rows, cols, signed = 0, 0, 0, 0, False
    value_tell: int | None = getattr(elem, "value_tell", None)  # RawDataElement / deferred DataElement
    native = (
        ts in NATIVE_LE
        and elem is not None
        and samples == 1
        and bits in (8, 16, 32)
        and getattr(elem, "value", b"") is None  # still deferred: offset known
        and value_tell is not None
        and getattr(elem, "length", 0) != 0xFFFFFFFF
    )
    if native:
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        frame_bytes = rows * cols * dtype.itemsize
        assert value_tell is not None  # `native` checked it
        base = int(value_tell)

        def make(_ds: Dataset, index: int | None) -> NativeFileFrame:
            return NativeFileFrame(path, base + (index or 0) * frame_bytes, dtype, rows, cols)

        return make

    def make_encoded(_ds: Dataset, index: int | None) -> EncodedFileFrame:
        return EncodedFileFrame(path, index, cache)

    return make_encoded


def scan(inputs: Iterable[Path], use_fast: bool = True) -> ScanResult:
    """Read the headers of every file under `inputs`; one `ScannedFrame` per CT frame.

    `use_fast`: native little-endian single-frame files are read by `fast_header` (no
    pydicom; ~10x faster); everything else, or anything it does not expect, by pydicom.
    """
    result = ScanResult()
    cache = _LastDataset()
    skipped: dict[str, int] = defaultdict(int)
    for path in iter_files(inputs):
        fast = _fast_frames(path) if use_fast else None
        if fast is not None:
            refs, image_type, number = fast
            for ref in refs:
                result.frames.append(ScannedFrame(ref, number, "LOCALIZER" in image_type, path))
            continue
        import pydicom
        from pydicom.uid import UID

        try:
            with warnings.catch_warnings():  # pydicom's value warnings (e.g. bad UIs)
                warnings.simplefilter("ignore", UserWarning)
                ds = pydicom.dcmread(path, defer_size=_DEFER)
        except Exception:
            skipped["not DICOM or unreadable"] += 1
            continue
        try:  # pydicom converts values lazily: a crafted VR or value fails here
            meta = getattr(ds, "file_meta", None)
            sop = str(ds.get("SOPClassUID", "") or "")
            if not sop and meta is not None:
                sop = str(meta.get("MediaStorageSOPClassUID", "") or "")
            if sop not in CT_SOP_CLASSES:
                skipped["not a CT image (SOP class)"] += 1
                continue
            if "PixelData" not in ds or meta is None or "TransferSyntaxUID" not in meta:
                skipped["CT without pixel data or transfer syntax"] += 1
                continue
            if not UID(str(meta.TransferSyntaxUID)).is_transfer_syntax:
                skipped["unknown transfer syntax"] += 1
                continue
            image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        except Exception:  # noqa: BLE001 - any conversion failure: the file is unreadable
            skipped["not DICOM or unreadable"] += 1
            continue
        try:
            refs = frame_refs(ds, _source_factory(path, ds, cache), index=len(result.frames))
        except AtlasflowError as exc:
            skipped[f"CT without usable geometry ({exc.metadata.get('check', exc.reason)})"] += 1
            continue
        try:
            text = str(ds.get("SeriesNumber", "")).strip()
            number = int(text) if text.lstrip("-").isdigit() else 0
        except Exception:  # noqa: BLE001 - a crafted VR: no series number
            number = 0
        for ref in refs:
            result.frames.append(ScannedFrame(ref, number, "LOCALIZER" in image_type, path))
    for why, count in sorted(skipped.items()):
        result.notes.append(f"skipped {count} file(s): {why}")
    return result
