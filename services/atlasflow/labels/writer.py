"""Writing label versions: validation, assembly and revisions around the repository (no grpc).

`LabelWriter.create` stores a submitted combined label map (AI ensemble, original dataset
labels, a radiologist's full map) after assembling it with the case's head (see
atlasflow.labels.assembly); `LabelWriter.revise` applies a reviewer's per-organ corrections
(whole masks or XOR deltas) to a given parent version. Both are idempotent by request_id: the
request's own fingerprint (not the assembled result) identifies a repeat, so a retry after the
head moved on still returns the version made the first time.

Blob writes happen before the version row is committed, and blobs are content-addressed and
written atomically (temp file + fsync + rename): a crash leaves at worst an unreferenced blob,
never a version pointing at missing or partial bytes.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atlasflow.common.blobstore import BlobInfo, BlobStore
from atlasflow.common.errors import Aborted, InvalidArgument
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGANS
from atlasflow.labels.assembly import apply_revision, assemble, decode_mask_delta
from atlasflow.labels.repository import AuditEvent, LabelRepository, LabelVersionRecord, OrganProvenance, Provenance
from atlasflow.labels.rows import review_time
from atlasflow.labels.validate import validate_label_map, validate_organ_mask

DOMAIN = "atlasflow.labels"
ASSEMBLY_ATTEMPTS = 8
LOCK_STRIPES = 64


@dataclass(frozen=True)
class MaskRevision:
    """One organ's correction: `mask_digest` (NIfTI blob, whole mask) or `xor_delta`
    (bytes, see `atlasflow.labels.assembly.encode_mask_delta`), exactly one of them.
    review_seconds: the reviewer's time on this organ (0 = not measured)."""

    organ: int
    mask_digest: str = ""
    xor_delta: bytes | None = None
    review_seconds: float = 0.0


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _required(name: str, value: str) -> None:
    if not value:
        raise InvalidArgument("INVALID_ARGUMENT", f"{name} is required", domain=DOMAIN, metadata={"field": name})


def _affine(record: LabelVersionRecord) -> np.ndarray:
    return np.asarray(record.affine, dtype=np.float64).reshape(4, 4)


class LabelWriter:
    """Creates label versions (assembled) and revisions. repo/blobs are injected."""

    def __init__(self, repo: LabelRepository, blobs: BlobStore) -> None:
        self.repo = repo
        self.blobs = blobs
        # Writers of one case in this process take turns (striped locks), so read-assemble-
        # write rarely loses to a sibling; writers in other processes are caught by the
        # repository's parent check and retried with jittered backoff.
        self._stripes = [threading.Lock() for _ in range(LOCK_STRIPES)]

    def _case_lock(self, case_id: str) -> threading.Lock:
        return self._stripes[zlib.crc32(case_id.encode()) % LOCK_STRIPES]

    def _repeat(self, request_id: str, fingerprint: str, audit: AuditEvent | None) -> LabelVersionRecord | None:
        found = self.repo.version_for_request(request_id)
        if found is None:
            return None
        record, stored = found
        if stored != fingerprint:
            raise InvalidArgument(
                "REQUEST_ID_REUSED", "request_id was already used for a different request", domain=DOMAIN
            )
        if audit is not None:
            self.repo.record_audit(
                AuditEvent(audit.principal, audit.method, audit.case_id, (record.version_id,), outcome="OK")
            )
        return record

    def _label_map(self, record: LabelVersionRecord) -> np.ndarray:
        labels, _ = from_nifti_bytes(self.blobs.get(record.label_map_digest))
        return np.asarray(labels).astype(np.uint8)

    # ------------------------------------------------------------------ create

    def create(
        self,
        case_id: str,
        label_map_digest: str,
        ct_digest: str,
        provenance: Provenance,
        request_id: str,
        expected_parent_version_id: str = "",
        labelled_organs: Sequence[int] = (),
        *,
        audit: AuditEvent | None = None,
    ) -> LabelVersionRecord:
        """Validate the submitted map against the CT, assemble it with the head, store it.

        label_map_digest / ct_digest: NIfTI blobs in the blob store; the map must fit the CT
        (InvalidArgument("INVALID_LABEL_MAP")). labelled_organs: organs the map decides (empty:
        all). With `expected_parent_version_id` the head must be that version (else
        Aborted("PARENT_MISMATCH")); without it, a concurrent write makes this re-read the head
        and re-assemble (up to 5 attempts).
        """
        _required("case_id", case_id)
        _required("request_id", request_id)
        _required("label_map.digest", label_map_digest)
        _required("ct.digest", ct_digest)
        labelled = sorted({int(o) for o in labelled_organs})
        if any(o not in ORGANS for o in labelled):
            raise InvalidArgument(
                "INVALID_ARGUMENT",
                "labelled_organs must be organs 1..9",
                domain=DOMAIN,
                metadata={"field": "labelled_organs"},
            )
        fingerprint = _hash(
            "create", case_id, label_map_digest, ct_digest, provenance.to_dict(), expected_parent_version_id, labelled
        )
        prior = self._repeat(request_id, fingerprint, audit)
        if prior is not None:
            return prior
        label_bytes = self.blobs.get(label_map_digest)
        ct_bytes = self.blobs.get(ct_digest)
        labels, label_affine = from_nifti_bytes(label_bytes)
        ct, ct_affine = from_nifti_bytes(ct_bytes)
        validate_label_map(labels, label_affine, ct.shape, ct_affine)
        submitted = np.asarray(labels).astype(np.uint8)
        ct_info = BlobInfo(ct_digest, len(ct_bytes))
        for attempt in range(ASSEMBLY_ATTEMPTS):
            try:
                with self._case_lock(case_id):
                    return self._assemble_and_store(
                        case_id,
                        submitted,
                        label_map_digest,
                        len(label_bytes),
                        ct.shape,
                        ct_affine,
                        ct_info,
                        provenance,
                        request_id,
                        expected_parent_version_id,
                        labelled,
                        fingerprint,
                        audit,
                    )
            except Aborted as exc:
                if exc.reason != "PARENT_MISMATCH" or expected_parent_version_id or attempt == ASSEMBLY_ATTEMPTS - 1:
                    raise
            time.sleep(random.uniform(0.0, 0.02 * 2 ** min(attempt, 4)))
        raise AssertionError("unreachable")

    def _assemble_and_store(
        self,
        case_id: str,
        submitted: np.ndarray,
        label_map_digest: str,
        label_size: int,
        shape: tuple[int, ...],
        ct_affine: np.ndarray,
        ct_info: BlobInfo,
        provenance: Provenance,
        request_id: str,
        expected_parent_version_id: str,
        labelled: Sequence[int],
        fingerprint: str,
        audit: AuditEvent | None,
    ) -> LabelVersionRecord:
        head = self.repo.head(case_id)
        if expected_parent_version_id and (head is None or head.version_id != expected_parent_version_id):
            raise Aborted(
                "PARENT_MISMATCH",
                "expected_parent_version_id is not the case's current version",
                domain=DOMAIN,
                metadata={
                    "expected_parent_version_id": expected_parent_version_id,
                    "head_version_id": head.version_id if head else "",
                },
            )
        head_map = self._label_map(head) if head is not None else None
        assembled, organ_prov = assemble(
            head_map, head.organ_provenance if head else None, submitted, provenance, labelled
        )
        if np.array_equal(assembled, submitted):
            blob = BlobInfo(label_map_digest, label_size)
        else:
            blob = self.blobs.put(to_nifti_bytes(assembled, ct_affine))
        organs = validate_label_map(assembled, ct_affine, shape, ct_affine)
        return self.repo.create_version(
            case_id,
            blob,
            ct_info,
            provenance,
            request_id,
            head.version_id if head else "",
            organs=organs,
            shape=shape,
            affine=ct_affine.ravel(),
            organ_provenance=organ_prov,
            request_fingerprint=fingerprint,
            audit=audit,
            expect_empty=head is None,
        )

    # ------------------------------------------------------------------ revise

    def revise(
        self,
        case_id: str,
        expected_parent_version_id: str,
        revisions: Sequence[MaskRevision],
        request_id: str,
        reviewer: str,
        *,
        audit: AuditEvent | None = None,
        review_seconds: float = 0.0,
    ) -> LabelVersionRecord:
        """A reviewer's correction of some organs of `expected_parent_version_id`.

        Each revision gives a whole mask (NIfTI blob on the CT grid: same shape, affine within
        1e-4 mm, values 0/1 or 0/organ id) or an XOR delta against the parent's organ mask.
        The new version's revised organs get radiologist provenance (reviewer = `reviewer`,
        decided by the new version); the others keep the parent's. review_seconds (the case)
        and each revision's review_seconds (its organ) are stored with the new version.
        Raises InvalidArgument (EMPTY_REVISION, DUPLICATE_ORGAN, INVALID_REVISION_MASK,
        INVALID_MASK_DELTA, REVISION_OVERLAP, REQUEST_ID_REUSED, INVALID_REVIEW_SECONDS), NotFound("VERSION_NOT_FOUND"),
        Aborted("PARENT_MISMATCH") when the parent is not the case's head.
        """
        _required("case_id", case_id)
        _required("expected_parent_version_id", expected_parent_version_id)
        _required("request_id", request_id)
        _required("reviewer", reviewer)
        if not revisions:
            raise InvalidArgument("EMPTY_REVISION", "at least one organ revision is required", domain=DOMAIN)
        seen: set[int] = set()
        for r in revisions:
            if r.organ not in ORGANS:
                raise InvalidArgument(
                    "INVALID_ARGUMENT",
                    "revision organ must be 1..9",
                    domain=DOMAIN,
                    metadata={"field": "revisions.organ"},
                )
            if r.organ in seen:
                raise InvalidArgument(
                    "DUPLICATE_ORGAN", "an organ is revised twice", domain=DOMAIN, metadata={"organ": ORGANS[r.organ]}
                )
            seen.add(r.organ)
            if bool(r.mask_digest) == (r.xor_delta is not None):
                raise InvalidArgument(
                    "INVALID_ARGUMENT",
                    "each revision needs exactly one of mask_blob, xor_delta",
                    domain=DOMAIN,
                    metadata={"field": "revisions.mask", "organ": ORGANS[r.organ]},
                )
        # checked before any blob is read or written
        case_seconds, organ_seconds = review_time(review_seconds, {r.organ: r.review_seconds for r in revisions})
        fingerprint = _hash(
            "revise",
            case_id,
            expected_parent_version_id,
            reviewer,
            sorted((r.organ, r.mask_digest, hashlib.sha256(r.xor_delta or b"").hexdigest()) for r in revisions),
        )
        prior = self._repeat(request_id, fingerprint, audit)
        if prior is not None:
            return prior
        parent = self.repo.get_version(expected_parent_version_id)
        if parent.case_id != case_id:
            head = self.repo.head(case_id)
            raise Aborted(
                "PARENT_MISMATCH",
                "expected_parent_version_id belongs to another case",
                domain=DOMAIN,
                metadata={
                    "expected_parent_version_id": expected_parent_version_id,
                    "head_version_id": head.version_id if head else "",
                },
            )
        affine = _affine(parent)
        parent_map = self._label_map(parent)
        masks: dict[int, np.ndarray] = {}
        for r in revisions:
            if r.mask_digest:
                arr, arr_affine = from_nifti_bytes(self.blobs.get(r.mask_digest))
                masks[r.organ] = validate_organ_mask(arr, arr_affine, parent.shape, affine, r.organ)
            else:
                masks[r.organ] = decode_mask_delta(parent_map == r.organ, r.xor_delta or b"", r.organ)
        new_map = apply_revision(parent_map, masks)
        voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
        changed_ml = {o: float(np.count_nonzero((parent_map == o) != (new_map == o))) * voxel_ml for o in masks}
        provenance = Provenance("radiologist", reviewer=reviewer)
        organ_prov = dict(parent.organ_provenance)
        for o in masks:
            organ_prov[o] = OrganProvenance(provenance, "")
        blob = self.blobs.put(to_nifti_bytes(new_map, affine))
        organs = validate_label_map(new_map, affine, parent.shape, affine)
        return self.repo.create_version(
            case_id,
            blob,
            BlobInfo(parent.ct_digest, parent.ct_size),
            provenance,
            request_id,
            parent.version_id,
            organs=organs,
            shape=parent.shape,
            affine=parent.affine,
            organ_provenance=organ_prov,
            request_fingerprint=fingerprint,
            audit=audit,
            review_seconds=case_seconds,
            organ_review_seconds=organ_seconds,
            organ_changed_ml=changed_ml,
        )
