"""``atlasflow convert DICOM_DIR|FILE... OUT.nii[.gz]``: CT DICOM files on disk -> NIfTI (HU, RAS).

I/O edge of `atlasflow.ingest.assemble` (which holds the geometry and value policy):

1. Scan: every file under the inputs (recursively; DICOMDIR and non-DICOM files are skipped
   with a note) is read header-only (pydicom ``defer_size``: pixel data stays on disk). Only
   CT images are kept: (0008,0016) SOPClassUID (or (0002,0002) when blank) CT Image, Enhanced
   CT or Legacy Converted Enhanced CT Storage; other objects (SEG, SR, other modalities) are
   skipped with a note. Each frame becomes an `assemble.FrameRef` whose pixel reader re-opens
   the file: native little-endian pixel data is read straight from its file offset; compressed
   data is decoded by pydicom (+ pylibjpeg plugins), one frame at a time.
2. Group: by (0020,000E) SeriesInstanceUID. Files whose SeriesInstanceUID is EMPTY (e.g.
   de-identified exports) are grouped by (0020,0052) FrameOfReferenceUID + geometry (rows,
   columns, orientation, pixel spacing), with a warning. Within a series:
   * localizers ((0008,0008) ImageType containing LOCALIZER) are dropped with a note (a
     series made only of localizers is rejected: a scout is a projection, not a volume);
   * frames of different size / orientation / pixel spacing are split into separate volumes
     (warning ``split``), each converted on its own.
3. Assemble each group with policy `assemble.REPAIR`: gantry tilt resampled, missing slices
   filled, multi-frame read; repeated positions (time series) and irregular spacing rejected
   (see `atlasflow.ingest.assemble`). A group that fails prints ``error: ... [REASON/check]``
   and the others are still written.
4. Write NIfTI-1: one volume -> OUT; several -> OUT with ``_1``, ``_2``... before the
   extension (ordered by (0020,0011) SeriesNumber, then slice count). int16 HU (see assemble
   for int32/float32), the RAS+ affine in sform and qform (code 1), the array in DICOM order
   (i = columns, j = rows, k = slices along the normal; reorient with
   ``nibabel.as_closest_canonical`` to compare). The data is streamed from the volume's own
   buffer (no copy); ``.nii.gz`` uses ISA-L (PyPI ``isal``) level 1 when installed, else zlib
   level 1, in chunks. No nibabel import (start-up time).

Exit status: 0 all groups written; 1 some written, some failed; 2 nothing written (no CT,
every group failed, bad arguments). Messages never contain patient data (no names/IDs/UIDs).
Memory: the output array (once) + one decoded frame + per-frame header records.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import warnings
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atlasflow.common.errors import AtlasflowError
from atlasflow.ingest.assemble import (
    REPAIR,
    FrameRef,
    Policy,
    Volume,
    _err,
    assemble_frames,
    frame_refs,
)

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

_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_DEFER = 4096  # bytes: larger values (pixel data) stay on disk until read


# ---------------------------------------------------------------- pixel readers


class NativeFileFrame:
    """Reads one frame of native little-endian pixel data straight from its file offset."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, rows: int, cols: int) -> None:
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, (rows, cols)

    def read(self) -> np.ndarray:
        count = self.shape[0] * self.shape[1]
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            buf = np.empty(count, dtype=self.dtype)
            got = f.readinto(buf.data)
        if got != buf.nbytes:
            raise _err("CORRUPT_DICOM", "pixel data is shorter than Rows x Columns", check="pixel_length")
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

    def read(self) -> np.ndarray:
        from pydicom.pixels import get_decoder

        try:
            ds = self.cache.get(self.path)
            array, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=self.index)
        except AtlasflowError:
            raise
        except Exception as exc:
            raise _err(
                "CORRUPT_DICOM", f"pixel data does not decode ({type(exc).__name__})", check="pixel_decode"
            ) from None
        return array


# ---------------------------------------------------------------- fast header reader

#: Tags the fast reader keeps: (group, element) -> keyword.
_FAST_TAGS = {
    (0x0008, 0x0008): "ImageType",
    (0x0008, 0x0016): "SOPClassUID",
    (0x0008, 0x0018): "SOPInstanceUID",
    (0x0018, 0x0050): "SliceThickness",
    (0x0018, 0x0088): "SpacingBetweenSlices",
    (0x0018, 0x1120): "GantryDetectorTilt",
    (0x0020, 0x000E): "SeriesInstanceUID",
    (0x0020, 0x0011): "SeriesNumber",
    (0x0020, 0x0032): "ImagePositionPatient",
    (0x0020, 0x0037): "ImageOrientationPatient",
    (0x0020, 0x0052): "FrameOfReferenceUID",
    (0x0028, 0x0002): "SamplesPerPixel",
    (0x0028, 0x0008): "NumberOfFrames",
    (0x0028, 0x0010): "Rows",
    (0x0028, 0x0011): "Columns",
    (0x0028, 0x0030): "PixelSpacing",
    (0x0028, 0x0100): "BitsAllocated",
    (0x0028, 0x0101): "BitsStored",
    (0x0028, 0x0103): "PixelRepresentation",
    (0x0028, 0x0120): "PixelPaddingValue",
    (0x0028, 0x0121): "PixelPaddingRangeLimit",
    (0x0028, 0x1052): "RescaleIntercept",
    (0x0028, 0x1053): "RescaleSlope",
    (0x0028, 0x1054): "RescaleType",
}
_US = {"SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation"}
_LONG_VR = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")


class _Fallback(Exception):
    """The fast reader does not handle this file: use pydicom."""


def _skip_undefined(buf: bytes, pos: int, explicit: bool, depth: int = 0) -> int:
    """Position after an undefined-length sequence whose value starts at `pos`."""
    if depth > 16:
        raise _Fallback
    while True:
        if pos + 8 > len(buf):
            raise _Fallback
        group, elem = _TAG.unpack_from(buf, pos)
        length = _U32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise _Fallback
        if length != 0xFFFFFFFF:
            pos += length
            continue
        while True:  # item of undefined length: elements until (FFFE,E00D)
            if pos + 8 > len(buf):
                raise _Fallback
            group, elem = _TAG.unpack_from(buf, pos)
            if (group, elem) == (0xFFFE, 0xE00D):
                pos += 8
                break
            pos, _, _, _ = _element(buf, pos, explicit, depth + 1)


def _element(buf: bytes, pos: int, explicit: bool, depth: int = 0) -> tuple[int, tuple[int, int], int, int]:
    """Parse the element at `pos`: (next position, tag, value offset, value length)."""
    if pos + 8 > len(buf):
        raise _Fallback
    group, elem = _TAG.unpack_from(buf, pos)
    if explicit and group != 0xFFFE:
        vr = buf[pos + 4 : pos + 6]
        if vr in _LONG_VR:
            length = _U32.unpack_from(buf, pos + 8)[0]
            start = pos + 12
        else:
            length = _U16.unpack_from(buf, pos + 6)[0]
            start = pos + 8
    else:
        vr = b""
        length = _U32.unpack_from(buf, pos + 4)[0]
        start = pos + 8
    if length == 0xFFFFFFFF:
        if (group, elem) == (0x7FE0, 0x0010):
            raise _Fallback  # encapsulated (compressed) pixel data
        return _skip_undefined(buf, start, explicit, depth), (group, elem), start, -1
    return start + length, (group, elem), start, length


def fast_header(path: Path, head: int = 1 << 16) -> tuple[dict[str, object], int] | None:
    """Header facts of a native little-endian single-frame Part-10 file, without pydicom.

    Returns ({keyword: value}, pixel data offset), or None when the file needs pydicom
    (no preamble, other transfer syntax, multi-frame, compressed, anything unexpected).
    Values: str for text, list[str] for multi-valued text, int for US.
    """
    try:
        with open(path, "rb") as f:
            buf = f.read(head)
            if len(buf) < 132 or buf[128:132] != b"DICM":
                return None
            facts: dict[str, object] = {}
            pos = 132
            ts = ""
            while pos + 8 <= len(buf) and _TAG.unpack_from(buf, pos)[0] == 0x0002:
                nxt, tag, start, length = _element(buf, pos, True)
                if tag == (0x0002, 0x0010):
                    ts = buf[start : start + length].decode("ascii", "replace").strip("\x00 ")
                elif tag == (0x0002, 0x0002):
                    facts["MediaStorageSOPClassUID"] = (
                        buf[start : start + length].decode("ascii", "replace").strip("\x00 ")
                    )
                elif tag == (0x0002, 0x0003):
                    facts["MediaStorageSOPInstanceUID"] = (
                        buf[start : start + length].decode("ascii", "replace").strip("\x00 ")
                    )
                pos = nxt
            if ts not in _NATIVE_LE:
                return None
            explicit = ts == "1.2.840.10008.1.2.1"
            while True:
                if pos + 12 > len(buf):
                    more = f.read()
                    if not more:
                        return None
                    buf += more
                nxt, tag, start, length = _element(buf, pos, explicit)
                if tag == (0x7FE0, 0x0010):
                    facts["_pixel_length"] = length
                    return facts, start
                if tag[0] == 0x5200:
                    return None  # functional groups: multi-frame
                key = _FAST_TAGS.get(tag)
                if key is not None:
                    if nxt > len(buf):
                        buf += f.read()
                    raw = buf[start : start + length]
                    if key in _US:
                        facts[key] = _U16.unpack_from(raw)[0] if length == 2 else None
                    elif key in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
                        facts[key] = raw  # US or SS: decided by PixelRepresentation
                    else:
                        text = raw.decode("latin-1").strip("\x00 ")
                        facts[key] = [v.strip() for v in text.split("\\")] if "\\" in text else text
                pos = nxt
    except (_Fallback, struct.error, OSError, UnicodeDecodeError):
        return None


class _FastFacts:
    """Minimal `Dataset`-like view (``.get``) over `fast_header` facts, for `frame_refs`."""

    def __init__(self, facts: dict[str, object]) -> None:
        self.facts = facts
        signed = facts.get("PixelRepresentation") == 1
        for key in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
            raw = facts.get(key)
            if isinstance(raw, bytes):
                facts[key] = struct.unpack("<h" if signed else "<H", raw)[0] if len(raw) == 2 else None
        self.file_meta = None

    def get(self, key: str, default: object = None) -> object:
        value = self.facts.get(key, default)
        return default if value is None else value

    def __getattr__(self, key: str) -> object:
        if key in ("Rows", "Columns"):
            return self.facts[key]
        raise AttributeError(key)


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
    if bits not in (8, 16, 32) or not isinstance(rows, int) or not isinstance(cols, int):
        return None
    dtype = np.dtype(f"<{'i' if facts.get('PixelRepresentation') == 1 else 'u'}{bits // 8}")
    if facts["_pixel_length"] < rows * cols * dtype.itemsize:
        return None  # short pixel data: let pydicom / the decoder report it
    if not facts.get("SOPInstanceUID"):
        facts["SOPInstanceUID"] = facts.get("MediaStorageSOPInstanceUID", "")
    view = _FastFacts(facts)

    def make(_ds: object, _index: int | None) -> NativeFileFrame:
        return NativeFileFrame(path, offset, dtype, rows, cols)

    refs = frame_refs(view, make)  # type: ignore[arg-type]
    image_type = facts.get("ImageType") or []
    image_type = [image_type] if isinstance(image_type, str) else image_type
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


def _source_factory(path: Path, ds: Dataset, cache: _LastDataset):  # type: ignore[no-untyped-def]
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    elem = ds.get_item(0x7FE00010, keep_deferred=True) if "PixelData" in ds else None
    bits = int(ds.get("BitsAllocated", 16) or 16)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    native = (
        ts in _NATIVE_LE
        and elem is not None
        and samples == 1
        and bits in (8, 16, 32)
        and getattr(elem, "value", b"") is None  # still deferred: offset known
        and getattr(elem, "value_tell", None) is not None
        and getattr(elem, "length", 0) != 0xFFFFFFFF
    )
    if native:
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        rows, cols = int(ds.Rows), int(ds.Columns)
        frame_bytes = rows * cols * dtype.itemsize
        base = int(elem.value_tell)  # type: ignore[union-attr]

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
        if (
            not UID(str(meta.TransferSyntaxUID)).is_little_endian
            and UID(str(meta.TransferSyntaxUID)).is_transfer_syntax is False
        ):
            skipped["unknown transfer syntax"] += 1
            continue
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        try:
            refs = frame_refs(ds, _source_factory(path, ds, cache), index=len(result.frames))
        except AtlasflowError as exc:
            skipped[f"CT without usable geometry ({exc.metadata.get('check', exc.reason)})"] += 1
            continue
        number = (
            int(ds.get("SeriesNumber", 0) or 0) if str(ds.get("SeriesNumber", "")).strip().lstrip("-").isdigit() else 0
        )
        for ref in refs:
            result.frames.append(ScannedFrame(ref, number, "LOCALIZER" in image_type, path))
    for why, count in sorted(skipped.items()):
        result.notes.append(f"skipped {count} file(s): {why}")
    return result


# ---------------------------------------------------------------- grouping


@dataclass
class Group:
    """Frames to assemble into one volume, with the notes of how they were grouped."""

    frames: list[FrameRef]
    series_number: int
    label: str
    notes: list[str] = field(default_factory=list)


def _geometry_key(ref: FrameRef) -> tuple[object, ...]:
    return (ref.rows, ref.cols, tuple(np.round(ref.iop, 3)), tuple(np.round(ref.pixel_spacing, 3)))


def group_frames(frames: list[ScannedFrame]) -> tuple[list[Group], list[str]]:
    """Series -> geometry sub-groups (see module doc). Returns (groups, notes)."""
    notes: list[str] = []
    series: dict[tuple[object, ...], list[ScannedFrame]] = defaultdict(list)
    no_uid = 0
    for f in frames:
        if f.ref.series_uid:
            series[("uid", f.ref.series_uid)].append(f)
        else:
            no_uid += 1
            series[("for", f.ref.frame_of_reference_uid, _geometry_key(f.ref))].append(f)
    if no_uid:
        notes.append(
            f"warning: {no_uid} frame(s) have an empty (0020,000E) SeriesInstanceUID: grouped "
            "by (0020,0052) FrameOfReferenceUID and geometry instead"
        )
    groups: list[Group] = []
    for s, (key, members) in enumerate(series.items(), start=1):
        label = f"series {s}" if key[0] == "uid" else f"series {s} (no UID)"
        localizers = [f for f in members if f.localizer]
        images = [f for f in members if not f.localizer]
        if localizers:
            notes.append(f"{label}: {len(localizers)} localizer frame(s) dropped (a scout is not part of the volume)")
        if not images:
            notes.append(f"error: {label}: only localizer images, no volume [INCONSISTENT_SERIES/localizer]")
            continue
        by_geometry: dict[tuple[object, ...], list[ScannedFrame]] = defaultdict(list)
        for f in images:
            by_geometry[_geometry_key(f.ref)].append(f)
        parts = sorted(by_geometry.values(), key=len, reverse=True)
        for p, part in enumerate(parts, start=1):
            sub = label if len(parts) == 1 else f"{label} part {p}"
            group = Group([f.ref for f in part], part[0].series_number, sub)
            if len(parts) > 1:
                r = part[0].ref
                group.notes.append(
                    f"warning: split: {label} mixes sizes/orientations/pixel spacings; this part "
                    f"has {len(part)} frame(s) of {r.cols}x{r.rows}"
                )
            groups.append(group)
    groups.sort(key=lambda g: (g.series_number, -len(g.frames)))
    return groups, notes


# ---------------------------------------------------------------- NIfTI writing

_HEADER = struct.Struct("<i10s18sihbb8h3f4h8f3fhbb4f2i80s24s2h6f4f4f4f16s4s")
_DATATYPE = {
    np.dtype(np.int16): (4, 16),
    np.dtype(np.int32): (8, 32),
    np.dtype(np.float32): (16, 32),
    np.dtype(np.uint8): (2, 8),
}


def _quaternion(affine: np.ndarray) -> tuple[float, float, float, float, float, float, float]:
    """(b, c, d, qx, qy, qz, qfac) of an affine with orthogonal columns (nifti1_io.c)."""
    m = np.asarray(affine[:3, :3], dtype=np.float64)
    zooms = np.linalg.norm(m, axis=0)
    r = m / zooms
    qfac = 1.0
    if np.linalg.det(r) < 0:
        r[:, 2] = -r[:, 2]
        qfac = -1.0
    a = 1.0 + r[0, 0] + r[1, 1] + r[2, 2]
    if a > 0.5:
        a = 0.5 * np.sqrt(a)
        b = 0.25 * (r[2, 1] - r[1, 2]) / a
        c = 0.25 * (r[0, 2] - r[2, 0]) / a
        d = 0.25 * (r[1, 0] - r[0, 1]) / a
    else:
        xd = 1.0 + r[0, 0] - (r[1, 1] + r[2, 2])
        yd = 1.0 + r[1, 1] - (r[0, 0] + r[2, 2])
        zd = 1.0 + r[2, 2] - (r[0, 0] + r[1, 1])
        if xd > 1.0:
            b = 0.5 * np.sqrt(xd)
            c = 0.25 * (r[0, 1] + r[1, 0]) / b
            d = 0.25 * (r[0, 2] + r[2, 0]) / b
            a = 0.25 * (r[2, 1] - r[1, 2]) / b
        elif yd > 1.0:
            c = 0.5 * np.sqrt(yd)
            b = 0.25 * (r[0, 1] + r[1, 0]) / c
            d = 0.25 * (r[1, 2] + r[2, 1]) / c
            a = 0.25 * (r[0, 2] - r[2, 0]) / c
        else:
            d = 0.5 * np.sqrt(zd)
            b = 0.25 * (r[0, 2] + r[2, 0]) / d
            c = 0.25 * (r[1, 2] + r[2, 1]) / d
            a = 0.25 * (r[1, 0] - r[0, 1]) / d
        if a < 0:
            b, c, d = -b, -c, -d
    return (float(b), float(c), float(d), float(affine[0, 3]), float(affine[1, 3]), float(affine[2, 3]), qfac)


def nifti_header(shape: tuple[int, ...], dtype: np.dtype, affine: np.ndarray) -> bytes:
    """NIfTI-1 single-file header + empty extension flag (352 bytes); affine RAS+ (4, 4),
    written to sform and qform (code 1, scanner), units mm/s, no scaling."""
    code, bitpix = _DATATYPE[np.dtype(dtype)]
    b, c, d, qx, qy, qz, qfac = _quaternion(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    dim = [len(shape), *shape] + [1] * (7 - len(shape))
    pixdim = [qfac, *zooms.tolist()] + [1.0] * (7 - 3)
    header = _HEADER.pack(
        348,
        b"",
        b"",
        0,
        0,
        ord("r"),
        0,
        *dim,
        0.0,
        0.0,
        0.0,
        0,
        code,
        bitpix,
        0,
        *pixdim,
        352.0,
        1.0,
        0.0,
        0,
        0,
        2 | 8,
        0.0,
        0.0,
        0.0,
        0.0,
        0,
        0,
        b"atlasflow convert",
        b"",
        1,
        1,
        b,
        c,
        d,
        qx,
        qy,
        qz,
        *affine[0, :4].tolist(),
        *affine[1, :4].tolist(),
        *affine[2, :4].tolist(),
        b"",
        b"n+1\x00",
    )
    return header + b"\x00\x00\x00\x00"


def _compressor():  # type: ignore[no-untyped-def]
    """A gzip-stream compressobj: ISA-L level 1 when installed, else zlib level 1."""
    try:
        from isal import isal_zlib

        return isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31), "isal"
    except ImportError:
        return zlib.compressobj(1, zlib.DEFLATED, 31), "zlib"


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    """Write (X, Y, Z) `array` + RAS+ `affine` as NIfTI-1 (`.nii` or gzip `.nii.gz`).

    The array bytes are streamed in Fortran order from its own buffer (a Fortran-contiguous
    array, as `assemble` returns, is not copied). Returns the compressor used ("none",
    "isal" or "zlib").
    """
    data = np.asfortranarray(array)
    flat = data.T.reshape(-1) if data.flags.f_contiguous else data.ravel(order="F")
    view = memoryview(flat).cast("B")
    header = nifti_header(data.shape, data.dtype, affine)
    tmp = path.with_name(path.name + ".part")
    chunk = 8 << 20
    with open(tmp, "wb") as f:
        if path.name.endswith(".gz"):
            comp, used = _compressor()
            f.write(comp.compress(header))
            for start in range(0, len(view), chunk):
                f.write(comp.compress(view[start : start + chunk]))
            f.write(comp.flush())
        else:
            used = "none"
            f.write(header)
            f.write(view)
    os.replace(tmp, path)
    return used


def output_paths(out: Path, count: int) -> list[Path]:
    """OUT for one volume; OUT_1, OUT_2... (before .nii / .nii.gz) for several."""
    if count == 1:
        return [out]
    name = out.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    stem = name[: -len(ext)]
    return [out.with_name(f"{stem}_{k}{ext}") for k in range(1, count + 1)]


# ---------------------------------------------------------------- conversion


@dataclass
class Converted:
    """One output: the volume and where it went (path None when it failed: see error)."""

    label: str
    path: Path | None
    volume: Volume | None
    notes: list[str]
    error: str = ""


def convert(inputs: list[Path], out: Path, policy: Policy = REPAIR, log: object = None) -> list[Converted]:
    """Convert every CT series under `inputs`; write OUT (or OUT_k). `log(str)` gets notes."""
    say = log if callable(log) else (lambda s: None)
    scanned = scan(inputs)
    for note in scanned.notes:
        say(note)
    groups, notes = group_frames(scanned.frames)
    for note in notes:
        say(note)
    if not groups:
        raise _err("EMPTY_SERIES", "no CT image found in the input", check="count")
    results: list[Converted] = []
    volumes: list[tuple[Group, Volume]] = []
    for group in groups:
        try:
            volumes.append((group, assemble_frames(group.frames, policy)))
        except AtlasflowError as exc:
            check = exc.metadata.get("check", "")
            message = f"{group.label}: {exc.message} [{exc.reason}{'/' + check if check else ''}]"
            say("error: " + message)
            results.append(Converted(group.label, None, None, group.notes, message))
    for (group, volume), path in zip(volumes, output_paths(out, len(volumes))):
        used = write_nifti(path, volume.array, volume.affine)
        for note in group.notes:
            say(note)
        for w in volume.warnings:
            say(f"warning: {group.label}: {w}")
        zooms = np.linalg.norm(volume.affine[:3, :3], axis=0)
        say(
            f"{group.label}: wrote {path} ({'x'.join(map(str, volume.array.shape))} "
            f"{volume.array.dtype}, {zooms[0]:.4g}x{zooms[1]:.4g}x{zooms[2]:.4g} mm"
            f"{', gzip ' + used if used != 'none' else ''}"
            f"{', RESAMPLED (tilt-corrected or filled)' if volume.resampled else ''})"
        )
        results.append(Converted(group.label, path, volume, group.notes))
    return results


def main(argv: list[str] | None = None) -> int:
    """``atlasflow convert DICOM_DIR|FILE... OUT.nii[.gz]`` (see module doc for exit codes)."""
    parser = argparse.ArgumentParser(
        prog="atlasflow convert",
        description="CT DICOM series -> NIfTI (int16 HU, RAS+ affine); tilt resampled, "
        "missing slices filled, multi-frame read (see --strict).",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="DICOM_DIR_OR_FILE")
    parser.add_argument("out", type=Path, metavar="OUT.nii[.gz]")
    parser.add_argument(
        "--strict", action="store_true", help="reject gantry tilt, missing slices and multi-frame instead"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.out.name.endswith(".nii") or args.out.name.endswith(".nii.gz")):
        parser.error("OUT must end in .nii or .nii.gz")
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        print(f"error: input not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir():
        print(f"error: output directory does not exist: {args.out.parent}", file=sys.stderr)
        return 2
    from atlasflow.ingest.assemble import STRICT

    def log(line: str) -> None:
        print(line, file=sys.stderr if line.startswith(("error", "warning")) else sys.stdout)

    try:
        results = convert(args.inputs, args.out, STRICT if args.strict else REPAIR, log)
    except AtlasflowError as exc:
        print(f"error: {exc.message} [{exc.reason}]", file=sys.stderr)
        return 2
    written = sum(r.path is not None for r in results)
    if written == 0:
        return 2
    return 0 if written == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
