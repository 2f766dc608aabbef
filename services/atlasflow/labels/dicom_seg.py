"""DICOM Segmentation (SEG) export of a label version, and sending it to a PACS (no grpc).

`frames_from_volume` is the array logic: it maps the (X, Y, Z) RAS+ label volume onto the
source CT images' pixel grids, one frame per source instance, and refuses (FailedPrecondition
"GRID_DIFFERS_FROM_SOURCE") unless every source pixel centre falls exactly on a voxel centre
and every voxel on exactly one source pixel: the volume must be the source images' own grid
(no tilt correction, no filled or resampled slices, no in-plane resampling).
`export_dicom_seg` builds the SEG with highdicom (one segment per organ, per-organ provenance
as algorithm type / identification and a tracking id); `send_c_store` sends it with pynetdicom.

DICOM geometry used: (0020,0037) ImageOrientationPatient (row direction = direction of
increasing column index, then column direction; LPS), (0020,0032) ImagePositionPatient (centre
of the first pixel, LPS mm), (0028,0030) PixelSpacing (row spacing, column spacing; mm).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from atlasflow.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from atlasflow.common.organs import ORGANS
from atlasflow.labels.repository import Provenance

DOMAIN = "atlasflow.labels"
GRID_TOL_VOXELS = 1e-3
SOFTWARE = "atlasflow"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:atlasflow:labels:dicom-seg")


def derived_uid(seed: str, role: str) -> str:
    """A DICOM UID "2.25.<decimal UUID>" derived from (seed, role) (UUID version 5, PS3.5
    B.2): the same seed gives the same UIDs, so a SEG exported again is the same SOP Instance."""
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, f"{seed}/{role}").int)


# AbdomenAtlas organ id -> SNOMED CT property type (segmented property category: Organ, or
# Anatomical Structure for the vessels).
_SCT = {
    1: ("15825003", "Aorta"),
    2: ("28231008", "Gallbladder"),
    3: ("18639004", "Left kidney"),
    4: ("9846003", "Right kidney"),
    5: ("10200004", "Liver"),
    6: ("15776009", "Pancreas"),
    7: ("64131007", "Inferior vena cava"),
    8: ("78961009", "Spleen"),
    9: ("69695003", "Stomach"),
}


def _grid_differs(message: str, **metadata: str) -> FailedPrecondition:
    return FailedPrecondition("GRID_DIFFERS_FROM_SOURCE", message, domain=DOMAIN, metadata=metadata)


def _unit_axis(step: np.ndarray) -> tuple[int, int] | None:
    """(axis, ±1) when `step` is a unit step along one voxel axis, else None."""
    rounded = np.round(step)
    if np.max(np.abs(step - rounded)) > GRID_TOL_VOXELS or np.abs(rounded).sum() != 1:
        return None
    axis = int(np.argmax(np.abs(rounded)))
    return axis, int(rounded[axis])


def frames_from_volume(
    labels: np.ndarray, affine: np.ndarray, source_datasets: Sequence[pydicom.Dataset]
) -> np.ndarray:
    """The label volume resampled (exactly, no interpolation) onto the source images.

    labels: (X, Y, Z) integer array; affine: (4, 4) voxel-to-world RAS+ mm. Returns
    (N, Rows, Columns) with frame n = the labels on source_datasets[n]'s pixels.
    Raises FailedPrecondition("GRID_DIFFERS_FROM_SOURCE") (metadata "problem": OFF_GRID,
    NOT_A_SLICE, OUT_OF_VOLUME, SLICES, IN_PLANE) unless the volume's grid is the images' grid.
    """
    labels = np.asarray(labels)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    shape = labels.shape
    frames = []
    seen: dict[int, int] = {}
    slice_axis: int | None = None
    for n, ds in enumerate(source_datasets):
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        rows, cols = int(ds.Rows), int(ds.Columns)

        def to_ijk(r: float, c: float) -> np.ndarray:
            lps = ipp + c * col_spacing * iop[:3] + r * row_spacing * iop[3:]  # noqa: B023 (used within this iteration)
            return inv[:3, :3] @ (LPS_TO_RAS @ lps) + inv[:3, 3]

        origin = to_ijk(0, 0)
        along_col = _unit_axis(to_ijk(0, 1) - origin)
        along_row = _unit_axis(to_ijk(1, 0) - origin)
        if along_col is None or along_row is None or np.max(np.abs(origin - np.round(origin))) > GRID_TOL_VOXELS:
            raise _grid_differs(
                "source pixels do not fall on the volume's voxel centres (tilt corrected or resampled volume)",
                problem="OFF_GRID",
                frame=str(n),
            )
        (ac, sc), (ar, sr) = along_col, along_row
        if ac == ar:
            raise _grid_differs("source frame is not a slice of the volume", problem="NOT_A_SLICE", frame=str(n))
        ak = 3 - ac - ar
        if slice_axis is None:
            slice_axis = ak
        elif ak != slice_axis:
            raise _grid_differs("source frames are not parallel slices", problem="NOT_A_SLICE")
        o = np.round(origin).astype(int)
        last = o.copy()
        last[ac] += sc * (cols - 1)
        last[ar] += sr * (rows - 1)
        if min(o.min(), last.min()) < 0 or any(max(o[a], last[a]) >= shape[a] for a in range(3)):
            raise _grid_differs("source frame lies (partly) outside the volume", problem="OUT_OF_VOLUME", frame=str(n))
        if rows != shape[ar] or cols != shape[ac]:
            raise _grid_differs("volume was resampled in plane", problem="IN_PLANE")
        k = int(o[ak])
        if k in seen:
            raise _grid_differs("two source frames map to one slice", problem="SLICES")
        seen[k] = n
        index: list[int | slice] = [0, 0, 0]
        index[ak] = k
        index[ar] = slice(None) if sr > 0 else slice(None, None, -1)
        index[ac] = slice(None) if sc > 0 else slice(None, None, -1)
        plane = labels[tuple(index)]  # 2-D, axes in ascending order of (ar, ac)
        frames.append(plane if ar < ac else plane.T)
    if slice_axis is None or len(seen) != shape[slice_axis]:
        raise _grid_differs(
            "volume slices are not the source frames one to one (filled, interpolated or missing slices)",
            problem="SLICES",
            volume_slices=str(shape[slice_axis] if slice_axis is not None else 0),
            source_frames=str(len(seen)),
        )
    return np.stack(frames)


def _segment(
    number: int, organ: int, provenance: Provenance, version_id: str, tracking_uid: str
) -> hd.seg.SegmentDescription:
    code, meaning = _SCT[organ]
    category = codes.SCT.AnatomicalStructure if organ in (1, 7) else codes.SCT.Organ
    tracking = f"atlasflow {ORGANS[organ]} {provenance.source}"
    if version_id:
        tracking += f" {version_id}"
    if provenance.source == "ai":
        algorithm = hd.AlgorithmIdentificationSequence(
            name="atlasflow ensemble",
            version=provenance.model_version or "unknown",
            family=codes.cid7162.ArtificialIntelligence,
        )
        return hd.seg.SegmentDescription(
            number,
            ORGANS[organ],
            category,
            hd.sr.CodedConcept(code, "SCT", meaning),
            hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=tracking[:64],
            tracking_uid=tracking_uid,
        )
    return hd.seg.SegmentDescription(
        number,
        ORGANS[organ],
        category,
        hd.sr.CodedConcept(code, "SCT", meaning),
        hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        tracking_id=tracking[:64],
        tracking_uid=tracking_uid,
    )


def export_dicom_seg(
    source_datasets: Sequence[pydicom.Dataset],
    labels: np.ndarray,
    affine: np.ndarray,
    organs: Sequence[int] = (),
    provenance: Mapping[int, Provenance] | Provenance | None = None,
    *,
    organ_versions: Mapping[int, str] | None = None,
    series_number: int = 9001,
    content_label: str = "ATLASFLOW",
    uid_seed: str = "",
) -> pydicom.Dataset:
    """A binary DICOM SEG of `labels` referencing `source_datasets`.

    source_datasets: the source CT instances (one frame each; pixel data not needed, UIDs
    required). labels: (X, Y, Z) AbdomenAtlas ids 0..9 on the source grid; affine: (4, 4)
    voxel-to-world RAS+ mm. organs: organ ids to include (empty: those present). provenance:
    per organ id (or one for all): AI organs become AUTOMATIC segments with the model version
    as algorithm identification, radiologist / original ones MANUAL; organ_versions names the
    deciding version (in TrackingID). Segment numbers are 1..N in ascending organ order.
    uid_seed: when given (e.g. the label version id), the SEG's SeriesInstanceUID,
    SOPInstanceUID, segment TrackingUIDs and Dimension Organization UID are derived from it
    (`derived_uid`), so exporting the same labels again yields the same bytes; empty: fresh
    random UIDs.

    Raises FailedPrecondition("GRID_DIFFERS_FROM_SOURCE") (see `frames_from_volume`),
    InvalidArgument("INVALID_ARGUMENT") for a source without UIDs or an empty selection.
    """
    if not source_datasets:
        raise InvalidArgument("INVALID_ARGUMENT", "source images are required", domain=DOMAIN)
    for ds in source_datasets:
        for attribute in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(ds.get(attribute, "") or ""):
                raise InvalidArgument(
                    "INVALID_ARGUMENT",
                    f"source image lacks {attribute}",
                    domain=DOMAIN,
                    metadata={"attribute": attribute},
                )
    frames = frames_from_volume(labels, affine, source_datasets)
    present = [int(o) for o in np.unique(frames) if int(o) in ORGANS]
    wanted = sorted(set(int(o) for o in organs)) if organs else present
    if not wanted or any(o not in ORGANS for o in wanted):
        raise InvalidArgument("INVALID_ARGUMENT", "no organ to export (or organ not 1..9)", domain=DOMAIN)
    lut = np.zeros(256, dtype=np.uint8)
    for number, organ in enumerate(wanted, start=1):
        lut[organ] = number
    pixel_array = lut[frames.astype(np.uint8)]
    prov_of = (
        (lambda o: provenance)
        if isinstance(provenance, Provenance)
        else (lambda o: (provenance or {}).get(o, Provenance("ai")))
    )
    versions = organ_versions or {}
    uid: Callable[[str], str] = (lambda role: derived_uid(uid_seed, role)) if uid_seed else (lambda role: str(hd.UID()))
    segments = [
        _segment(number, organ, prov_of(organ), versions.get(organ, ""), uid(f"tracking/{organ}"))
        for number, organ in enumerate(wanted, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=uid("series"),
        series_number=series_number,
        sop_instance_uid=uid("sop"),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name="atlasflow labels",
        software_versions="1",
        device_serial_number="0",
        content_label=content_label,
        content_description="AbdomenAtlas organs",
        omit_empty_frames=True,
    )
    if uid_seed:  # highdicom draws the Dimension Organization UID itself: derive it too
        dimension_uid = uid("dimension-organization")
        for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
            item.DimensionOrganizationUID = dimension_uid
    return seg


def send_c_store(
    dataset: pydicom.Dataset,
    host: str,
    port: int,
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "ATLASFLOW",
    timeout_s: float = 30.0,
) -> int:
    """Send `dataset` (e.g. a SEG) by C-STORE; return the DIMSE status (0x0000 = success).

    TCP_NODELAY is set on the association socket (see DESIGN.md). Raises
    Unavailable("PACS_UNAVAILABLE") when the association is not accepted or the peer sends no
    response.
    """
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise Unavailable("PACS_UNAVAILABLE", "the PACS refused or did not answer the association", domain=DOMAIN)
    try:
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    if status is None or "Status" not in status:
        raise Unavailable("PACS_UNAVAILABLE", "the PACS sent no C-STORE response", domain=DOMAIN)
    return int(status.Status)
