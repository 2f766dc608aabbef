"""Heterogeneous ensembles: members with their own label sets, grids and spacings, mapped by organ
name onto atlasflow's nine organs and compared on one common grid (the case's native grid).

A member's output (`MemberOutput`) is either a label map (ids of its own label map, e.g.
TotalSegmentator's 117 classes, `atlasflow.models.class_maps`) or per-label probabilities, on
its own voxel grid (a 4x4 affine voxel -> RAS mm and a shape: any spacing, orientation or
field of view). `common_grid` brings every member onto the case grid:

- label maps: **nearest neighbour** (a case voxel takes the label of the member voxel whose
  centre is nearest: index ``floor(x + 0.5)`` of the continuous member index ``x``), then one
  uint8 plane per organ (255 inside, 0 outside): labels are never interpolated;
- probabilities: **linear** (`atlasflow.segmentation.grid.resample`, trilinear, exact for pure
  reorientations), rounded to uint8 ``p*255`` as the pipeline stores them.

Case voxels outside a member's grid get 0 (background) from that member.

`native_label_maps` keeps label-map members as one label volume each on the case grid and
makes an organ's plane when asked for (`NativeLabelMaps.planes`, the same values as
`common_grid`'s): what the segmentation pipeline holds for its imported members.

Organs are matched by class name (`atlasflow.models.class_maps.organ_of`: ``gallbladder`` ->
``gall_bladder``, ``inferior_vena_cava`` -> ``postcava``, ...). A member whose label map does
not contain an organ has **no opinion** on it: ``available[organ][m]`` is False, and

- the ensemble vote of that organ (`ensemble_labels`) is the mean over the members that predict
  it (``> 0.5``), so a missing member is not a background vote;
- the attention (`case_attention` with ``available``, `atlasflow.method.attention`) leaves its
  row out of that organ's stack: no std against a member that never looked, no entropy from it;
- an organ no member predicts gets no label and no attention.

Arrays: volumes ``(X, Y, Z)`` (native voxel axes), stacks ``(M, X, Y, Z)`` uint8, organ ids 1..9.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from atlasflow.common.organs import NUM_ORGANS, ORGANS
from atlasflow.method.attention import CaseAttention, case_attention
from atlasflow.method.masks import largest_component
from atlasflow.models.class_maps import organ_channels
from atlasflow.segmentation.grid import resample

#: case voxels per slab when mapping coordinates for nearest-neighbour resampling
_SLAB = 1 << 21


@dataclass(frozen=True)
class MemberOutput:
    """One member's prediction on its own grid.

    ``labels``: the member's label map id -> class name (0 = background); ``label_map``:
    ``(X', Y', Z')`` integer ids, or ``probs``: ``(C, X', Y', Z')`` float in [0, 1] with channel
    c = label id c; ``affine``: 4x4 voxel -> RAS mm of that grid."""

    name: str
    labels: Mapping[int, str]
    affine: npt.NDArray[np.float64]
    label_map: npt.NDArray[np.integer] | None = None
    probs: npt.NDArray[np.floating] | None = None

    def __post_init__(self) -> None:
        if (self.label_map is None) == (self.probs is None):
            raise ValueError("a member output is either a label map or probabilities")
        if np.asarray(self.affine).shape != (4, 4):
            raise ValueError("affine must be 4x4")

    @property
    def organs(self) -> dict[int, int]:
        """atlasflow organ id -> this member's label id (organs it predicts)."""
        return organ_channels(self.labels)


def resample_nearest(
    label_map: npt.NDArray[np.integer],
    src_affine: npt.NDArray[np.float64],
    dst_affine: npt.NDArray[np.float64],
    dst_shape: tuple[int, int, int],
) -> npt.NDArray[np.integer]:
    """Nearest-neighbour resampling of an integer ``(X', Y', Z')`` map onto (dst_affine,
    dst_shape); index ``floor(x + 0.5)`` of the continuous source index; outside = 0."""
    src: npt.NDArray[np.integer] = np.asarray(label_map)
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    out: npt.NDArray[np.integer] = np.zeros(dst_shape, dtype=src.dtype)
    ny, nz = dst_shape[1], dst_shape[2]
    jj, kk = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nz, dtype=np.float64), indexing="ij")
    step = max(1, _SLAB // max(ny * nz, 1))
    for i0 in range(0, dst_shape[0], step):
        i1 = min(dst_shape[0], i0 + step)
        ii = np.arange(i0, i1, dtype=np.float64)[:, None, None]
        idx = []
        for a in range(3):
            x = m[a, 0] * ii + m[a, 1] * jj[None] + m[a, 2] * kk[None] + m[a, 3]
            idx.append(np.floor(x + 0.5).astype(np.int64))
        inside = np.ones(idx[0].shape, dtype=bool)
        for a in range(3):
            inside &= (idx[a] >= 0) & (idx[a] < src.shape[a])
        slab = np.zeros(idx[0].shape, dtype=src.dtype)
        slab[inside] = src[idx[0][inside], idx[1][inside], idx[2][inside]]
        out[i0:i1] = slab
    return out


@dataclass
class CommonGrid:
    """Every member's organs on the case grid: ``probs`` organ id -> uint8 ``(M, X, Y, Z)``
    (rows of members without the organ are zeros and flagged), ``available`` organ id ->
    ``(M,)`` bool (False = that member has no opinion on the organ)."""

    probs: dict[int, torch.Tensor]
    available: dict[int, list[bool]]
    members: list[str]

    def availability(self) -> npt.NDArray[np.bool_]:
        """``(M, 9)`` bool: column k = organ id k + 1."""
        return np.array([[self.available[o][m] for o in range(1, NUM_ORGANS + 1)] for m in range(len(self.members))])


def common_grid(
    members: Sequence[MemberOutput], affine: npt.NDArray[np.float64], shape: tuple[int, int, int]
) -> CommonGrid:
    """Map every member onto the case grid (affine, shape) and onto atlasflow's organs
    (module docstring: nearest for label maps, linear for probabilities)."""
    aff = np.asarray(affine, dtype=np.float64)
    n = len(members)
    probs = {o: torch.zeros((n, *shape), dtype=torch.uint8) for o in ORGANS}
    available = {o: [False] * n for o in ORGANS}
    for m, member in enumerate(members):
        organs = member.organs
        if member.label_map is not None:
            native = resample_nearest(member.label_map, member.affine, aff, shape)
            for organ, label_id in organs.items():
                probs[organ][m] = torch.from_numpy(native == label_id).to(torch.uint8) * 255
                available[organ][m] = True
        else:
            assert member.probs is not None
            for organ, label_id in organs.items():
                plane = torch.from_numpy(np.ascontiguousarray(member.probs[label_id : label_id + 1], dtype=np.float32))
                p = resample(plane, np.asarray(member.affine, dtype=np.float64), aff, shape)[0]
                probs[organ][m] = (p.clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)
                available[organ][m] = True
    return CommonGrid(probs=probs, available=available, members=[mb.name for mb in members])


@dataclass
class NativeLabelMaps:
    """Label-map members on the case grid, their per-organ planes made on demand: one label
    volume per member instead of `CommonGrid`'s nine uint8 planes (what the segmentation
    pipeline holds for its imported members). ``maps``: ``(X, Y, Z)`` label ids on the case
    grid; ``organs``: per member, organ id -> its label id (the organs it predicts)."""

    maps: list[npt.NDArray[np.integer]]
    organs: list[dict[int, int]]
    members: list[str]
    shape: tuple[int, int, int]

    @property
    def available(self) -> dict[int, list[bool]]:
        """Organ id -> ``(M,)`` flags (False = no opinion), as `CommonGrid.available`."""
        return {o: [o in org for org in self.organs] for o in ORGANS}

    def planes(self, organ: int, *, only_available: bool = False) -> torch.Tensor:
        """uint8 ``(M, X, Y, Z)`` (255 inside, 0 outside) of ``organ``: a zero row for a member
        without an opinion, or (``only_available``) only the rows of the members with one."""
        rows = []
        for label_map, org in zip(self.maps, self.organs):
            if organ in org:
                rows.append(torch.from_numpy(label_map == org[organ]).to(torch.uint8) * 255)
            elif not only_available:
                rows.append(torch.zeros(self.shape, dtype=torch.uint8))
        return torch.stack(rows) if rows else torch.zeros((0, *self.shape), dtype=torch.uint8)

    def crop(self, box: tuple[slice, slice, slice]) -> NativeLabelMaps:
        """The same members on the crop ``box`` of the case grid."""
        maps = [np.ascontiguousarray(m[box]) for m in self.maps]
        shape = (int(maps[0].shape[0]), int(maps[0].shape[1]), int(maps[0].shape[2])) if maps else self.shape
        return NativeLabelMaps(maps, self.organs, self.members, shape)


def native_label_maps(
    members: Sequence[MemberOutput], affine: npt.NDArray[np.float64], shape: tuple[int, int, int]
) -> NativeLabelMaps:
    """Label-map members on the case grid (affine, shape): nearest neighbour as `common_grid`
    (a member already on the case grid is taken as is), organs matched by name."""
    aff = np.asarray(affine, dtype=np.float64)
    maps = []
    for member in members:
        if member.label_map is None:
            raise ValueError(f"member {member.name} has no label map")
        lm = np.asarray(member.label_map)
        same = tuple(lm.shape) == tuple(shape) and np.array_equal(np.asarray(member.affine, dtype=np.float64), aff)
        maps.append(lm if same else resample_nearest(lm, member.affine, aff, shape))
    return NativeLabelMaps(maps, [m.organs for m in members], [m.name for m in members], shape)


def ensemble_labels(grid: CommonGrid) -> npt.NDArray[np.uint8]:
    """The ensemble's label map (organ ids 1..9) on the case grid: per organ, the mean over the
    members that predict it ``> 0.5``, largest 26-connected component; overlaps go to the organ
    with the larger mean (ties: lower id), as in the pipeline. Organs no member predicts stay 0."""
    shape = next(iter(grid.probs.values())).shape[1:]
    labels = torch.zeros(shape, dtype=torch.uint8)
    best = torch.zeros(shape, dtype=torch.float32)
    for organ in sorted(grid.probs):
        rows = [m for m, f in enumerate(grid.available[organ]) if f]
        if not rows:
            continue
        total = grid.probs[organ][rows].sum(dim=0, dtype=torch.int32)
        mask, _ = largest_component(total * 2 > 255 * len(rows))
        mean = total.to(torch.float32) / len(rows)
        take = mask & ((labels == 0) | (mean > best))
        labels[take] = organ
        best[take] = mean[take]
    return labels.numpy()


def model_member(
    ct_path: str | Path, name: str, state_dir: str | Path, *, device: str = "cpu", triton_url: str | None = None
) -> MemberOutput:
    """A registered model (`atlasflow.models.registry`: nnU-Net v2, MONAI bundle) run on a NIfTI CT
    by the `atlasflow segment` path, as an ensemble member: its label ids on the CT's grid, its
    manifest's label map. ``triton_url``: its network on that Triton (`atlasflow.models.segment.
    served_model`; the stack's ``triton_server --model NAME``); None: in this process."""
    import contextlib

    import nibabel as nib

    from atlasflow.models.segment import load_model, served_model

    img: Any = nib.load(str(ct_path))  # a NIfTI image (nibabel types it as FileBasedImage)
    with contextlib.ExitStack() as stack:
        model = (
            stack.enter_context(served_model(state_dir, name, triton_url=triton_url))
            if triton_url
            else load_model(state_dir, name, device=device)
        )
        return _run_member(model, img, name)


def _run_member(model: Any, img: Any, name: str) -> MemberOutput:
    volume = np.asanyarray(img.dataobj)
    spacing = [float(z) for z in img.header.get_zooms()[:3]]
    if getattr(model, "needs_affine", False):
        label_map = model(volume, spacing, affine=img.affine)
    else:
        label_map = model(volume, spacing)
    return MemberOutput(
        name, dict(model.manifest.labels), np.asarray(img.affine, dtype=np.float64), label_map=label_map
    )


def heterogeneous_attention(grid: CommonGrid, labelled_organs: Iterable[int] = ()) -> CaseAttention:
    """The reference attention (`case_attention`) with each organ's stack limited to the
    members that predict it (``available``)."""
    return case_attention(grid.probs, labelled_organs, available=grid.available)
