"""Checks that a combined label map fits its CT (array logic only, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.organs import ORGANS

DOMAIN = "atlasflow.labels"
AFFINE_ATOL_MM = 1e-4


def _invalid(message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument("INVALID_LABEL_MAP", message, domain=DOMAIN, metadata=metadata)


def validate_label_map(
    labels: np.ndarray, label_affine: np.ndarray, ct_shape: Sequence[int], ct_affine: np.ndarray
) -> tuple[int, ...]:
    """Validate a combined AbdomenAtlas label map against the CT it labels.

    labels: (X, Y, Z) integer array, values in 0..9 (0 background, 1..9 the organ ids of
    `atlasflow.common.organs.ORGANS`). label_affine / ct_affine: (4, 4) voxel-to-world, RAS+ mm.
    ct_shape: the CT's (X, Y, Z) shape.

    Returns the organ ids present (non-empty), ascending. Raises
    InvalidArgument("INVALID_LABEL_MAP") when the shape differs, any affine element differs by
    more than 1e-4 mm, the dtype is not integer (or float holding integers), or a value lies
    outside 0..9; `metadata["problem"]` says which (SHAPE, AFFINE, DTYPE, VALUES).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or tuple(labels.shape) != tuple(int(s) for s in ct_shape):
        raise _invalid(
            "label map shape differs from the CT's",
            problem="SHAPE",
            label_shape=str(tuple(labels.shape)),
            ct_shape=str(tuple(ct_shape)),
        )
    la = np.asarray(label_affine, dtype=np.float64)
    ca = np.asarray(ct_affine, dtype=np.float64)
    if (
        la.shape != (4, 4)
        or ca.shape != (4, 4)
        or not np.all(np.isfinite(la))
        or not np.allclose(la, ca, rtol=0.0, atol=AFFINE_ATOL_MM)
    ):
        raise _invalid("label map affine differs from the CT's (tolerance 1e-4 mm)", problem="AFFINE")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise _invalid("label map holds non-integer values", problem="DTYPE")
    elif labels.dtype.kind not in "iub":
        raise _invalid("label map must hold integer label ids", problem="DTYPE", dtype=str(labels.dtype))
    if labels.size:
        lo, hi = labels.min(), labels.max()
        if lo < 0 or hi > max(ORGANS):
            raise _invalid("label values must lie in 0..9", problem="VALUES", min=str(lo), max=str(hi))
    counts = np.bincount(labels.astype(np.int64, copy=False).ravel(), minlength=max(ORGANS) + 1)
    return tuple(int(i) for i in ORGANS if counts[i] > 0)


def validate_organ_mask(
    mask: np.ndarray, mask_affine: np.ndarray, ct_shape: Sequence[int], ct_affine: np.ndarray, organ: int
) -> np.ndarray:
    """Validate one organ's corrected mask against the CT; return it as (X, Y, Z) bool.

    mask: (X, Y, Z) integer (or integral float) array, voxels 0 (not the organ) and 1 or
    `organ` (the organ). Same geometry rules as `validate_label_map`. Raises
    InvalidArgument("INVALID_REVISION_MASK") with metadata organ and problem (SHAPE, AFFINE,
    DTYPE, VALUES).
    """
    name = ORGANS.get(organ, str(organ))
    try:
        validate_label_map(mask, mask_affine, ct_shape, ct_affine)
    except InvalidArgument as exc:
        raise InvalidArgument(
            "INVALID_REVISION_MASK",
            f"revised mask of {name}: {exc.message}",
            domain=DOMAIN,
            metadata={**exc.metadata, "organ": name},
        ) from None
    values = np.unique(np.asarray(mask))
    if not set(values.tolist()) <= {0, 1, organ}:
        raise InvalidArgument(
            "INVALID_REVISION_MASK",
            f"revised mask of {name} must hold 0 and 1 (or the organ id)",
            domain=DOMAIN,
            metadata={"organ": name, "problem": "VALUES"},
        )
    return np.asarray(mask) != 0
