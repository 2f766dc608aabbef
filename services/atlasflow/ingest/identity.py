"""Identity of what ingest receives: opaque series/case ids and the content key of an instance.

Identity: atlasflow never exposes DICOM UIDs. `series_id`/`case_id` are salted-free SHA-256
prefixes of the Series/Study Instance UIDs (stable across restarts and replicas), see
`atlas_id`. "Same instance content" compares `content_key`s, not file bytes (see there).
"""

from __future__ import annotations

import hashlib
import io
import struct
from typing import BinaryIO, cast

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_sequence
from pydicom.filewriter import write_data_element


def atlas_id(prefix: str, uid: str) -> str:
    return f"{prefix}-{hashlib.sha256(uid.encode()).hexdigest()[:20]}"


def content_key(ds: Dataset) -> str:
    """Digest of a DICOM data set's content, independent of how it was framed and encoded.

    ``"sha256:<hex>"`` over every element in tag order, recursively into sequences, each as
    tag + 32-bit length + little-endian value bytes (the Implicit VR Little Endian framing,
    without VRs), leaving out the File Meta group (0002,xxxx), group lengths (gggg,0000) and
    (FFFC,FFFC) DataSetTrailingPadding; sequences and items are hashed by content, so
    defined- and undefined-length encodings agree. Consequences: the same instance as a
    Part-10 file (any preamble, any File Meta) and as re-encoded by a C-STORE peer or by
    pynetdicom has one key, whether the transfer syntax was Implicit or Explicit VR Little
    Endian or Deflated Explicit VR Little Endian (pydicom inflates on read). Values of an
    encapsulated (compressed) transfer syntax are hashed as their encapsulated bytes: the same
    pixels compressed differently are different content (a recorded conflict, never a silent
    replacement). Explicit VR Big Endian (retired) keeps OB/OW values in big-endian byte order.

    Converts the data set's raw elements in place (values are unchanged). Returns "" when an
    element's value cannot be converted (malformed but accepted input): callers then compare
    file bytes (`IngestStore.store_instance`'s default).
    """
    parts: list[bytes] = []
    try:
        _canonical(parts, ds)
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert: fall back to bytes
        return ""
    return "sha256:" + hashlib.sha256(b"".join(parts)).hexdigest()


def content_key_of_bytes(data: bytes) -> str:
    """`content_key` of DICOM Part-10 bytes (a preamble, or a stream that starts with File
    Meta); "" when they do not parse as DICOM."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    if not has_preamble and data[:2] != b"\x02\x00":
        return ""
    try:
        ds = dcmread(io.BytesIO(data), force=not has_preamble)
    except (InvalidDicomError, Exception):  # noqa: BLE001 - not DICOM: compared by bytes
        return ""
    return content_key(ds)


_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item
_ITEM_END = b"\xfe\xff\x0d\xe0"  # (FFFE,E00D) Item Delimitation Item
_HEAD = struct.Struct("<HHI")  # group, element, length (Implicit VR LE)


def _implicit_sequence(value: bytes) -> list[Dataset] | None:
    """Items of a value that parses as an Implicit VR Little Endian sequence, else None."""
    try:
        fp = DicomBytesIO(value)
        fp.is_little_endian = True
        fp.is_implicit_VR = True
        # read_sequence reads any DicomIO (pydicom annotates the parameter as BinaryIO)
        seq = read_sequence(cast(BinaryIO, fp), True, True, len(value), "iso8859")
        return list(seq) if len(seq) else None
    except Exception:  # noqa: BLE001 - not a sequence after all: hashed as bytes
        return None


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _canonical(parts: list[bytes], ds: Dataset) -> None:
    """Append the canonical encoding of `ds` (see `content_key`) to `parts`."""
    encodings = getattr(ds, "_character_set", None) or ["iso8859"]
    for tag in sorted(ds.keys()):
        t = int(tag)
        if t >> 16 == 0x0002 or t & 0xFFFF == 0 or t == 0xFFFCFFFC:
            continue
        items: list[Dataset] | None = None
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is not None:
            # Fast path: a raw value's bytes are the same in Implicit and Explicit VR Little
            # Endian. Sequences (and undefined-length values that may be one) are parsed.
            vr = raw.VR or _dictionary_vr(t)
            if vr in ("", "UN") and raw.value[:4] == _ITEM:
                items = _implicit_sequence(raw.value)  # e.g. a private SQ read as Implicit VR
            if items is None and vr != "SQ" and (raw.length != 0xFFFFFFFF or t == 0x7FE00010):
                parts.append(_HEAD.pack(t >> 16, t & 0xFFFF, len(raw.value)))
                parts.append(raw.value)
                continue
        if items is None:
            elem = ds[tag]  # converted (a sequence is parsed into items)
            if elem.VR == "SQ":
                items = list(elem.value)
            elif isinstance(elem.value, (bytes, bytearray)):
                parts.append(_HEAD.pack(t >> 16, t & 0xFFFF, len(elem.value)))
                parts.append(bytes(elem.value))
                continue
            else:
                out = DicomBytesIO()
                out.is_little_endian = True
                out.is_implicit_VR = True
                write_data_element(out, elem, encodings)
                parts.append(out.getvalue())
                continue
        parts.append(_HEAD.pack(t >> 16, t & 0xFFFF, len(items)))
        for item in items:
            parts.append(_ITEM)
            _canonical(parts, item)
            parts.append(_ITEM_END)
