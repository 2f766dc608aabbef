"""De-identification of what an export writes: DICOM PS3.15 Annex E (no grpc).

The Basic Application Level Confidentiality Profile with, selectable, the options "Retain
Longitudinal Temporal Information with Full Dates" (113106), "... with Modified Dates"
(113107) and "Clean Descriptors" (113105). The actions come from the standard's own table,
Table E.1-1, vendored as data (`ps315_table_e1_1.json`: every attribute with its Basic
Profile action and the action of each option; DICOM PS3.15 2024b as parsed by Innolitics'
dicom-standard, MIT; regenerate with scripts/update_deid_table.py), never from a hand-picked
tag list. `deidentify` applies it to a data set, recursively into sequence items:

    D  a dummy value of the attribute's VR (UIDs: the keyed pseudonym; Patient ID: the
       patient's pseudonym)                     Z  zero length (Patient's Name: the pseudonym)
    X  removed                                  K  kept
    C  cleaned: dates shifted by the patient's offset (Modified Dates), free text stripped
       of the identifying values the data set carries and of anything that looks like a date
       (Clean Descriptors)
    U  the UID replaced by its keyed pseudonym "2.25.<128-bit HMAC>" (same UID, same key ->
       same pseudonym, so references stay consistent across instances and exports)

Compound actions (the choice depends on the IOD's attribute type, which the table does not
carry): X/Z -> Z, Z/D / X/D / X/Z/D -> D (valid whatever the type; none of them retains
information), X/Z/U* (Referenced / Source Image Sequence) -> kept with its items processed
(their UIDs pseudonymised). Private attributes (odd groups) are removed (Retain Safe Private is
not offered); curve (50xx) and overlay (60xx) data follow their rows. Attributes the table
does not list are kept (the profile lists every standard attribute that can identify).
Afterwards (0012,0062) PatientIdentityRemoved = YES, (0012,0063) DeidentificationMethod,
(0012,0064) DeidentificationMethodCodeSequence (CID 7050 codes of the profile and options
used) and (0028,0303) LongitudinalTemporalInformationModified are set.

Pseudonyms (`Pseudonymizer`) are HMAC-SHA256 under a secret key (the labels service's
DEID_KEY_FILE, or `<data_dir>/deid.key` created 0600): patient "ANON-<20 hex>", case
"case-<20 hex>", UIDs "2.25.<int>", and a per-patient date shift of 365..3649 days back.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence

from atlasflow.common.errors import FailedPrecondition, InvalidArgument

DOMAIN = "atlasflow.labels"
TABLE_FILE = Path(__file__).with_name("ps315_table_e1_1.json")
KEY_BYTES = 32

DATES_REMOVED, DATES_MODIFIED, DATES_FULL = "REMOVED", "MODIFIED", "FULL"
_DATES = (DATES_REMOVED, DATES_MODIFIED, DATES_FULL)

# CID 7050 De-identification Method (DCM codes).
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
CLEAN_DESCRIPTORS = ("113105", "Clean Descriptors Option")
FULL_DATES = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")
MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")


@dataclass(frozen=True)
class DeidOptions:
    """Which options of the profile apply. dates: REMOVED (the Basic Profile: dates removed or
    dummy), MODIFIED (shifted by a per-patient offset, intervals kept) or FULL (kept)."""

    dates: str = DATES_REMOVED
    clean_descriptors: bool = False

    def __post_init__(self) -> None:
        if self.dates not in _DATES:
            raise InvalidArgument(
                "INVALID_ARGUMENT",
                "deidentification.dates must be REMOVED, MODIFIED or FULL",
                domain=DOMAIN,
                metadata={"field": "deidentification.dates"},
            )

    def codes(self) -> list[tuple[str, str]]:
        """(code value, meaning) of the profile and options, CID 7050."""
        out = [BASIC_PROFILE]
        if self.dates == DATES_FULL:
            out.append(FULL_DATES)
        elif self.dates == DATES_MODIFIED:
            out.append(MODIFIED_DATES)
        if self.clean_descriptors:
            out.append(CLEAN_DESCRIPTORS)
        return out

    def method(self) -> str:
        """(0012,0063) DeidentificationMethod text (LO, 64 characters at most)."""
        parts = ["PS3.15 E Basic"]
        if self.dates != DATES_REMOVED:
            parts.append("Long " + ("Full" if self.dates == DATES_FULL else "Modified") + " Dates")
        if self.clean_descriptors:
            parts.append("Clean Desc")
        return ("atlasflow " + " + ".join(parts))[:64]

    def to_dict(self) -> dict[str, Any]:
        return {"dates": self.dates, "clean_descriptors": self.clean_descriptors}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeidOptions:
        return cls(str(d.get("dates", DATES_REMOVED)), bool(d.get("clean_descriptors", False)))


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class TableRow:
    """One row of Table E.1-1: tag (exact) or group mask, and the actions by column."""

    name: str
    tag: int  # exact tag, or the masked value
    mask: int  # 0xFFFFFFFF for an exact tag
    basic: str
    options: Mapping[str, str]

    def action(self, options: DeidOptions) -> str:
        """The action under `options`: an option's column wins over the Basic Profile."""
        if self.options.get("cleanDescOpt") and options.clean_descriptors:
            return self.options["cleanDescOpt"]
        if options.dates == DATES_FULL and self.options.get("rtnLongFullDatesOpt"):
            return self.options["rtnLongFullDatesOpt"]
        if options.dates == DATES_MODIFIED and self.options.get("rtnLongModifDatesOpt"):
            return self.options["rtnLongModifDatesOpt"]
        return self.basic


_TAG = re.compile(r"^\(([0-9A-FX]{4}),([0-9A-FX]{4})\)$")


@functools.cache
def table() -> dict[str, Any]:
    """The vendored table document (title, standard, source, licence, attributes)."""
    doc: dict[str, Any] = json.loads(TABLE_FILE.read_text())
    return doc


@functools.cache
def table_rows() -> tuple[TableRow, ...]:
    """Every attribute row of Table E.1-1 (the private-attributes row excluded: private
    attributes are always removed here)."""
    rows = []
    for r in table()["attributes"]:
        m = _TAG.match(str(r["tag"]).upper())
        if m is None:
            continue  # "(GGGG,EEEE) WHERE GGGG IS ODD": private attributes, handled apart
        text = m.group(1) + m.group(2)
        value = int(text.replace("X", "0"), 16)
        mask = int("".join("0" if c == "X" else "F" for c in text), 16)
        opts = {k: str(v) for k, v in r.items() if k.endswith("Opt") and v}
        rows.append(TableRow(str(r["name"]), value, mask, str(r["basicProfile"]).replace(" ", ""), opts))
    return tuple(rows)


@functools.cache
def _index() -> tuple[dict[int, TableRow], tuple[TableRow, ...]]:
    exact = {r.tag: r for r in table_rows() if r.mask == 0xFFFFFFFF}
    masked = tuple(r for r in table_rows() if r.mask != 0xFFFFFFFF)
    return exact, masked


def row_of(tag: int) -> TableRow | None:
    """The table row naming `tag` (exact, or a repeating group such as 60xx,3000), if any.
    Repeating groups (50xx, 60xx) are even groups only (odd groups are private)."""
    exact, masked = _index()
    row = exact.get(tag)
    if row is not None:
        return row
    if (tag >> 16) % 2 == 0:
        for r in masked:
            if tag & r.mask == r.tag:
                return r
    return None


# ------------------------------------------------------------------ pseudonyms


def ensure_key_file(path: Path) -> Path:
    """Create `path` with a fresh random key (mode 0600, directory 0700 if created) unless
    it exists; return it."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(KEY_BYTES).encode() + b"\n")
        finally:
            os.close(fd)
    return path


class Pseudonymizer:
    """Keyed, stable pseudonyms (HMAC-SHA256): the same input and key give the same
    pseudonym in every export, another key gives others."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise FailedPrecondition(
                "DEID_KEY_INVALID", "the de-identification key must be at least 16 bytes", domain=DOMAIN
            )
        self._key = bytes(key)

    @classmethod
    def from_file(cls, path: Path) -> Pseudonymizer:
        """The key in `path` (its bytes, surrounding whitespace stripped; e.g. a Kubernetes
        Secret mounted as a file). FailedPrecondition DEID_KEY_INVALID when missing or short."""
        try:
            data = Path(path).read_bytes().strip()
        except OSError as exc:
            raise FailedPrecondition(
                "DEID_KEY_INVALID", "the de-identification key file cannot be read", domain=DOMAIN
            ) from exc
        return cls(data)

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """ "2.25.<decimal of 128 bits of HMAC>" (PS3.5 B.2; at most 44 characters)."""
        return "2.25." + str(int.from_bytes(self._mac("uid", uid.strip())[:16], "big"))

    def patient(self, patient_key: str) -> str:
        return "ANON-" + self._mac("patient", patient_key).hex()[:20].upper()

    def case(self, case_id: str) -> str:
        return "case-" + self._mac("case", case_id).hex()[:20]

    def date_shift_days(self, patient_key: str) -> int:
        """Days to move the patient's dates back (365..3649): one offset per patient, so
        intervals between the patient's studies are kept."""
        return 365 + int.from_bytes(self._mac("date-shift", patient_key)[:4], "big") % 3285


def patient_key(ds: pydicom.Dataset) -> str:
    """Who the data set's patient is, for pseudonyms and the date shift: IssuerOfPatientID +
    PatientID, or the StudyInstanceUID when there is no Patient ID."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return f"{str(ds.get('IssuerOfPatientID', '') or '').strip()}\x00{pid}"
    return "study\x00" + str(ds.get("StudyInstanceUID", "") or "").strip()


# ------------------------------------------------------------------ actions

_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
_STRING_VRS = _TEXT_VRS | {"DA", "TM", "DT", "AS", "IS", "DS", "UI"}
_DUMMY = "ANONYMIZED"
_DATE_LIKE = re.compile(r"\b(\d{8}|\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})\b")


@dataclass
class _Context:
    pseudo: Pseudonymizer
    options: DeidOptions
    patient: str  # the patient's pseudonym
    shift: timedelta
    identifiers: list[str]
    done: set[int]  # ids of the data sets processed: highdicom shares items between sequences


def _dummy(elem: DataElement, ctx: _Context) -> Any:
    vr = elem.VR
    if elem.tag in (0x00100020, 0x00100010):  # Patient ID, Patient's Name: the pseudonym
        return ctx.patient
    if vr == "UI":
        return _uids(elem.value, ctx)
    if vr in ("AE", "CS", "SH"):
        return _DUMMY[:16]
    if vr in _TEXT_VRS:
        return _DUMMY
    return {
        "DA": "19000101",
        "TM": "000000",
        "DT": "19000101000000",
        "AS": "000D",
        "IS": "0",
        "DS": "0",
    }.get(vr, b"" if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN") else 0)


def _uids(value: Any, ctx: _Context) -> Any:
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return [ctx.pseudo.uid(str(v)) for v in value if str(v)]
    return ctx.pseudo.uid(str(value)) if str(value or "") else ""


def _shift_date(text: str, shift: timedelta) -> str:
    """Shift "YYYYMMDD" (the date part of a DA or DT) back by `shift`; other text -> dummy."""
    try:
        d = date(int(text[0:4]), int(text[4:6]), int(text[6:8])) - shift
    except (ValueError, IndexError):
        return "19000101" + text[8:] if len(text) > 8 else "19000101"
    return d.strftime("%Y%m%d") + text[8:]


def clean_text(text: str, identifiers: list[str]) -> str:
    """`text` without the identifying values (case-insensitive) and anything date-like."""
    out = text
    for ident in identifiers:
        out = re.sub(re.escape(ident), "", out, flags=re.IGNORECASE)
    out = _DATE_LIKE.sub("", out)
    return re.sub(r"\s{2,}", " ", out).strip()


def _clean(elem: DataElement, ctx: _Context) -> Any:
    vr, value = elem.VR, elem.value
    if vr in ("DA", "DT"):
        if ctx.options.dates == DATES_MODIFIED:
            if isinstance(value, (list, pydicom.multival.MultiValue)):
                return [_shift_date(str(v), ctx.shift) for v in value]
            return _shift_date(str(value), ctx.shift) if str(value or "") else value
        return _dummy(elem, ctx)
    if vr == "TM" or vr not in _TEXT_VRS:
        return value  # times keep their time of day under a whole-day shift; numbers kept
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return [clean_text(str(v), ctx.identifiers) for v in value]
    return clean_text(str(value), ctx.identifiers)


def _identifiers(ds: pydicom.Dataset, options: DeidOptions) -> list[str]:
    """Values the data set carries in attributes the profile removes or replaces (names,
    ids, dates, UIDs; PN components apart), longest first, 3+ characters: what cleaning
    removes from the descriptors it keeps."""
    found: set[str] = set()

    def walk(d: pydicom.Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
                continue
            row = row_of(int(elem.tag))
            if elem.tag.is_private or (row is not None and row.action(options) not in ("K", "C")):
                if elem.VR in _TEXT_VRS | {"DA", "DT", "UI"} and elem.value not in (None, ""):
                    values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
                    for v in values:
                        s = str(v).strip()
                        found.add(s)
                        if elem.VR == "PN":
                            found.update(p for p in re.split(r"[\^=\s]+", s) if p)

    walk(ds)
    return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)


def _apply(ds: pydicom.Dataset, ctx: _Context) -> None:
    if id(ds) in ctx.done:  # the same item object in two sequences: processed once
        return
    ctx.done.add(id(ds))
    for elem in list(ds):
        tag = int(elem.tag)
        if elem.tag.is_private or elem.tag.element == 0:  # private; group lengths (retired)
            del ds[elem.tag]
            continue
        row = row_of(tag)
        action = row.action(ctx.options) if row is not None else "K"
        if elem.VR == "SQ":
            if action == "X":
                del ds[elem.tag]
            elif action in ("Z", "X/Z"):
                elem.value = DicomSequence([])
            else:  # K, D, C, U, X/Z/U*, Z/D...: the items, processed
                for item in elem.value:
                    _apply(item, ctx)
            continue
        if action == "K":
            continue
        if action == "X":
            del ds[elem.tag]
        elif action in ("Z", "X/Z"):
            elem.value = ctx.patient if tag == 0x00100010 else ("" if elem.VR in _STRING_VRS else None)
        elif action in ("D", "Z/D", "X/D", "X/Z/D"):
            elem.value = _dummy(elem, ctx)
        elif action in ("U", "X/Z/U*"):
            elem.value = _uids(elem.value, ctx) if elem.VR == "UI" else _dummy(elem, ctx)
        elif action == "C":
            elem.value = _clean(elem, ctx)
        else:  # an action this module does not know: remove (deny by default)
            del ds[elem.tag]


def deidentify(ds: pydicom.Dataset, pseudo: Pseudonymizer, options: DeidOptions) -> pydicom.Dataset:
    """De-identify `ds` in place (and return it) per Table E.1-1 under `options` (see the
    module docstring); the File Meta's MediaStorageSOPInstanceUID follows the new SOP
    Instance UID."""
    key = patient_key(ds)
    ctx = _Context(
        pseudo,
        options,
        pseudo.patient(key),
        timedelta(days=pseudo.date_shift_days(key)),
        _identifiers(ds, options) if options.clean_descriptors else [],
        set(),
    )
    _apply(ds, ctx)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = options.method()
    items = []
    for value, meaning in options.codes():
        item = pydicom.Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = DicomSequence(items)
    ds.LongitudinalTemporalInformationModified = {
        DATES_REMOVED: "REMOVED",
        DATES_MODIFIED: "MODIFIED",
        DATES_FULL: "UNMODIFIED",
    }[options.dates]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for tag in (0x00020016, 0x00020017, 0x00020018):  # the sending and receiving AE titles
            if tag in meta:
                del meta[tag]
    return ds
