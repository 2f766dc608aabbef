"""Label assembly, revisions and the mask-delta codec (array logic only, no I/O).

Precedence per organ (DESIGN.md "Label assembly"): human decisions (source "radiologist" or
"original") outrank AI; among equals the latest write wins. So a radiologist's revision
supersedes an original label it corrects, an original label supersedes an AI label, and a
later AI run never overwrites an organ a human decided.

All volumes are (X, Y, Z) arrays on the CT grid (RAS+); combined label maps hold AbdomenAtlas
ids 0..9 (uint8).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Collection, Mapping

import numpy as np

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.organs import ORGANS
from atlasflow.labels.repository import OrganProvenance, Provenance

DOMAIN = "atlasflow.labels"
HUMAN_SOURCES = frozenset({"radiologist", "original"})
MAX_DELTA_BYTES = 64 * 1024 * 1024


def rank(source: str) -> int:
    """Precedence of a label source: 1 for human ("radiologist", "original"), 0 for "ai"."""
    return 1 if source in HUMAN_SOURCES else 0


def assemble(
    head_map: np.ndarray | None,
    head_provenance: Mapping[int, OrganProvenance] | None,
    new_map: np.ndarray,
    new_provenance: Provenance,
    labelled_organs: Collection[int] = (),
) -> tuple[np.ndarray, dict[int, OrganProvenance]]:
    """Combine a submitted label map with the case's current head, organ by organ.

    head_map: (X, Y, Z) uint8 of the head version (None for a case's first version);
    head_provenance: its per-organ provenance. new_map: the submitted (X, Y, Z) map (same
    grid); new_provenance: who submitted it; labelled_organs: organs the submission decides
    (empty = all nine; the rest are taken from the head).

    An organ keeps the head's label when the submission does not label it or when the head's
    source outranks the submission's (`rank`); else the submission's label is taken. Kept
    organs are painted last (they win contested voxels). Returns (assembled uint8 map,
    {organ: OrganProvenance}) where version_id "" marks organs decided by the new version.
    """
    new = np.asarray(new_map).astype(np.uint8, copy=True)
    labelled = set(int(o) for o in labelled_organs) or set(ORGANS)
    if head_map is None or head_provenance is None:
        out = np.where(np.isin(new, sorted(labelled)), new, 0).astype(np.uint8)
        return out, {o: OrganProvenance(new_provenance, "") for o in ORGANS}
    head = np.asarray(head_map)
    kept = [
        o
        for o in ORGANS
        if o not in labelled or rank(head_provenance[o].provenance.source) > rank(new_provenance.source)
    ]
    out = new
    if kept:
        out[np.isin(out, kept)] = 0
        from_head = np.isin(head, kept)
        out[from_head] = head[from_head]
    provenance = {o: (head_provenance[o] if o in kept else OrganProvenance(new_provenance, "")) for o in ORGANS}
    return out, provenance


def apply_revision(parent_map: np.ndarray, masks: Mapping[int, np.ndarray]) -> np.ndarray:
    """The parent's combined map with the revised organs replaced by their new masks.

    parent_map: (X, Y, Z) ids 0..9; masks: {organ id: (X, Y, Z) bool}. Each revised organ's
    old voxels are cleared, then its new mask is painted (taking voxels from any other organ:
    the reviewer's decision wins). Two revised masks sharing a voxel raise
    InvalidArgument("REVISION_OVERLAP"). Returns a new uint8 array.
    """
    out = np.asarray(parent_map).astype(np.uint8, copy=True)
    organs = sorted(masks)
    if organs:
        claimed = np.zeros(out.shape, dtype=np.uint8)
        for o in organs:
            claimed += np.asarray(masks[o], dtype=bool)
        if claimed.max(initial=0) > 1:
            raise InvalidArgument(
                "REVISION_OVERLAP",
                "two revised organs claim the same voxel",
                domain=DOMAIN,
                metadata={"voxels": str(int((claimed > 1).sum()))},
            )
        out[np.isin(out, organs)] = 0
        for o in organs:
            out[np.asarray(masks[o], dtype=bool)] = o
    return out


# ----------------------------------------------------------------------------- delta codec


def _bad_delta(message: str, organ: int) -> InvalidArgument:
    return InvalidArgument(
        "INVALID_MASK_DELTA", message, domain=DOMAIN, metadata={"organ": ORGANS.get(organ, str(organ))}
    )


def encode_mask_delta(parent_mask: np.ndarray, new_mask: np.ndarray) -> bytes:
    """gzip(packbits(parent XOR new)) of two (X, Y, Z) bool masks, Fortran order (x fastest),
    least significant bit first: the `OrganRevision.xor_delta` format of labels.proto."""
    diff = np.asarray(parent_mask, dtype=bool) ^ np.asarray(new_mask, dtype=bool)
    packed = np.packbits(diff.ravel(order="F"), bitorder="little")
    return gzip.compress(packed.tobytes(), compresslevel=6, mtime=0)


def decode_mask_delta(parent_mask: np.ndarray, delta: bytes, organ: int = 0) -> np.ndarray:
    """Inverse of `encode_mask_delta`: the new (X, Y, Z) bool mask.

    Raises InvalidArgument("INVALID_MASK_DELTA") when `delta` is not gzip, does not unpack to
    exactly ceil(X*Y*Z / 8) bytes, or sets padding bits (the decompressed size is bounded, so a
    gzip bomb costs nothing).
    """
    parent = np.asarray(parent_mask, dtype=bool)
    n = int(parent.size)
    want = (n + 7) // 8
    if want > MAX_DELTA_BYTES:
        raise _bad_delta("volume too large for a delta", organ)
    try:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        raw = d.decompress(bytes(delta), want + 1)
        if not d.eof and len(raw) <= want:
            raise _bad_delta("xor_delta is truncated", organ)
        if d.unused_data or d.unconsumed_tail:
            raise _bad_delta("xor_delta holds trailing data", organ)
    except zlib.error:
        raise _bad_delta("xor_delta is not gzip data", organ) from None
    if len(raw) != want:
        raise _bad_delta("xor_delta does not match the volume's voxel count", organ)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if bits[n:].any():
        raise _bad_delta("xor_delta sets padding bits", organ)
    diff = bits[:n].astype(bool).reshape(parent.shape, order="F")
    return parent ^ diff
