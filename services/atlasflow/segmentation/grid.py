"""Grids and resampling for the segmentation pipeline: the RAS-aligned model grid of a member
and trilinear resampling between grids.

Array conventions: volumes are ``(C, X, Y, Z)`` voxel arrays; a grid is a 4x4 affine mapping
voxel indices to RAS+ world coordinates in mm (nibabel convention) and a shape. Pure
reorientation at equal spacing is done exactly by flips/transposes; axis-aligned grids (any
orientation, any spacing) by three separable 1-D linear passes; oblique grids by
``grid_sample`` in slabs of `SLAB_VOXELS` grid points.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

#: grid points per resampling slab (bounds the float32 grid memory)
SLAB_VOXELS = 1 << 22


def model_grid(
    affine: npt.NDArray[np.float64], shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[npt.NDArray[np.float64], tuple[int, int, int]]:
    """RAS-aligned grid (affine, shape) covering the input's voxel-centre bounding box.

    ``affine``: input voxel -> RAS mm; ``spacing``: mm along R, A, S.
    """
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    world = (affine @ corners.T)[:3]
    lo, hi = world.min(axis=1), world.max(axis=1)
    sp = np.asarray(spacing, dtype=np.float64)
    nx, ny, nz = (int(np.ceil((h - lo_) / s - 1e-4)) + 1 for lo_, h, s in zip(lo, hi, sp))
    grid = np.eye(4)
    grid[:3, :3] = np.diag(sp)
    grid[:3, 3] = lo
    return grid, (nx, ny, nz)


def _signed_permutation(
    m: npt.NDArray[np.float64], src_shape: tuple[int, ...], dst_shape: tuple[int, ...]
) -> list[tuple[int, bool]] | None:
    """If dst index -> src index is a pure axis permutation/flip covering both grids exactly,
    return per dst axis (src axis, flipped); else None."""
    r, t = m[:3, :3], m[:3, 3]
    if not np.allclose(r, np.round(r), atol=1e-5) or not np.allclose(t, np.round(t), atol=1e-4):
        return None
    r = np.round(r).astype(int)
    if sorted(np.abs(r).sum(axis=0).tolist()) != [1, 1, 1] or sorted(np.abs(r).sum(axis=1).tolist()) != [1, 1, 1]:
        return None
    plan = []
    for j in range(3):
        a = int(np.nonzero(r[:, j])[0][0])
        sign = r[a, j]
        if src_shape[a] != dst_shape[j]:
            return None
        offset = int(round(t[a]))
        if sign == 1 and offset == 0:
            plan.append((a, False))
        elif sign == -1 and offset == src_shape[a] - 1:
            plan.append((a, True))
        else:
            return None
    return plan


def _axis_aligned(m: npt.NDArray[np.float64]) -> list[int] | None:
    """If dst voxel -> src voxel is a scaled axis permutation (no rotation/shear), return the
    src axis of each dst axis; else None."""
    r = m[:3, :3]
    scale = np.abs(r).max()
    nz = np.abs(r) > 1e-6 * scale
    if not (np.all(nz.sum(axis=0) == 1) and np.all(nz.sum(axis=1) == 1)):
        return None
    return [int(np.nonzero(nz[:, j])[0][0]) for j in range(3)]


def _lerp_axis(x: torch.Tensor, axis: int, coords: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``axis`` at float64 ``coords`` (voxel units), zeros
    outside (grid_sample ``padding_mode='zeros'``, ``align_corners=True`` semantics)."""
    n = x.shape[axis]
    zshape = list(x.shape)
    zshape[axis] = 1
    z = torch.zeros(zshape, dtype=x.dtype, device=x.device)
    xp = torch.cat([z, x, z, z], dim=axis)  # index i of x is i + 1 here
    c = coords.clamp(-1.0, float(n))
    i0 = torch.floor(c)
    w = (c - i0).to(x.dtype)
    idx0 = (i0 + 1).to(torch.int64)
    a = xp.index_select(axis, idx0)
    b = xp.index_select(axis, idx0 + 1)
    wshape = [1] * x.ndim
    wshape[axis] = -1
    return torch.lerp(a, b, w.reshape(wshape))


def resample(
    src: torch.Tensor,
    src_affine: npt.NDArray[np.float64],
    dst_affine: npt.NDArray[np.float64],
    dst_shape: tuple[int, int, int],
) -> torch.Tensor:
    """Trilinear resampling of ``src`` ``(C, X, Y, Z)`` float32 onto the grid (dst_affine,
    dst_shape); both affines map voxel -> RAS mm. Outside the source = 0.

    Returns ``(C, *dst_shape)`` float32 on ``src.device``.
    """
    m = np.linalg.inv(src_affine) @ dst_affine  # dst voxel -> src voxel
    plan = _signed_permutation(m, tuple(src.shape[1:]), dst_shape)
    if plan is not None:
        out = src.permute(0, *(a + 1 for a, _ in plan))
        flips = [j + 1 for j, (_, flipped) in enumerate(plan) if flipped]
        return (out.flip(flips) if flips else out).contiguous()
    axes = _axis_aligned(m)
    if axes is not None:  # separable: three 1-D passes, exact at integer coordinates
        out = src.to(torch.float32).permute(0, *(a + 1 for a in axes))
        order = sorted(range(3), key=lambda j: dst_shape[j] / max(out.shape[j + 1], 1))
        for j in order:
            a = axes[j]
            coords = torch.arange(dst_shape[j], dtype=torch.float64, device=src.device) * float(m[a, j]) + float(
                m[a, 3]
            )
            out = _lerp_axis(out, j + 1, coords)
        return out.contiguous()
    c = src.shape[0]
    src5 = src[None].to(torch.float32)
    n = torch.tensor([max(s - 1, 1) for s in src.shape[1:]], dtype=torch.float64, device=src.device)
    mt = torch.as_tensor(m[:3], dtype=torch.float64, device=src.device)
    ny, nz = dst_shape[1], dst_shape[2]
    jj, kk = torch.meshgrid(
        torch.arange(ny, dtype=torch.float64, device=src.device),
        torch.arange(nz, dtype=torch.float64, device=src.device),
        indexing="ij",
    )
    out = torch.empty((c, *dst_shape), dtype=torch.float32, device=src.device)
    step = max(1, SLAB_VOXELS // max(ny * nz, 1))
    for i0 in range(0, dst_shape[0], step):
        i1 = min(dst_shape[0], i0 + step)
        ii = torch.arange(i0, i1, dtype=torch.float64, device=src.device)[:, None, None].expand(-1, ny, nz)
        pts = torch.stack([ii, jj.expand(i1 - i0, -1, -1), kk.expand(i1 - i0, -1, -1), torch.ones_like(ii)], dim=-1)
        idx = pts @ mt.T  # (sx, Y, Z, 3) src voxel indices (x, y, z)
        norm = (2.0 * idx / n - 1.0).flip(-1).to(torch.float32)  # grid_sample wants (z, y, x) = (W, H, D)
        out[:, i0:i1] = F.grid_sample(src5, norm[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return out
