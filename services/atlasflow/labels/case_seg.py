"""One case's DICOM SEG in an export, or why there is none (no grpc).

`build_case_seg` builds the SEG of a label version (atlasflow.labels.dicom_seg.export_dicom_seg)
from the source instances a caller-supplied function fetches, and turns every refusal or
failure into a `SegOutcome` (atlasflow.labels.export_jobs), so that one odd case never stops
the export of the others. The export worker (atlasflow.labels.worker.Exporter) writes the
file with the case (atlasflow.labels.export.export_case) and sends it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pydicom

from atlasflow.common.errors import AtlasflowError, FailedPrecondition, InvalidArgument, NotFound
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.labels.deid import DeidOptions, Pseudonymizer, deidentify
from atlasflow.labels.dicom_seg import export_dicom_seg
from atlasflow.labels.export_jobs import SEG_FAILED, SEG_REFUSED, SEG_WRITTEN, SegOutcome
from atlasflow.labels.repository import Provenance

# Refusals: the case cannot have a SEG (a retry gives the same answer); anything else failed.
_REFUSING = (FailedPrecondition, InvalidArgument, NotFound)


def build_case_seg(
    fetch_sources: Callable[[str], Sequence[pydicom.Dataset]],
    ct_digest: str,
    label_map_nifti: bytes,
    provenance: Provenance,
    version_id: str,
    *,
    case_id: str = "",
    organ_provenance: Mapping[int, Provenance] | None = None,
    organ_versions: Mapping[int, str] | None = None,
    deid: tuple[Pseudonymizer, DeidOptions] | None = None,
) -> tuple[pydicom.Dataset | None, bytes | None, SegOutcome]:
    """The DICOM SEG of one label version, or why there is none.

    fetch_sources(ct_digest) returns the source CT instances of the version's CT (headers are
    enough) or raises an AtlasflowError: NotFound / FailedPrecondition / InvalidArgument make
    the outcome REFUSED (e.g. NotFound "SOURCE_SERIES_NOT_FOUND"), others FAILED (e.g.
    Unavailable "INGEST_UNAVAILABLE"). The SEG (`atlasflow.labels.dicom_seg.export_dicom_seg`,
    UIDs derived from `version_id`) is refused with GRID_DIFFERS_FROM_SOURCE when the label
    map's (X, Y, Z) RAS+ grid is not the source images'. Returns (dataset, Part-10 bytes,
    outcome WRITTEN) or (None, None, outcome REFUSED / FAILED); any other exception while
    building makes the outcome FAILED with reason DICOM_SEG_ERROR (metadata "error": its type),
    so that one odd case never stops the export of the others.

    deid: (pseudonymizer, options) de-identifies the SEG (`atlasflow.labels.deid.deidentify`,
    PS3.15 E) after it is built from the source headers: its patient and study identity, and
    every UID it holds (its own, the study's, the frame of reference's and the referenced
    source instances'), become the keyed pseudonyms, so the SEG references the pseudonymised
    source instances that a de-identified export of the same series would carry. None: the
    SEG keeps the source identity (an identified export).
    """
    try:
        sources = fetch_sources(ct_digest)
        labels, affine = from_nifti_bytes(label_map_nifti)
        prov = {oid: (organ_provenance or {}).get(oid, provenance) for oid in ORGANS}
        seg = export_dicom_seg(
            sources, np.asarray(labels), affine, provenance=prov, organ_versions=organ_versions, uid_seed=version_id
        )
        if deid is not None:
            deidentify(seg, deid[0], deid[1])
    except AtlasflowError as exc:
        state = SEG_REFUSED if isinstance(exc, _REFUSING) else SEG_FAILED
        return (
            None,
            None,
            SegOutcome(
                case_id,
                version_id,
                state,
                reason=exc.reason,
                reason_metadata={str(k): str(v) for k, v in (exc.metadata or {}).items()},
            ),
        )
    except Exception as exc:  # noqa: BLE001 - e.g. highdicom refusing odd source headers
        return (
            None,
            None,
            SegOutcome(
                case_id, version_id, SEG_FAILED, reason="DICOM_SEG_ERROR", reason_metadata={"error": type(exc).__name__}
            ),
        )
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    organs = [ORGAN_IDS[str(d.SegmentLabel)] for d in seg.SegmentSequence]
    refs = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    return (
        seg,
        buf.getvalue(),
        SegOutcome(case_id, version_id, SEG_WRITTEN, organs=organs, referenced_instance_count=len(refs)),
    )
