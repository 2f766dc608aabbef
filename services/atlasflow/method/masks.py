"""Mask helpers of the method: 3x3x3 morphology, bounding boxes, 26-connected components, and
the recipe's per-model masking (step 1 of `atlasflow.method.attention`).

Conventions: masks are bool ``(X, Y, Z)`` arrays (torch tensors on any device, or numpy);
per-model stacks are ``(M, X, Y, Z)`` uint8 ``p*255``. A `Box` is a tuple of three half-open
voxel slices. Morphology treats voxels outside the volume as background (scipy's
``border_value=0``); connected components are 26-connected (3x3x3 cube) and labelled by
``scipy.ndimage.label`` (C) on the mask's bounding box, on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

#: A voxel box: three half-open slices (X, Y, Z).
Box = tuple[slice, slice, slice]
#: The 3x3x3 structuring element (26-connectivity).
CUBE: npt.NDArray[np.bool_] = np.ones((3, 3, 3), dtype=bool)


# ----------------------------------------------------------------------------- morphology


def _shift_or(x: torch.Tensor, axis: int, erode: bool) -> torch.Tensor:
    """One 3-voxel pass along ``axis``: OR (dilation) or AND (erosion) of the voxel and its two
    neighbours; voxels outside the volume count as background."""
    n = x.shape[axis]
    out = x.clone()
    if n == 1:
        return out if not erode else torch.zeros_like(x)
    lo = x.narrow(axis, 0, n - 1)
    hi = x.narrow(axis, 1, n - 1)
    if erode:
        out.narrow(axis, 1, n - 1).logical_and_(lo)
        out.narrow(axis, 0, n - 1).logical_and_(hi)
        out.narrow(axis, 0, 1).zero_()
        out.narrow(axis, n - 1, 1).zero_()
    else:
        out.narrow(axis, 1, n - 1).logical_or_(lo)
        out.narrow(axis, 0, n - 1).logical_or_(hi)
    return out


def binary_erosion(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """Erode a bool ``(X, Y, Z)`` mask with a 3x3x3 cube, outside = background (scipy default).

    The cube is separable: three 1-D passes on bool tensors (no float copies)."""
    x = mask.to(torch.bool)
    for _ in range(iterations):
        for axis in range(3):
            x = _shift_or(x, axis, erode=True)
    return x


def binary_dilation(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """Dilate a bool ``(X, Y, Z)`` mask with a 3x3x3 cube (outside = background), separably."""
    x = mask.to(torch.bool)
    for _ in range(iterations):
        for axis in range(3):
            x = _shift_or(x, axis, erode=False)
    return x


def binary_opening(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` erosions then ``iterations`` dilations, 3x3x3 cube (scipy ``binary_opening``)."""
    if iterations <= 0:
        return mask.clone()
    return binary_dilation(binary_erosion(mask, iterations), iterations)


# ----------------------------------------------------------------------------- boxes


def _box_from_projections(px: torch.Tensor, pyz: torch.Tensor) -> Box | None:
    box: list[slice] = []
    for proj in (px, pyz.amax(dim=1), pyz.amax(dim=0)):
        hit = torch.nonzero(proj).flatten()
        if hit.numel() == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return box[0], box[1], box[2]


def bounding_box(mask: torch.Tensor | npt.NDArray[np.generic]) -> Box | None:
    """Tight bounding box (slices) of the non-zero voxels of an ``(X, Y, Z)`` array, or None.

    Projections by ``amax`` over contiguous views (a strided ``any`` is ~10x slower on CPU)."""
    t = torch.as_tensor(mask)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.dtype.is_floating_point or t.dtype.is_complex:
        t = (t != 0).view(torch.uint8)
    t = t.contiguous()
    if t.numel() == 0:
        return None
    return _box_from_projections(t.reshape(t.shape[0], -1).amax(dim=1), t.amax(dim=0))


def support_box(q: torch.Tensor) -> Box | None:
    """Bounding box of the voxels where any model of uint8 ``(M, X, Y, Z)`` is non-zero."""
    q = q.contiguous()
    if q.numel() == 0:
        return None
    px = q.reshape(q.shape[0], q.shape[1], -1).amax(dim=2).amax(dim=0)
    return _box_from_projections(px, q.amax(dim=(0, 1)))


def grow_box(box: Box, by: int, shape: Iterable[int]) -> Box:
    """``box`` grown by ``by`` voxels per side, clipped to ``shape``."""
    sx, sy, sz = (slice(max(0, s.start - by), min(int(n), s.stop + by)) for s, n in zip(box, shape))
    return sx, sy, sz


def union_box(boxes: Iterable[Box | None]) -> Box | None:
    """Smallest box containing every given box (None entries ignored)."""
    real = [b for b in boxes if b is not None]
    if not real:
        return None
    sx, sy, sz = (slice(min(b[a].start for b in real), max(b[a].stop for b in real)) for a in range(3))
    return sx, sy, sz


def intersect_box(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or None when they do not overlap."""
    sx, sy, sz = (slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    out = (sx, sy, sz)
    return None if any(s.start >= s.stop for s in out) else out


def relative_box(inner: Box, outer: Box) -> Box:
    """``inner`` in the coordinates of a crop on ``outer``."""
    sx, sy, sz = (slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))
    return sx, sy, sz


def offset_box(box: Box, origin: Box) -> Box:
    """A box of a crop on ``origin`` back in the full grid's coordinates (inverse of `relative_box`)."""
    sx, sy, sz = (slice(b.start + o.start, b.stop + o.start) for b, o in zip(box, origin))
    return sx, sy, sz


# ----------------------------------------------------------------------------- components


def component_labels(mask: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.int32], int]:
    """26-connected component labels (int32, 0 = background) of a bool ``(X, Y, Z)`` array."""
    lab, n = ndimage.label(mask, structure=CUBE)
    return lab, int(n)


def largest_component(mask: torch.Tensor | npt.NDArray[np.bool_]) -> tuple[torch.Tensor, int]:
    """Largest 26-connected component of a bool ``(X, Y, Z)`` mask (a bool tensor on the
    mask's device), and the component count.

    Ties go to the component met first in C (raster) order, as ``np.argmax`` over
    ``scipy.ndimage.label`` counts. Labelling runs on the mask's bounding box."""
    t = torch.as_tensor(mask).to(torch.bool)
    out = torch.zeros_like(t)
    box = bounding_box(t)
    if box is None:
        return out, 0
    crop = t[box].cpu().numpy()
    lab, n = component_labels(crop)
    if n <= 1:
        out[box] = torch.from_numpy(lab > 0).to(t.device)
        return out, n
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    out[box] = torch.from_numpy(lab == int(np.argmax(counts))).to(t.device)
    return out, n


# ----------------------------------------------------------------------------- soft predictions


def to_u8_probs(probs: torch.Tensor | npt.NDArray[np.generic]) -> torch.Tensor:
    """Soft predictions -> uint8 ``p*255``: uint8 stays as is; floats in [0, 1] are clipped and
    rounded to the nearest level (``round(p*255)``)."""
    t = torch.as_tensor(probs)
    if t.dtype == torch.uint8:
        return t
    if t.dtype == torch.bool:
        return t.to(torch.uint8) * 255
    return (t.to(torch.float32).clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)


def keep_own_component(qm: torch.Tensor) -> Box | None:
    """Recipe step 1 for one model: uint8 ``(X, Y, Z)`` ``p*255`` (modified in place) is zeroed
    outside a 1-voxel dilation (3x3x3) of the largest 26-connected component of its own
    ``p > 0.5`` (``q >= 128``, i.e. ``q/255 > 0.5``). Returns the box that holds that dilation
    (the component's box grown by one voxel, clipped), or None when the model has no mask
    (then ``qm`` is all zero)."""
    shape = tuple(int(s) for s in qm.shape)
    own, _ = largest_component(qm >= 128)
    box = bounding_box(own)
    if box is None:
        qm.zero_()
        return None
    grown = grow_box(box, 1, shape)
    keep = torch.zeros(shape, dtype=torch.bool, device=qm.device)
    keep[grown] = binary_dilation(own[grown], 1)
    qm.mul_(keep)
    return grown


def mask_to_own_components(q: torch.Tensor) -> torch.Tensor:
    """Recipe step 1 on uint8 ``(M, X, Y, Z)`` ``p*255`` (modified in place and returned):
    `keep_own_component` for each model."""
    for m in range(q.shape[0]):
        keep_own_component(q[m])
    return q


def ensemble_raw(q: torch.Tensor) -> torch.Tensor:
    """Ensemble vote of uint8 ``(M, X, Y, Z)``: mean of ``q/255`` over models ``> 0.5``, decided
    exactly in integers (``2 * sum q > 255 * M``)."""
    s = q.sum(dim=0, dtype=torch.int32)
    return s * 2 > 255 * q.shape[0]
