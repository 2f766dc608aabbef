"""DICOMweb pieces without transport: QIDO-RS attributes and matching, DICOM JSON, multipart.

Attribute keywords are pydicom's; QIDO results are DICOM JSON (PS3.18 F.2) objects with the
attributes of PS3.18 Table 6.7.1-2 that the stored headers have.
"""

from __future__ import annotations

import fnmatch
import io
import re
import uuid
from collections.abc import Iterable, Iterator
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


def split_parts(body: bytes, boundary: str) -> Iterator[tuple[dict[str, str], bytes]]:
    """(headers, content) of each part of a multipart body."""
    delim = b"--" + boundary.encode()
    chunks = body.split(delim)
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.removeprefix(b"\r\n")
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = {}
        for line in head.split(b"\r\n"):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        yield headers, content.removesuffix(b"\r\n")
