"""DICOMweb pieces without transport: QIDO-RS attributes and matching, DICOM JSON, multipart.

Attribute keywords are pydicom's; QIDO results are DICOM JSON (PS3.18 F.2) objects with the
attributes of PS3.18 Table 6.7.1-2 that the stored headers have.
"""

from __future__ import annotations

import fnmatch
import io
import re
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset

STUDY_KEYS = (
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "PatientName", "PatientID",
    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
)  # fmt: skip
SERIES_KEYS = ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "PerformedProcedureStepStartDate")
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames")
#: query parameters that are not attribute matches
CONTROL = {"limit", "offset", "fuzzymatching", "includefield", "includeField"}


class QueryError(ValueError):
    """A QIDO query parameter the gateway does not support (400)."""


@dataclass
class Instance:
    """One stored instance's header (no pixel data) and where it lives."""

    series_id: str
    header: Dataset

    def value(self, keyword: str) -> str:
        v = self.header.get(keyword, "")
        return "" if v is None else str(v)


def read_header(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)


def _match(value: str, pattern: str, keyword: str) -> bool:
    """PS3.4 C.2.2.2 matching on one value: single value, list (``\\``), wildcard (``*``, ``?``),
    date/time range (``a-b``); case-insensitive for person names."""
    if pattern == "":
        return True
    options = pattern.split("\\") if "\\" in pattern and keyword.endswith("UID") else [pattern]
    for opt in options:
        if keyword.endswith(("Date", "Time")) and "-" in opt:
            lo, _, hi = opt.partition("-")
            if value and (not lo or value >= lo) and (not hi or value <= hi):
                return True
        elif "*" in opt or "?" in opt:
            if fnmatch.fnmatchcase(
                value.upper() if keyword == "PatientName" else value, opt.upper() if keyword == "PatientName" else opt
            ):
                return True
        elif (value.upper() == opt.upper()) if keyword == "PatientName" else (value == opt):
            return True
    return False


def _keyword(param: str) -> str:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", param):
        kw = pydicom.datadict.keyword_for_tag(int(param, 16))
        if not kw:
            raise QueryError(f"unknown attribute tag {param}")
        return str(kw)
    if pydicom.datadict.tag_for_keyword(param) is None:
        raise QueryError(f"unknown attribute {param[:64]!r}")
    return param


def parse_query(
    params: Iterable[tuple[str, str]], level_keys: tuple[str, ...]
) -> tuple[dict[str, str], int, int, set[str]]:
    """(matches keyword -> pattern, limit, offset, extra include fields)."""
    matches: dict[str, str] = {}
    include: set[str] = set()
    limit, offset = 0, 0
    for key, value in params:
        low = key.lower()
        if low == "limit":
            limit = _nonneg(value, key)
        elif low == "offset":
            offset = _nonneg(value, key)
        elif low == "fuzzymatching":
            continue
        elif low == "includefield":
            include |= {"all"} if value == "all" else {_keyword(v) for v in value.split(",") if v}
        else:
            matches[_keyword(key)] = value
    del level_keys
    return matches, limit, offset, include


def _nonneg(value: str, key: str) -> int:
    if not value.isdigit():
        raise QueryError(f"{key} must be a non-negative integer")
    return int(value)


def matches(inst: Instance, query: dict[str, str]) -> bool:
    for kw, pattern in query.items():
        if kw == "ModalitiesInStudy":
            continue  # checked on the study
        if not _match(inst.value(kw), pattern, kw):
            return False
    return True


def to_json(ds: Dataset, bulk_uri: str | None = None) -> dict[str, Any]:
    """DICOM JSON of ``ds``; pixel data (and any bulk binary value) as a BulkDataURI when given,
    else left out."""

    def handler(elem: Any) -> str:
        return bulk_uri or ""

    out: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=handler)
    return {k: v for k, v in out.items() if v.get("BulkDataURI") != ""}


def pick(ds: Dataset, keywords: Iterable[str]) -> Dataset:
    out = Dataset()
    for kw in keywords:
        if kw in ds:
            out[kw] = ds[kw]
    return out


def study_result(instances: list[Instance], include: set[str]) -> dict[str, Any]:
    first = instances[0].header
    keys = [e.keyword for e in first if e.keyword and e.VR not in ("SQ", "OB", "OW")] if "all" in include else []
    res = to_json(pick(first, (*STUDY_KEYS, *include - {"all"}, *keys)))
    modalities = sorted({i.value("Modality") for i in instances if i.value("Modality")})
    res["00080061"] = {"vr": "CS", "Value": modalities}  # ModalitiesInStudy
    res["00201206"] = {"vr": "IS", "Value": [len({i.series_id for i in instances})]}  # NumberOfStudyRelatedSeries
    res["00201208"] = {"vr": "IS", "Value": [len(instances)]}  # NumberOfStudyRelatedInstances
    return res


def series_result(instances: list[Instance], include: set[str]) -> dict[str, Any]:
    first = instances[0].header
    res = to_json(pick(first, ("StudyInstanceUID", *SERIES_KEYS, *include)))
    res["00201209"] = {"vr": "IS", "Value": [len(instances)]}  # NumberOfSeriesRelatedInstances
    return res


def instance_result(inst: Instance, include: set[str]) -> dict[str, Any]:
    return to_json(pick(inst.header, ("StudyInstanceUID", "SeriesInstanceUID", "Modality", *INSTANCE_KEYS, *include)))


# ---------------------------------------------------------------------------- multipart
def new_boundary() -> str:
    return uuid.uuid4().hex


def part_header(boundary: str, content_type: str, first: bool) -> bytes:
    lead = b"" if first else b"\r\n"
    return lead + f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode()


def boundary_of(content_type: str) -> str:
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        raise QueryError('STOW-RS needs Content-Type multipart/related; type="application/dicom"')
    for p in params:
        k, _, v = p.partition("=")
        if k.strip().lower() == "boundary":
            return v.strip().strip('"')
    raise QueryError("the multipart Content-Type has no boundary")


class MultipartError(ValueError):
    """A multipart body that is not well formed (400)."""


#: the largest header section of one part, bytes
MAX_PART_HEADER_BYTES = 64 * 1024


class MultipartReader:
    """The parts of a ``multipart/related`` body read from a byte stream as it arrives (RFC 2046
    5.1.1): `next_part` gives each part's headers, `content` its bytes in pieces. It holds at
    most one received chunk plus a delimiter's length, never a whole part or body; a part whose
    content is not read to its end is skipped by the next `next_part`.

    Raises `MultipartError` for a body without the boundary, a header section over
    `MAX_PART_HEADER_BYTES`, or a body that ends before the closing delimiter.
    """

    def __init__(self, chunks: AsyncIterator[bytes], boundary: str) -> None:
        self._chunks = chunks.__aiter__()
        # the CRLF before the first delimiter belongs to it (a body may start with it)
        self._buf = bytearray(b"\r\n")
        self._delim = b"\r\n--" + boundary.encode("latin-1")
        self._eof = False
        self._state = "preamble"  # preamble | content | boundary | done

    async def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self._eof = True
            return False
        self._buf += chunk
        return True

    async def _need(self, n: int, what: str) -> None:
        while len(self._buf) < n:
            if not await self._fill():
                raise MultipartError(f"the body ends {what}")

    async def next_part(self) -> dict[str, str] | None:
        """The next part's headers (lower-case names), or None after the closing delimiter."""
        if self._state == "content":
            async for _skipped in self.content():
                pass
        if self._state == "done":
            return None
        if self._state == "preamble":
            while (i := self._buf.find(self._delim)) < 0:
                del self._buf[: max(0, len(self._buf) - len(self._delim) + 1)]
                if not await self._fill():
                    raise MultipartError("the body holds no part delimited by the boundary")
            del self._buf[:i]
        await self._need(len(self._delim) + 2, "after a delimiter")
        del self._buf[: len(self._delim)]
        if self._buf.startswith(b"--"):
            self._state = "done"
            return None
        # transport padding, then the CRLF that ends the delimiter line (kept: it starts the
        # header section, so that a part without headers is found as CRLF CRLF too)
        while (j := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > MAX_PART_HEADER_BYTES:
                raise MultipartError("a delimiter line is too long")
            await self._need(len(self._buf) + 1, "inside a delimiter line")
        if self._buf[:j].strip(b" \t"):
            raise MultipartError("a delimiter is followed by other text than the line end")
        del self._buf[:j]
        while (k := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > MAX_PART_HEADER_BYTES:
                raise MultipartError("a part's header section is too long")
            await self._need(len(self._buf) + 1, "inside a part's headers")
        head = bytes(self._buf[2:k])
        del self._buf[: k + 4]
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n") if head else ():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        self._state = "content"
        return headers

    async def content(self) -> AsyncIterator[bytes]:
        """The current part's bytes up to its delimiter, in pieces as they arrive."""
        if self._state != "content":
            return
        keep = len(self._delim) - 1
        while True:
            i = self._buf.find(self._delim)
            if i >= 0:
                piece = bytes(self._buf[:i])
                del self._buf[:i]
                self._state = "boundary"
                if piece:
                    yield piece
                return
            if len(self._buf) > keep:
                piece = bytes(self._buf[:-keep])
                del self._buf[:-keep]
                yield piece
            if not await self._fill():
                raise MultipartError("the body ends inside a part (no closing delimiter)")
