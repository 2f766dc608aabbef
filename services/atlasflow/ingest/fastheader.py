"""A pydicom-free reader of the few header elements a native CT slice needs (`fast_header`).

`atlasflow convert` reads native little-endian single-frame series through it (no pydicom
import, no dataset built); anything it does not handle raises `_Fallback` inside and returns
None, and the file is read by pydicom instead (`atlasflow.ingest.scan`).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


#: Native little-endian transfer syntaxes (Implicit, Explicit VR): pixel data read in place.
NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})

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
            if ts not in NATIVE_LE:
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


class FastFacts:
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
