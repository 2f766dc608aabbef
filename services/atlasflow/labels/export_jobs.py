"""An export job's options and its per-case DICOM SEG outcomes, as stored with the job (no grpc).

`ExportOptions` (what a job writes besides the AbdomenAtlas layout: the DICOM SEG, the id of
a configured PACS destination `PacsDestination` (`parse_pacs_destinations`), identified or
de-identified and with which options) and `SegOutcome` (one case's SEG outcome, the manifest's
per-case "dicom_seg") convert to and from the JSON objects the label repository stores with
the job (`ExportJobRecord.options`, `record_export_outcome`); `job_seg_outcomes` reads the
outcomes back. Used by the servicer (new jobs, job status) and the export worker
(atlasflow.labels.worker.Exporter).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from atlasflow.common.errors import InvalidArgument
from atlasflow.labels.deid import DeidOptions, table
from atlasflow.labels.repository import DOMAIN, ExportJobRecord, LabelRepository


@dataclass(frozen=True)
class PacsDestination:
    """A C-STORE peer from the server's configuration: host, TCP port, its AE title (called)
    and ours (calling)."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = "ATLASFLOW"

    def validate(self, where: str = "pacs_destination") -> None:
        """ValueError naming the bad field (`where`.host, .port, .called_ae, .calling_ae)."""
        if not self.host or len(self.host) > 253 or any(c.isspace() for c in self.host):
            raise ValueError(f"{where}.host: a host name or address is required")
        if not 0 < self.port < 65536:
            raise ValueError(f"{where}.port: 1-65535")
        for name, ae in (("called_ae", self.called_ae), ("calling_ae", self.calling_ae)):
            if not ae.strip() or len(ae) > 16 or "\\" in ae or not ae.isprintable():
                raise ValueError(f"{where}.{name}: 1-16 printable characters without backslash")


_DESTINATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_pacs_destinations(text: str) -> dict[str, PacsDestination]:
    """The PACS destinations of the server's configuration (labels setting
    EXPORT_PACS_DESTINATIONS): a JSON object, or the path of a file holding one,
    {"<id>": {"host": ..., "port": ..., "called_ae": ..., "calling_ae": ...}} (calling_ae
    optional, default "ATLASFLOW"); ids are 1-64 of [A-Za-z0-9._-]. "" -> none. Raises
    ValueError (the service refuses to start) when malformed."""
    text = text.strip()
    if not text:
        return {}
    raw = json.loads(text if text.startswith("{") else Path(text).read_text())
    if not isinstance(raw, dict):
        raise ValueError("EXPORT_PACS_DESTINATIONS must be a JSON object of id -> destination")
    out = {}
    for dest_id, d in raw.items():
        if not _DESTINATION_ID.match(str(dest_id)) or not isinstance(d, dict):
            raise ValueError(f"EXPORT_PACS_DESTINATIONS: bad destination id or entry {str(dest_id)[:64]!r}")
        dest = PacsDestination(
            str(d.get("host", "")),
            int(d.get("port", 0)),
            str(d.get("called_ae", "")),
            str(d.get("calling_ae", "ATLASFLOW")),
        )
        dest.validate(f"EXPORT_PACS_DESTINATIONS[{dest_id}]")
        out[str(dest_id)] = dest
    return out


@dataclass(frozen=True)
class ExportOptions:
    """What an export job writes besides the AbdomenAtlas layout, and how.

    include_dicom_seg: a DICOM SEG per case; pacs_destination_id: a configured PACS to send
    each SEG to; identified: the export keeps patient identity (admin only, audited; default
    False: de-identified); deid: the de-identification options (when not identified).
    Stored with the job as `to_dict()` (the label repository's `options`): {} for the
    defaults, else only the keys that differ ("include_dicom_seg", "pacs_destination_id",
    "identified", "deid").
    """

    include_dicom_seg: bool = False
    pacs_destination_id: str = ""
    identified: bool = False
    deid: DeidOptions = field(default_factory=DeidOptions)

    @classmethod
    def checked(
        cls,
        include_dicom_seg: bool,
        pacs_destination_id: str,
        destinations: Mapping[str, PacsDestination],
        *,
        identified: bool = False,
        deid: DeidOptions | None = None,
    ) -> ExportOptions:
        """The options of a new export job, validated: InvalidArgument
        ("INVALID_PACS_DESTINATION", metadata "field") when a PACS destination is named without
        include_dicom_seg, NotFound-like InvalidArgument ("UNKNOWN_PACS_DESTINATION", metadata
        "pacs_destination_id") when the id is not configured; identified with de-identification
        options is InvalidArgument("INVALID_ARGUMENT", field "deidentification")."""
        if pacs_destination_id:
            if not include_dicom_seg:
                raise InvalidArgument(
                    "INVALID_PACS_DESTINATION",
                    "pacs_destination_id needs include_dicom_seg",
                    domain=DOMAIN,
                    metadata={"field": "include_dicom_seg"},
                )
            if pacs_destination_id not in destinations:
                raise InvalidArgument(
                    "UNKNOWN_PACS_DESTINATION",
                    "pacs_destination_id is not a destination of this server's configuration",
                    domain=DOMAIN,
                    metadata={"pacs_destination_id": pacs_destination_id[:64]},
                )
        if identified and deid is not None and deid != DeidOptions():
            raise InvalidArgument(
                "INVALID_ARGUMENT",
                "an identified export takes no de-identification options",
                domain=DOMAIN,
                metadata={"field": "deidentification"},
            )
        return cls(include_dicom_seg, pacs_destination_id, identified, deid or DeidOptions())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.include_dicom_seg:
            d["include_dicom_seg"] = True
        if self.pacs_destination_id:
            d["pacs_destination_id"] = self.pacs_destination_id
        if self.identified:
            d["identified"] = True
        if self.deid != DeidOptions():
            d["deid"] = self.deid.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportOptions:
        """The inverse of `to_dict` (unknown keys are ignored; a job stored before
        de-identification existed is de-identified)."""
        deid = d.get("deid")
        return cls(
            include_dicom_seg=bool(d.get("include_dicom_seg", False)),
            pacs_destination_id=str(d.get("pacs_destination_id", "")),
            identified=bool(d.get("identified", False)),
            deid=DeidOptions.from_dict(deid) if isinstance(deid, Mapping) else DeidOptions(),
        )


def deid_manifest(options: ExportOptions) -> dict[str, Any]:
    """The manifest's "deidentification": how the export treats patient identity (the
    profile, its options and the table's source) or {"identified": true}."""
    if options.identified:
        return {"identified": True}
    doc = table()
    return {
        "identified": False,
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "options": [meaning for _, meaning in options.deid.codes()[1:]],
        "codes": [code for code, _ in options.deid.codes()],
        "table": f"{doc['standard']} Table E.1-1",
        "pseudonyms": "HMAC-SHA256 under the service's key: case folders, patient ids, UIDs",
    }


# Outcome states (DicomSegState without the prefix).
SEG_WRITTEN, SEG_SENT, SEG_SEND_FAILED, SEG_REFUSED, SEG_FAILED = (
    "WRITTEN",
    "SENT",
    "SEND_FAILED",
    "REFUSED",
    "FAILED",
)


@dataclass
class SegOutcome:
    """One case's DICOM SEG outcome in an export (the manifest's per-case "dicom_seg").

    state: WRITTEN, SENT, SEND_FAILED, REFUSED or FAILED; path/sha256: the file, relative to
    the export root, when written; organs: organ ids of segments 1..N; reason and
    reason_metadata: the ErrorInfo reason and metadata of a refusal or failure;
    c_store_status: DIMSE status of the C-STORE response (0 when none).
    """

    case_id: str
    version_id: str
    state: str
    path: str = ""
    sha256: str = ""
    organs: list[int] = field(default_factory=list)
    referenced_instance_count: int = 0
    reason: str = ""
    reason_metadata: dict[str, str] = field(default_factory=dict)
    c_store_status: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegOutcome:
        """The inverse of `to_dict` (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def job_seg_outcomes(repo: LabelRepository, job: ExportJobRecord) -> list[SegOutcome]:
    """The DICOM SEG outcomes recorded so far for `job`'s cases, in export order ([] when the
    job writes no SEG). Blocking (reads the repository)."""
    if not ExportOptions.from_dict(job.options).include_dicom_seg:
        return []
    return [SegOutcome.from_dict(o.outcome) for o in repo.list_export_outcomes(job.job_id)]
