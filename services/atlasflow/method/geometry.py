"""Measured geometry of organ masks: volume, centroid, slice axis, FOV cut, components.

Conventions: label maps / masks are ``(X, Y, Z)`` voxel arrays; ``affine`` is the 4x4 voxel ->
RAS+ mm matrix (nibabel convention: +x toward the patient's Right, +y Anterior, +z Superior, so
left-sided organs have the smaller x; verified on the bundled labels: spleen and left kidney at
x < 0, liver at x > 0). Volumes in ml, positions in mm. The "slice axis" is the voxel axis
closest to S (superior). Components are 26-connected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from atlasflow.common.organs import ORGANS
from atlasflow.method.masks import CUBE, Box


@dataclass
class OrganGeometry:
    """Measured geometry of one organ mask.

    ``box``: voxel bounding box; ``mask``: bool crop on ``box``; ``centroid_mm``: RAS mm;
    ``slice_axis``: the voxel axis closest to S; ``fov_cut``: touches the first or last slice;
    ``components``: 26-connected components (of ``mask`` plus ``extra``); ``extra``: optional
    bool crop on ``box`` of components dropped from the label (raw ensemble vote)."""

    organ: int
    box: Box
    mask: npt.NDArray[np.bool_]
    voxel_ml: float
    volume_ml: float
    centroid_mm: npt.NDArray[np.float64]
    slice_axis: int
    fov_cut: bool
    components: int
    extra_ml: float = 0.0
    extra: npt.NDArray[np.bool_] | None = None


def slice_axis_of(affine: npt.ArrayLike) -> int:
    """The voxel axis whose direction is closest to S (RAS z)."""
    return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def _geometry(
    k: int,
    box: Box,
    mask: npt.NDArray[np.bool_],
    affine: npt.NDArray[np.float64],
    shape: tuple[int, ...],
    extra: npt.NDArray[np.bool_] | None = None,
) -> OrganGeometry | None:
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    centre_vox = np.array([idx[a].mean() + box[a].start for a in range(3)])
    centroid = affine[:3, :3] @ centre_vox + affine[:3, 3]
    ax = slice_axis_of(affine)
    lo = box[ax].start + int(idx[ax].min())
    hi = box[ax].start + int(idx[ax].max())
    fov_cut = lo == 0 or hi == shape[ax] - 1
    full = mask | extra if extra is not None else mask
    n = int(ndimage.label(full, structure=CUBE)[1])
    extra_ml = float(extra.sum()) * voxel_ml if extra is not None else 0.0
    return OrganGeometry(
        k, box, mask, voxel_ml, float(idx[0].size) * voxel_ml, centroid, ax, fov_cut, n, extra_ml, extra
    )


def measure_labels(labels: npt.ArrayLike, affine: npt.ArrayLike) -> dict[int, OrganGeometry]:
    """Geometry of every organ in an AbdomenAtlas label map ``(X, Y, Z)`` (ids 1..9)."""
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=np.float64)
    out: dict[int, OrganGeometry] = {}
    objs = ndimage.find_objects(labels.astype(np.int32, copy=False), max_label=len(ORGANS))
    for i, box in enumerate(objs):
        if box is None:
            continue
        k = i + 1
        g = _geometry(k, box, labels[box] == k, affine, labels.shape)
        if g is not None:
            out[k] = g
    return out


def measure_masks(
    masks: Mapping[int, tuple[Box, npt.ArrayLike]],
    affine: npt.ArrayLike,
    shape: tuple[int, ...],
    extras: Mapping[int, npt.NDArray[np.bool_]] | None = None,
) -> dict[int, OrganGeometry]:
    """Geometry from per-organ bool crops ``{organ: (box, crop)}`` (e.g. ensemble masks), with
    optional dropped components ``extras[organ]`` (bool, same box)."""
    affine = np.asarray(affine, dtype=np.float64)
    out: dict[int, OrganGeometry] = {}
    for k, (box, crop) in masks.items():
        g = _geometry(k, box, np.asarray(crop, dtype=bool), affine, shape, None if extras is None else extras.get(k))
        if g is not None:
            out[k] = g
    return out
