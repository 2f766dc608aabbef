"""Structure-aware fuzzing of ingest: DICOM parse -> series assembly -> NIfTI, and request-id
validation (used by ``benchmarks/bench_fuzz.py`` and ``tests/ingest/test_ingest_fuzz.py``).

Every input is generated from ``(master seed, input index)`` alone (`make_input`), so any input
a run reports (crash, hang) is replayed with ``bench_fuzz.py --replay INDEX --seed SEED``.

Input kinds (`make_input` picks one per index):

* ``instance`` — a REAL seed file from ``tests/data`` (read its README) with 1-4 mutations:
  header values rewritten (Rows, Columns, BitsAllocated/Stored, PixelRepresentation,
  SamplesPerPixel, NumberOfFrames, RescaleSlope/Intercept, ImagePositionPatient,
  ImageOrientationPatient, PixelSpacing, SliceThickness, PixelPaddingValue, photometric
  interpretation, transfer syntax, SOP class), also inside sequences (Enhanced CT per-frame
  groups, same length in place), VRs replaced (unknown VRs included), lengths corrupted,
  elements deleted, pixel data shortened or replaced, byte flips / inserts / deletes,
  truncation. Pipeline: ``parse_instance`` (reception) -> ``assemble_series(REPAIR)`` (the
  assembler's policy) -> ``to_nifti_bytes`` (the assembler's NIfTI) and ``nifti_header`` (the
  ``atlasflow convert`` writer); 1 in 8 also goes through ``atlasflow convert``'s file path
  (``scan`` with the fast header reader -> grouping -> ``assemble_frames`` -> ``write_nifti``).
* ``series`` — 2-40 instances of one native seed placed along the slice normal, then a scenario:
  duplicated positions, huge or irregular gaps, whole missing slices, shifted origins (gantry
  tilt / shear), inconsistent orientation / spacing / size, crafted values in one instance;
  each instance goes through reception, the accepted ones through assembly and NIfTI.
* ``frames`` — 100-4000 synthetic 4x4 frames with every other, or random, slices missing (the
  gap filler at scale), straight into ``assemble_frames(REPAIR)``.
* ``ids`` — random strings (ASCII, path-like, unicode, control characters, long) into
  `atlasflow.common.ids` (``check_id``, ``check_message_ids`` on every request message of every
  service), ingest's ``check_upload_id``, the labels / ranking id checks and the blob store's
  digest check: only their documented INVALID_ARGUMENT errors, and nothing accepted that breaks
  the documented pattern.

A refusal is an `ALLOWED_REFUSALS` exception (the ingest / request error classes, each with a
reason; at reception the reason must have a DICOM status in ``DICOM_STATUS``). Anything else
raised is a crash.
"""

from __future__ import annotations

import functools
import random
import string
import struct
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from atlasflow.common.errors import AtlasflowError

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "tests" / "data"

#: The only exception types a fuzzed input may raise: the documented refusals (each carries a
#: reason and a gRPC code). Everything else (and an AtlasflowError whose code is INTERNAL) is
#: a crash.
ALLOWED_REFUSALS: tuple[type[BaseException], ...] = (AtlasflowError,)

#: seed files (relative to tests/data) and their weights: small / native ones are picked more
#: often (fast), every transfer syntax of the test data is present.
SEEDS: dict[str, int] = {
    "pydicom_ct_singles/pydicom/CT_small.dcm": 30,
    "dcmqi/data/segmentations/ct-3slice/01.dcm": 8,  # implicit VR
    "dicom2nifti_ct_headers/tests/data/failing/gantrytilting/001/IM-0001-0001.dcm": 8,
    "pydicom_ct_singles/pydicom-data/eCT_Supplemental.dcm": 8,  # Enhanced CT, 2 frames
    "pydicom_ct_singles/pydicom-data/693_UNCR.dcm": 4,
    "pydicom_ct_singles/pydicom-data/693_J2KR.dcm": 2,
    "pydicom_ct_singles/pylibjpeg-data/JPEGLS/CT1_JLSN.dcm": 2,
    "pydicom_ct_singles/pydicom-data/bad_sequence.dcm": 2,  # JPEG lossless
    "pydicom_ct_singles/pydicom-data/explicit_VR-UN.dcm": 2,
    "pydicom_ct_singles/pylibjpeg-data/JPEG2000/MAROTECH_CT_JP2Lossy.dcm": 1,
}
#: native seeds used to build series (fast to parse)
SERIES_SEEDS = (
    "pydicom_ct_singles/pydicom/CT_small.dcm",
    "dicom2nifti_ct_headers/tests/data/failing/gantrytilting/001/IM-0001-0001.dcm",
)


# ---------------------------------------------------------------- element surgery


@dataclass(frozen=True)
class Elem:
    """One top-level element of a Part-10 byte string: [pos, end) is the whole element."""

    tag: tuple[int, int]
    pos: int
    end: int
    vr: bytes
    explicit: bool
    value_start: int
    value_length: int  # -1: undefined length


def index_elements(buf: bytes) -> list[Elem] | None:
    """The top-level elements (File Meta then dataset) of a little-endian Part-10 stream, or
    None when the stream does not walk (an earlier mutation broke it)."""
    from atlasflow.ingest.fastheader import _element, _Fallback

    if len(buf) < 132 or buf[128:132] != b"DICM":
        return None
    out: list[Elem] = []
    pos, ts = 132, ""
    try:
        while pos + 8 <= len(buf):
            group = struct.unpack_from("<H", buf, pos)[0]
            explicit = True if group == 0x0002 else ts != "1.2.840.10008.1.2"
            nxt, tag, start, length = _element(buf, pos, explicit)
            if nxt > len(buf):
                return out or None
            vr = buf[pos + 4 : pos + 6] if explicit and tag[0] != 0xFFFE else b""
            out.append(Elem(tag, pos, nxt, vr, explicit, start, length))
            if tag == (0x0002, 0x0010):
                ts = buf[start : start + length].decode("ascii", "replace").strip("\x00 ")
            pos = nxt
    except (_Fallback, struct.error):
        return out or None
    return out


_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}


def encode_element(tag: tuple[int, int], vr: bytes, value: bytes, explicit: bool) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB", b"UN") else b" "
    head = struct.pack("<HH", *tag)
    if not explicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in _LONG:
        return head + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + vr + struct.pack("<H", min(len(value), 0xFFFF)) + value


def set_element(buf: bytes, tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    """`buf` with top-level `tag` replaced by (vr, value), inserted in tag order if absent."""
    elems = index_elements(buf)
    if not elems:
        return buf
    explicit = tag[0] == 0x0002 or elems[-1].explicit
    for e in elems:
        if e.tag == tag:
            return buf[: e.pos] + encode_element(tag, vr, value, e.explicit) + buf[e.end :]
        if e.tag > tag and (e.tag[0] == 0x0002) == (tag[0] == 0x0002):
            return buf[: e.pos] + encode_element(tag, vr, value, explicit) + buf[e.pos :]
    return buf


def delete_element(buf: bytes, tag: tuple[int, int]) -> bytes:
    for e in index_elements(buf) or []:
        if e.tag == tag:
            return buf[: e.pos] + buf[e.end :]
    return buf


# ---------------------------------------------------------------- value generators

_US_VALUES = (0, 1, 2, 3, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 64, 255, 256, 4096, 32767, 32768, 65535)
_DS_VALUES = (
    "0", "-0", "1", "-1", "0.5", "1.5", "2", "1024", "-1024", "1e4", "10001", "1e6", "1000001", "1e9",
    "1e38", "1e300", "-1e300", "1e308", "1e-308", "1e400", "nan", "NaN", "inf", "-inf", "+Infinity",
    "abc", "", " ", "1\\2", "0x10", "1e", "--1", "3.4028236e38", "123456789012345678",
)  # fmt: skip
_IS_VALUES = (
    "0", "1", "2", "3", "-1", "-2147483648", "255", "65535", "65536", "2147483647", "2147483648",
    "999999999999", "1e400", "nan", "abc", "", " 2 ", "1.5", "+3",
)  # fmt: skip
_PI_VALUES = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "", "XYZ")
_TS_VALUES = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.5", "1.2.3.4", "", "abc",
)  # fmt: skip
_SOP_VALUES = (
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2",
    "1.2.840.10008.5.1.4.1.1.4", "",
)  # fmt: skip

#: (tag, VR, generator kind)
_FIELDS: dict[str, tuple[tuple[int, int], bytes, str]] = {
    "Rows": ((0x0028, 0x0010), b"US", "us"),
    "Columns": ((0x0028, 0x0011), b"US", "us"),
    "BitsAllocated": ((0x0028, 0x0100), b"US", "us"),
    "BitsStored": ((0x0028, 0x0101), b"US", "us"),
    "HighBit": ((0x0028, 0x0102), b"US", "us"),
    "PixelRepresentation": ((0x0028, 0x0103), b"US", "us"),
    "SamplesPerPixel": ((0x0028, 0x0002), b"US", "us"),
    "PixelPaddingValue": ((0x0028, 0x0120), b"US", "us"),
    "NumberOfFrames": ((0x0028, 0x0008), b"IS", "is"),
    "RescaleSlope": ((0x0028, 0x1053), b"DS", "ds"),
    "RescaleIntercept": ((0x0028, 0x1052), b"DS", "ds"),
    "SliceThickness": ((0x0018, 0x0050), b"DS", "ds"),
    "SpacingBetweenSlices": ((0x0018, 0x0088), b"DS", "ds"),
    "GantryDetectorTilt": ((0x0018, 0x1120), b"DS", "ds"),
    "ImagePositionPatient": ((0x0020, 0x0032), b"DS", "ds3"),
    "ImageOrientationPatient": ((0x0020, 0x0037), b"DS", "ds6"),
    "PixelSpacing": ((0x0028, 0x0030), b"DS", "ds2"),
    "PhotometricInterpretation": ((0x0028, 0x0004), b"CS", "pi"),
    "TransferSyntaxUID": ((0x0002, 0x0010), b"UI", "ts"),
    "SOPClassUID": ((0x0008, 0x0016), b"UI", "sop"),
    "Modality": ((0x0008, 0x0060), b"CS", "modality"),
}


def _value(rng: random.Random, kind: str) -> bytes:
    if kind == "us":
        if rng.random() < 0.1:
            return rng.randbytes(rng.choice((0, 1, 3, 4)))  # wrong length for US
        v = rng.choice(_US_VALUES) if rng.random() < 0.8 else rng.randrange(65536)
        return struct.pack("<H", v)
    if kind == "is":
        return rng.choice(_IS_VALUES).encode()
    if kind == "ds":
        return rng.choice(_DS_VALUES).encode()
    if kind.startswith("ds"):
        n = int(kind[2:])
        count = n if rng.random() < 0.85 else rng.choice((0, 1, n - 1, n + 1))
        vals = []
        for _ in range(count):
            r = rng.random()
            if r < 0.5:
                vals.append(rng.choice(_DS_VALUES))
            elif r < 0.8:
                vals.append(f"{rng.uniform(-1, 1):.6g}")
            else:
                vals.append(f"{rng.uniform(-1e6, 1e6):.6g}")
        return "\\".join(vals).encode()
    if kind == "pi":
        return rng.choice(_PI_VALUES).encode()
    if kind == "ts":
        return rng.choice(_TS_VALUES).encode() + b"\x00"
    if kind == "sop":
        return rng.choice(_SOP_VALUES).encode() + b"\x00"
    return rng.choice((b"CT", b"MR", b"", b"ct", b"SEG")).ljust(2)


def _ds_same_length(rng: random.Random, length: int) -> bytes:
    text = rng.choice(_DS_VALUES)
    if rng.random() < 0.3:
        text = "\\".join(rng.choice(_DS_VALUES) for _ in range(rng.randint(1, 6)))
    return text.encode()[:length].ljust(length)


# ---------------------------------------------------------------- mutators


def _m_field(rng: random.Random, buf: bytes) -> bytes:
    name = rng.choice(list(_FIELDS))
    tag, vr, kind = _FIELDS[name]
    return set_element(buf, tag, vr, _value(rng, kind))


def _m_nested(rng: random.Random, buf: bytes) -> bytes:
    """A numeric attribute anywhere (sequences included), rewritten in place (same length)."""
    tags = [(0x0028, 0x1053), (0x0028, 0x1052), (0x0020, 0x0032), (0x0020, 0x0037), (0x0028, 0x0030), (0x0018, 0x0050)]
    key = struct.pack("<HH", *rng.choice(tags))
    hits: list[int] = []
    start = 132
    while (i := buf.find(key, start)) >= 0 and len(hits) < 64:
        hits.append(i)
        start = i + 1
    if not hits:
        return _m_field(rng, buf)
    i = rng.choice(hits)
    if buf[i + 4 : i + 6] == b"DS":  # explicit VR: 2-byte length
        length, vstart = struct.unpack_from("<H", buf, i + 6)[0], i + 8
    else:
        length, vstart = struct.unpack_from("<I", buf, i + 4)[0], i + 8
    if length == 0 or vstart + length > len(buf) or length > 1024:
        return buf
    return buf[:vstart] + _ds_same_length(rng, length) + buf[vstart + length :]


def _m_vr(rng: random.Random, buf: bytes) -> bytes:
    elems = [e for e in index_elements(buf) or [] if e.explicit and e.vr]
    if not elems:
        return _m_bytes(rng, buf)
    e = rng.choice(elems)
    vr = (
        rng.choice([b"SQ", b"UN", b"OB", b"OW", b"AT", b"US", b"SS", b"FD", b"FL", b"UL", b"DS", b"IS", b"UI", b"LO"])
        if rng.random() < 0.6
        else bytes(rng.choice(string.ascii_uppercase.encode()) for _ in range(2))
        if rng.random() < 0.7
        else rng.randbytes(2)
    )
    return buf[: e.pos + 4] + vr + buf[e.pos + 6 :]


def _m_length(rng: random.Random, buf: bytes) -> bytes:
    elems = index_elements(buf) or []
    if not elems:
        return _m_bytes(rng, buf)
    e = rng.choice(elems)
    long_form = not e.explicit or e.vr in _LONG or not e.vr
    off = e.pos + (8 if e.explicit and e.vr in _LONG else 4 if not e.explicit or not e.vr else 6)
    if long_form:
        new = rng.choice((0, 1, 2, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, max(0, e.value_length) + rng.randint(-4, 4)))
        return buf[:off] + struct.pack("<I", new & 0xFFFFFFFF) + buf[off + 4 :]
    new = rng.choice((0, 1, 0xFFFF, 0xFFFE, max(0, e.value_length) + rng.randint(-4, 4)))
    return buf[:off] + struct.pack("<H", new & 0xFFFF) + buf[off + 2 :]


def _m_delete(rng: random.Random, buf: bytes) -> bytes:
    elems = index_elements(buf) or []
    if not elems:
        return _m_bytes(rng, buf)
    return delete_element(buf, rng.choice(elems).tag)


def _m_pixels(rng: random.Random, buf: bytes) -> bytes:
    elems = [e for e in index_elements(buf) or [] if e.tag == (0x7FE0, 0x0010)]
    if not elems:
        return _m_bytes(rng, buf)
    e = elems[0]
    r = rng.random()
    if r < 0.3:  # shorter
        return buf[: e.value_start + max(0, rng.randrange(max(1, e.end - e.value_start)))]
    if r < 0.6 and e.value_length > 0:  # random bytes of the same length
        n = min(e.value_length, len(buf) - e.value_start)
        return buf[: e.value_start] + rng.randbytes(n) + buf[e.value_start + n :]
    if r < 0.8:  # a few random bytes, re-encoded with a correct length
        return buf[: e.pos] + encode_element(e.tag, e.vr or b"OW", rng.randbytes(rng.randrange(0, 64)), e.explicit)
    # flips in the fragments / pixel values
    out = bytearray(buf)
    for _ in range(rng.randint(1, 32)):
        out[rng.randrange(e.value_start, len(out))] = rng.randrange(256)
    return bytes(out)


def _m_bytes(rng: random.Random, buf: bytes) -> bytes:
    out = bytearray(buf)
    if not out:
        return rng.randbytes(rng.randrange(1, 512))
    header = next((e.pos for e in index_elements(buf) or [] if e.tag == (0x7FE0, 0x0010)), len(out))
    for _ in range(rng.choice((1, 2, 4, 8, 32))):
        r = rng.random()
        pos = rng.randrange(min(132, len(out) - 1), max(min(132, len(out) - 1) + 1, header))
        if r < 0.7:
            value = rng.randrange(256) if rng.random() < 0.7 else rng.choice((0, 0xFF, 0x7F, 0x80))
            if pos < len(out):  # earlier deletions may have shortened the buffer below `header`
                out[pos] = value
        elif r < 0.85:
            del out[pos : pos + rng.randint(1, 8)]
        else:
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
    return bytes(out)


def _m_truncate(rng: random.Random, buf: bytes) -> bytes:
    return buf[: rng.randrange(0, len(buf) + 1)]


_MUTATORS: tuple[tuple[Callable[[random.Random, bytes], bytes], int], ...] = (
    (_m_field, 40),
    (_m_nested, 8),
    (_m_vr, 8),
    (_m_length, 8),
    (_m_delete, 6),
    (_m_pixels, 8),
    (_m_bytes, 18),
    (_m_truncate, 4),
)


def mutate(rng: random.Random, buf: bytes) -> bytes:
    funcs, weights = zip(*_MUTATORS)
    for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
        buf = rng.choices(funcs, weights)[0](rng, buf)
    return buf


# ---------------------------------------------------------------- inputs


@dataclass
class FuzzInput:
    kind: str  # instance | series | frames | ids
    index: int
    seed_name: str = ""
    instances: list[bytes] = field(default_factory=list)
    scenario: str = ""
    via_files: bool = False
    n_frames: int = 0
    frame_positions: npt.NDArray[np.float64] | None = None
    strings: list[str] = field(default_factory=list)


_SEED_CACHE: dict[str, bytes] = {}


def seed_bytes(name: str) -> bytes:
    if name not in _SEED_CACHE:
        _SEED_CACHE[name] = (DATA / name).read_bytes()
    return _SEED_CACHE[name]


def _rng(master: int, index: int) -> random.Random:
    return random.Random(f"atlasflow-fuzz:{master}:{index}")


def make_input(master: int, index: int, kinds: dict[str, float] | None = None) -> FuzzInput:
    """The `index`-th input of the run seeded `master` (deterministic)."""
    rng = _rng(master, index)
    weights = kinds or {"instance": 0.82, "series": 0.08, "frames": 0.01, "ids": 0.09}
    kind = rng.choices(list(weights), list(weights.values()))[0]
    if kind == "instance":
        name = rng.choices(list(SEEDS), list(SEEDS.values()))[0]
        return FuzzInput("instance", index, name, [mutate(rng, seed_bytes(name))], via_files=rng.random() < 0.125)
    if kind == "series":
        return _series_input(rng, index)
    if kind == "frames":
        return _frames_input(rng, index)
    return FuzzInput("ids", index, strings=[_random_string(rng) for _ in range(8)])


def _ds_text(*values: float) -> bytes:
    return "\\".join(f"{v:.10g}" for v in values).encode()


_SCENARIOS = (
    "regular", "duplicate", "huge_gap", "whole_gaps", "irregular", "tilt", "shear_huge", "orientation",
    "spacing", "size", "crafted_one", "nan_position", "many", "reversed_normal",
)  # fmt: skip


def _series_input(rng: random.Random, index: int) -> FuzzInput:
    name = rng.choice(SERIES_SEEDS)
    base = seed_bytes(name)
    scenario = rng.choice(_SCENARIOS)
    n = rng.randint(2, 12) if scenario != "many" else rng.randint(20, 40)
    step = rng.choice((0.5, 1.0, 2.5, 5.0))
    z = [k * step for k in range(n)]
    shift = [(0.0, 0.0)] * n
    if scenario == "duplicate":
        z[rng.randrange(1, n)] = z[0]
    elif scenario == "huge_gap":
        z[-1] = rng.choice((1e6, 1e9, 1e15, 1e300, 123456.7))
    elif scenario == "whole_gaps":
        z = [k * step * rng.choice((1, 1, 2, 3, 50, 5000)) for k in range(n)]
        z = list(np.cumsum([0.0] + [step * rng.choice((1, 1, 2, 3, 40, 10000)) for _ in range(n - 1)]))
    elif scenario == "irregular":
        z = sorted(rng.uniform(0, 100) for _ in range(n))
    elif scenario == "tilt":
        t = rng.choice((0.1, 0.5, 1.0, 10.0))
        shift = [(0.0, k * step * t) for k in range(n)]
    elif scenario == "shear_huge":
        shift = [(k * rng.choice((1e3, 1e6, 1e9)), 0.0) for k in range(n)]
    elif scenario == "nan_position":
        z[rng.randrange(n)] = float("nan")
    elif scenario == "reversed_normal":
        z = z[::-1]
    instances = []
    for k in range(n):
        buf = base
        uid = f"1.2.826.0.1.3680043.8.498.{index}.{k + 1}".encode()
        buf = set_element(buf, (0x0008, 0x0018), b"UI", uid)
        buf = set_element(buf, (0x0020, 0x0037), b"DS", _ds_text(1, 0, 0, 0, 1, 0))
        buf = set_element(buf, (0x0020, 0x0032), b"DS", _ds_text(shift[k][0], shift[k][1], z[k]))
        if scenario == "orientation" and k == n - 1:
            buf = set_element(buf, (0x0020, 0x0037), b"DS", _ds_text(1, 0, 0, 0, rng.choice((0.9, 0.99999, -1)), 0))
        if scenario == "spacing" and k == n - 1:
            buf = set_element(buf, (0x0028, 0x0030), b"DS", rng.choice((b"0.5\\0.5", b"0\\0", b"-1\\1", b"1e308\\1")))
        if scenario == "size" and k == n - 1:
            buf = set_element(buf, (0x0028, 0x0010), b"US", struct.pack("<H", rng.choice((1, 64, 127))))
        if scenario == "crafted_one" and k == rng.randrange(n):
            buf = mutate(rng, buf)
        instances.append(buf)
    return FuzzInput("series", index, name, instances, scenario=scenario)


def _frames_input(rng: random.Random, index: int) -> FuzzInput:
    n = rng.choice((100, 500, 1000, 2000, 4000))
    mode = rng.choice(("every_other", "random_missing", "one_huge"))
    if mode == "every_other":
        pos = gapped_positions(n)
    elif mode == "random_missing":
        pos = np.cumsum(np.r_[0.0, rng.choices((1.0, 1.0, 2.0, 3.0), k=n - 1)])
    else:
        pos = np.r_[np.arange(n - 1, dtype=np.float64), rng.choice((1e5, 1e7, 1e12))]
    return FuzzInput("frames", index, scenario=mode, n_frames=n, frame_positions=pos)


_ALPHABETS = (
    string.ascii_letters + string.digits + "._-:",
    string.printable,
    "./\\:%\x00\n ",
    "".join(chr(c) for c in range(0x20, 0x7F)) + "éßø中文\u202e\ufeff\U0001f600",
)


def _random_string(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return rng.choice(("", ".", "..", "../x", "a/..", "a/b", "/etc/passwd", "a..b", "C:\\x", "a\x00b", "a\n", "-a"))
    if r < 0.25:
        return rng.randbytes(rng.randrange(0, 64)).decode("latin-1")
    alphabet = rng.choice(_ALPHABETS)
    length = rng.choice((1, 2, 8, 32, 128, 255, 256, 257, 1000))
    return "".join(rng.choice(alphabet) for _ in range(length))


# ---------------------------------------------------------------- running one input


@dataclass
class Outcome:
    """What one input did: ``result`` is "accepted", "refused:<REASON>" (reception),
    "failed:<REASON>" (assembly), "ids", or "crash"; ``error`` names a crash."""

    index: int
    kind: str
    result: str
    seconds: float
    error: str = ""
    detail: str = ""


class Crash(Exception):
    """Raised by a check that found an undocumented outcome (wrong reason, accepted bad id)."""


def _refusal_ok(exc: BaseException) -> bool:
    return isinstance(exc, ALLOWED_REFUSALS) and getattr(exc, "code", "INTERNAL") != "INTERNAL"


def run_input(item: FuzzInput, tmpdir: Path | None = None) -> Outcome:
    """Run one input through its pipeline; never raises (a crash is an Outcome)."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                result = _RUNNERS[item.kind](item, tmpdir)
    except MemoryError as exc:
        return Outcome(item.index, item.kind, "crash", time.perf_counter() - t0, "MemoryError", _alloc_note(exc))
    except Exception as exc:  # noqa: BLE001 - the harness classifies every exception
        if _refusal_ok(exc):  # escaped from a stage that should have classified it
            result = f"refused:{getattr(exc, 'reason', '?')}"
        else:
            where = _where(exc)
            return Outcome(item.index, item.kind, "crash", time.perf_counter() - t0, type(exc).__name__, where)
    return Outcome(item.index, item.kind, result, time.perf_counter() - t0)


def _where(exc: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "atlasflow" in f.filename] or frames
    last = ours[-1] if ours else None
    msg = str(exc).replace("\n", " ")[:160]
    return f"{Path(last.filename).name}:{last.lineno} {msg}" if last else msg


def _alloc_note(exc: MemoryError) -> str:
    shape, dtype = getattr(exc, "shape", None), getattr(exc, "dtype", None)
    if shape is not None and dtype is not None:
        return f"allocation of {int(np.prod(shape, dtype=object)) * dtype.itemsize} bytes {tuple(shape)} {dtype}"
    return str(exc)[:200]


def _reception(data: bytes) -> tuple[Any, str]:
    from atlasflow.common.errors import InvalidArgument
    from atlasflow.ingest.dicom import DICOM_STATUS, parse_instance

    try:
        ds, _info = parse_instance(data)
    except InvalidArgument as exc:
        if exc.reason not in DICOM_STATUS:
            raise Crash(f"reception reason without a DICOM status: {exc.reason}") from None
        return None, f"refused:{exc.reason}"
    return ds, "accepted"


def _assemble_and_write(datasets: list[Any]) -> str:
    from atlasflow.common.nifti import to_nifti_bytes
    from atlasflow.ingest.assemble import assemble_series
    from atlasflow.ingest.geometry import REPAIR
    from atlasflow.ingest.nifti_writer import nifti_header

    try:
        volume = assemble_series(datasets, policy=REPAIR)
    except AtlasflowError as exc:
        if not _refusal_ok(exc):
            raise
        return f"failed:{exc.reason}"
    nifti_header(volume.array.shape, volume.array.dtype, volume.affine)
    to_nifti_bytes(volume.array, volume.affine, compress=False)
    return "accepted"


def _run_instance(item: FuzzInput, tmpdir: Path | None) -> str:
    data = item.instances[0]
    ds, result = _reception(data)
    if ds is not None:
        result = _assemble_and_write([ds])
    if item.via_files and tmpdir is not None:
        _convert_file(data, tmpdir)
    return result


def _convert_file(data: bytes, tmpdir: Path) -> None:
    """``atlasflow convert``'s path over the same bytes as a file (fast header reader)."""
    from atlasflow.ingest.convert import convert

    src = tmpdir / "in"
    src.mkdir(exist_ok=True)
    (src / "x.dcm").write_bytes(data)
    try:
        convert([src], tmpdir / "out.nii")
    except AtlasflowError as exc:
        if not _refusal_ok(exc):
            raise


def _run_series(item: FuzzInput, tmpdir: Path | None) -> str:
    datasets = []
    refused = 0
    for data in item.instances:
        ds, _ = _reception(data)
        if ds is None:
            refused += 1
        else:
            datasets.append(ds)
    if not datasets:
        return "refused:ALL"
    return _assemble_and_write(datasets)


class _Constant:
    def __init__(self, plane: npt.NDArray[Any]) -> None:
        self.plane = plane

    def read(self) -> npt.NDArray[Any]:
        return self.plane


def gapped_positions(n_out: int) -> npt.NDArray[np.float64]:
    """Slice positions (mm, 1 mm grid) of an `n_out`-slice volume in which slices k with
    k % 5 in (3, 4) are missing: gaps 1, 1, 3 mm (median 1), 2 of every 5 slices to fill."""
    z = np.arange(n_out)
    keep = (z % 5 < 3) | (z == n_out - 1)
    return z[keep].astype(np.float64)


def synthetic_frames(positions: npt.NDArray[np.float64], side: int = 4) -> list[Any]:
    """`FrameRef`s of `side` x `side` planes (value = slice number) at z = `positions` mm."""
    from atlasflow.ingest.frames import FrameRef

    iop = np.array([1.0, 0, 0, 0, 1, 0])
    spacing = np.array([1.0, 1.0])
    return [
        FrameRef(
            rows=side,
            cols=side,
            ipp=np.array([0.0, 0.0, float(z)]),
            iop=iop,
            pixel_spacing=spacing,
            slope=1.0,
            intercept=0.0,
            source=_Constant(np.full((side, side), k % 1000, dtype=np.int16)),
            sop_instance_uid=f"1.2.3.{k}",
        )
        for k, z in enumerate(positions)
    ]


def _run_frames(item: FuzzInput, tmpdir: Path | None) -> str:
    from atlasflow.ingest.assemble import assemble_frames
    from atlasflow.ingest.geometry import REPAIR

    assert item.frame_positions is not None
    try:
        volume = assemble_frames(synthetic_frames(item.frame_positions), REPAIR)
    except AtlasflowError as exc:
        if not _refusal_ok(exc):
            raise
        return f"failed:{exc.reason}"
    return f"accepted:{volume.array.shape[2]}"


def _request_messages() -> list[type[Any]]:
    """Every request message type of every atlasflow service."""
    import importlib

    out = []
    for svc in ("ingest", "labels", "ranking", "segmentation"):
        try:
            mod = importlib.import_module(f"atlasflow.{svc}.v1.{svc}_pb2")
        except ImportError:
            continue
        for name in dir(mod):
            cls = getattr(mod, name)
            if name.endswith("Request") and hasattr(cls, "DESCRIPTOR"):
                out.append(cls)
    return out


_MESSAGES: list[type[Any]] = []


def _fill(message: Any, rng: random.Random, strings: list[str], depth: int = 0) -> None:
    from google.protobuf.descriptor import FieldDescriptor

    for fd in message.DESCRIPTOR.fields:
        if fd.type == FieldDescriptor.TYPE_STRING:
            if fd.is_repeated:
                getattr(message, fd.name).extend(rng.sample(strings, rng.randint(0, 3)))
            elif fd.containing_oneof is None or rng.random() < 0.5:
                setattr(message, fd.name, rng.choice(strings))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and depth < 3 and not fd.message_type.GetOptions().map_entry:
            if fd.is_repeated:
                _fill(getattr(message, fd.name).add(), rng, strings, depth + 1)
            elif fd.containing_oneof is None or rng.random() < 0.5:
                _fill(getattr(message, fd.name), rng, strings, depth + 1)


def _expect_invalid(fn: Callable[[], object], reasons: set[str]) -> bool:
    """True if `fn` accepted; False if it refused with one of `reasons`; Crash otherwise."""
    from atlasflow.common.errors import InvalidArgument

    try:
        fn()
    except InvalidArgument as exc:
        if exc.reason not in reasons:
            raise Crash(f"unexpected reason {exc.reason}") from None
        return False
    return True


def _run_ids(item: FuzzInput, tmpdir: Path | None) -> str:
    import re

    from atlasflow.common.blobstore import _check_digest
    from atlasflow.common.ids import check_id, check_message_ids
    from atlasflow.ingest.uploads import UploadStore
    from atlasflow.labels.rows import check_id as labels_check_id
    from atlasflow.ranking.entries import check_id as ranking_check_id

    global _MESSAGES
    if not _MESSAGES:
        _MESSAGES = _request_messages()
    rng = random.Random(item.index)
    pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}")
    for s in item.strings:
        if _expect_invalid(functools.partial(check_id, "case_id", s), {"INVALID_ID"}):
            if not pattern.fullmatch(s) or ".." in s or "/" in s:
                raise Crash("check_id accepted a malformed id")
        if _expect_invalid(functools.partial(UploadStore.check_upload_id, s), {"INVALID_UPLOAD_ID"}):
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", s):
                raise Crash("check_upload_id accepted a malformed id")
        for fn in (labels_check_id, ranking_check_id):
            try:
                fn("case_id", s)
            except AtlasflowError as exc:
                if exc.code != "INVALID_ARGUMENT":
                    raise
        try:
            _check_digest(s)
        except (AtlasflowError, ValueError):
            pass
    for cls in rng.sample(_MESSAGES, min(4, len(_MESSAGES))):
        msg = cls()
        _fill(msg, rng, item.strings)
        _expect_invalid(functools.partial(check_message_ids, msg), {"INVALID_ID"})
    return "ids"


_RUNNERS: dict[str, Callable[[FuzzInput, Path | None], str]] = {
    "instance": _run_instance,
    "series": _run_series,
    "frames": _run_frames,
    "ids": _run_ids,
}


def run_range(master: int, start: int, count: int, emit: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Inputs [start, start + count) of run `master`, in this process (see `run_input`)."""
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="atlasflow-fuzz-") as tmp:
        for i in range(start, start + count):
            out = run_input(make_input(master, i), Path(tmp))
            if emit is not None:
                emit(out)
            outcomes.append(out)
    return outcomes


def refuse_cleanly(data: bytes) -> str:
    """The outcome of one instance through reception -> assembly -> NIfTI ("crash:..." if it
    raised anything else than a documented refusal)."""
    out = run_input(FuzzInput("instance", 0, instances=[data]))
    return out.result if out.result != "crash" else f"crash:{out.error} {out.detail}"
