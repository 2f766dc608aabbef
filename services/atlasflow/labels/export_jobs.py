"""An export job's options and its per-case DICOM SEG outcomes, as stored with the job (no grpc).

`ExportOptions` (what a job writes besides the AbdomenAtlas layout: the DICOM SEG, a PACS
destination `PacsDestination`) and `SegOutcome` (one case's SEG outcome, the manifest's
per-case "dicom_seg") convert to and from the JSON objects the label repository stores with
the job (`ExportJobRecord.options`, `record_export_outcome`); `job_seg_outcomes` reads the
outcomes back. Used by the servicer (new jobs, job status) and the export worker
(atlasflow.labels.worker.Exporter).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from atlasflow.common.errors import InvalidArgument
from atlasflow.labels.repository import DOMAIN, ExportJobRecord, LabelRepository


@dataclass(frozen=True)
class PacsDestination:
    """A C-STORE peer: host, TCP port, its AE title (called) and ours (calling)."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = "ATLASFLOW"

    def validate(self) -> None:
        """InvalidArgument("INVALID_PACS_DESTINATION", metadata "field") when malformed."""

        def bad(f: str) -> InvalidArgument:
            return InvalidArgument(
                "INVALID_PACS_DESTINATION",
                "pacs_destination needs host, port 1-65535 and AE titles of "
                "1-16 printable characters without backslash",
                domain=DOMAIN,
                metadata={"field": f},
            )

        if not self.host or len(self.host) > 253 or any(c.isspace() for c in self.host):
            raise bad("pacs_destination.host")
        if not 0 < self.port < 65536:
            raise bad("pacs_destination.port")
        for name, ae in (("called_ae_title", self.called_ae), ("calling_ae_title", self.calling_ae)):
            if not ae.strip() or len(ae) > 16 or "\\" in ae or not ae.isprintable():
                raise bad(f"pacs_destination.{name}")


@dataclass(frozen=True)
class ExportOptions:
    """What an export job writes besides the AbdomenAtlas layout.

    Stored with the job as `to_dict()` (the label repository's `options`): {} for the
    defaults, else {"include_dicom_seg": true, "pacs": {"host", "port", "called_ae",
    "calling_ae"}} (each key only when set).
    """

    include_dicom_seg: bool = False
    pacs: PacsDestination | None = None

    @classmethod
    def checked(cls, include_dicom_seg: bool, pacs: PacsDestination | None) -> ExportOptions:
        """The options of a new export job, validated: InvalidArgument
        ("INVALID_PACS_DESTINATION", metadata "field") when a PACS destination is given without
        include_dicom_seg or is malformed (`PacsDestination.validate`)."""
        if pacs is not None:
            if not include_dicom_seg:
                raise InvalidArgument(
                    "INVALID_PACS_DESTINATION",
                    "pacs_destination needs include_dicom_seg",
                    domain=DOMAIN,
                    metadata={"field": "include_dicom_seg"},
                )
            pacs.validate()
        return cls(include_dicom_seg=include_dicom_seg, pacs=pacs)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.include_dicom_seg:
            d["include_dicom_seg"] = True
        if self.pacs is not None:
            d["pacs"] = asdict(self.pacs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportOptions:
        """The inverse of `to_dict` (unknown keys are ignored)."""
        p = d.get("pacs")
        pacs = None
        if isinstance(p, Mapping):
            pacs = PacsDestination(
                str(p.get("host", "")),
                int(p.get("port", 0)),
                str(p.get("called_ae", "")),
                str(p.get("calling_ae", "ATLASFLOW")),
            )
        return cls(include_dicom_seg=bool(d.get("include_dicom_seg", False)), pacs=pacs)


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
