#!/usr/bin/env python
"""DEMO-ONLY: train the ``abdomen-trio-v1`` members on ONE bundled CT and save their weights.

    .venv/bin/python scripts/train_demo_weights.py --out services/atlasflow/segmentation/weights [--init DIR]

(the committed files were fine-tuned with ``--init`` from the v1 files of commit 1ec7f1b; see
``services/atlasflow/segmentation/weights/README.md`` for the exact commands).

The weights this writes are a demonstration that the pipeline runs with trained members; they
are fitted to a single CT (TotalSegmentator's ``example_ct.nii.gz``, 122 x 101 x 112, 3 mm,
RAS) whose reference labels are themselves TotalSegmentator *predictions*
(``example_seg_fast_force_split.nii.gz``) mapped to the nine AbdomenAtlas-8K organs by
`atlasflow.labels.totalseg.totalseg_to_atlas`. They are not a clinical model; the label-driven
augmentations below let them transfer to other series of the same kind (contrast phase, field
of view, thin slabs) to a limited degree (see ``services/atlasflow/segmentation/weights/README.md`` for
the measured figures, including the held-out bundled DICOM series, which is never used here).

Training data: the CT in HU and the TotalSegmentator ids are put on the member's model grid
(`grid.model_grid`, RAS-aligned, ``target_spacing_mm``): HU by the pipeline's
`grid.resample` (outside = air), ids by nearest neighbour (exact copies here: the example
CT is already RAS at 3 mm). Each patch is then augmented in HU and windowed exactly as the
pipeline windows (HU window ``hu_window`` scaled to [0, 1], clamped); see `AugmentingSampler`.

Per member (architecture, kwargs, activation and seed from the ensemble JSON):
- random ``patch_size`` patches, organ-balanced (``FOREGROUND_P`` of the patches are centred
  near a voxel of an organ picked uniformly, the rest anywhere), augmented (`Augment`):
  anisotropic zoom and a small rotation about z; a simulated contrast phase from per-class HU
  offsets drawn per patch (`CONTRAST_HU`: liver, spleen, kidneys, pancreas, arteries, veins,
  generic soft tissue) before windowing; HU noise; global scale/shift/gamma after windowing;
  thin z-slabs placed and zero-padded exactly as MONAI's sliding window pads a series thinner
  than the window. NO flips: a left-right flip would swap kidney_left/kidney_right and put
  the liver on the spleen's side;
- loss: Dice + BCE on the 9 organ channels (sigmoid members) or Dice (organs) + CE over the 10
  channels (softmax member, channel 0 = background);
- from the member's seeded initialisation (`RECIPES`) or, with ``--init DIR``, fine-tuned from
  ``DIR/<member>.pt`` (`FINETUNE_RECIPES`: fewer steps, lower peak learning rate);
- AdamW, linear warm-up then cosine decay, a fixed number of steps, CPU, one intra-op
  thread (``--threads``; see `THREADS`); everything seeded (member seed for the initial weights,
  member seed + 1 for the patch sampler);
- saved as a ``state_dict`` with floating tensors stored as float16 (``<name>.pt``);
  `atlasflow.segmentation.models.load_member` casts them back to float32 when loading.

The script prints, per member, the training time, the final loss (mean of the last 20 steps)
and the member's own Dice on the training CT, and writes ``training.json`` (settings, times,
losses, sizes, SHA-256) next to the weights. Results are reproducible on the same machine and
library versions; other CPUs or torch builds can differ in the last bits.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from atlasflow.common.organs import NUM_ORGANS, ORGANS
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.segmentation.ensemble import MemberConfig, load_ensemble
from atlasflow.segmentation.grid import model_grid, resample
from atlasflow.segmentation.models import build_member

ENSEMBLE = "abdomen-trio-v1"
# the bundled real CT test data, tests/data (override: ATLASFLOW_TEST_DATA, as tests/conftest.py)
SHARED_DATA = Path(os.environ.get("ATLASFLOW_TEST_DATA", Path(__file__).resolve().parents[1] / "tests" / "data"))
DATA_DIR = SHARED_DATA / "totalsegmentator" / "tests" / "reference_files"
CT_FILE = "example_ct.nii.gz"
SEG_FILE = "example_seg_fast_force_split.nii.gz"
FOREGROUND_P = 0.85
# One intra-op thread: on the shared 2-core machine, 2 threads were up to 10x slower per step
# than 1 under load from other processes (OpenMP barrier waits); 1 thread is also the most
# reproducible setting.
THREADS = 1


@dataclass(frozen=True)
class Recipe:
    """Training settings of one member (steps of ``batch`` patches, peak learning rate)."""

    steps: int
    batch: int
    lr: float
    weight_decay: float = 1e-4
    warmup: int = 20


# Sized for ~30 min wall with the three members as parallel processes on the shared 2-core
# machine (one batch of two 64^3 patches: UNet ~0.35 s, SwinUNETR ~1.5 s, DynUNet ~0.7 s when
# not contended, plus ~0.04 s of augmentation); the augmented task needs more steps than the
# plain single-CT fit did (700 / 450 / 700).
RECIPES: dict[str, Recipe] = {
    "unet": Recipe(steps=1200, batch=2, lr=3e-3),
    "swin_unetr": Recipe(steps=700, batch=2, lr=2e-3),
    "dynunet": Recipe(steps=1200, batch=2, lr=3e-3),
}
# Fine-tuning from existing checkpoints (``--init``; how the committed v2 files were made, from
# the v1 files of commit 1ec7f1b, which fit the training CT without augmentation): lower peak
# learning rate, fewer steps; sized for ~25 min wall under load on the shared 2-core machine.
FINETUNE_RECIPES: dict[str, Recipe] = {
    "unet": Recipe(steps=600, batch=2, lr=1e-3),
    "swin_unetr": Recipe(steps=250, batch=2, lr=7e-4),
    "dynunet": Recipe(steps=450, batch=2, lr=1e-3),
}


# ----------------------------------------------------------------------------- data

# HU offsets of a simulated contrast phase, drawn per patch (uniform in [low, high]) for the
# TotalSegmentator v2 classes of the training labels. Typical portal-venous / nephrographic
# enhancement ranges (generic CT physiology, not fitted to any evaluation series); voxels of
# every other class with a soft-tissue HU get one generic shift per patch (`SOFT_TISSUE_*`).
CONTRAST_HU: dict[str, tuple[tuple[int, ...], float, float]] = {
    "liver": ((5,), 20.0, 70.0),
    "spleen": ((1,), 30.0, 90.0),
    "kidneys": ((2, 3), 50.0, 180.0),
    "pancreas_adrenals": ((7, 8, 9), 30.0, 100.0),
    "arteries": ((52, 65, 66), 80.0, 250.0),  # aorta, iliac arteries
    "veins": ((63, 64, 67, 68), 60.0, 220.0),  # IVC, portal/splenic vein, iliac veins
    "no_enhancement": ((4, 21), 0.0, 0.0),  # gall bladder, urinary bladder (no early enhancement)
}
SOFT_TISSUE_HU = (-100.0, 150.0)  # base HU range that gets the generic shift
SOFT_TISSUE_SHIFT = (-10.0, 30.0)
AIR_HU = -1024.0  # fill outside the volume (windowed: 0, as the pipeline's resampling)


@dataclass(frozen=True)
class Augment:
    """Per-patch augmentation probabilities and ranges (see `AugmentingSampler`)."""

    contrast_p: float = 0.7  # simulate a contrast phase (`CONTRAST_HU`), else native HU
    offset_blur_vox: float = 0.75  # Gaussian sigma of the offset field (soft organ borders)
    noise_hu: tuple[float, float] = (0.0, 20.0)  # Gaussian noise sigma (HU), drawn per patch
    scale: tuple[float, float] = (0.85, 1.15)  # per-axis zoom (anisotropic)
    rotate_z_deg: float = 10.0  # rotation about the S axis, +-
    intensity_scale: tuple[float, float] = (0.9, 1.1)  # on the windowed [0, 1] image
    intensity_shift: tuple[float, float] = (-0.05, 0.05)
    gamma: tuple[float, float] = (0.8, 1.25)  # log-uniform
    slab_p: float = 0.4  # thin-slab patch (random z extent, padded like the sliding window)
    slab_vox: tuple[int, int] = (8, 64)  # slab z extent (model-grid voxels, inclusive)
    edge_dim_p: float = 0.5  # top slab slice partly outside the series (x U(0.3, 1))


AUGMENT = Augment()


def window(hu: torch.Tensor, hu_window: tuple[float, float]) -> torch.Tensor:
    """HU -> [0, 1]: ``clamp((hu - low) / (high - low), 0, 1)`` in float32 (as the pipeline)."""
    lo, hi = hu_window
    return ((hu.to(torch.float32) - lo) / (hi - lo)).clamp_(0.0, 1.0)


def nearest_resample(
    labels: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, int, int]
) -> np.ndarray:
    """Nearest-neighbour resampling of an integer ``(X, Y, Z)`` label map onto (dst_affine,
    dst_shape) (affines: voxel -> RAS mm); outside the source = 0. Exact copy when the grids
    coincide up to axis flips/permutations."""
    m = np.linalg.inv(src_affine) @ dst_affine
    idx = np.indices(dst_shape, dtype=np.float64).reshape(3, -1)
    src = np.rint(m[:3, :3] @ idx + m[:3, 3:4]).astype(np.int64)
    inside = np.all((src >= 0) & (src < np.asarray(labels.shape)[:, None]), axis=0)
    out = np.zeros(idx.shape[1], dtype=labels.dtype)
    out[inside] = labels[tuple(src[:, inside])]
    return out.reshape(dst_shape)


def to_model_grid(
    volume_hu: np.ndarray, ts_labels: np.ndarray, affine: np.ndarray, member: MemberConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Native ``(X, Y, Z)`` HU volume + TotalSegmentator v2 label map (same grid, ``affine``
    voxel -> RAS mm) -> the member's model grid (`grid.model_grid`): ``(X', Y', Z')``
    float32 HU (trilinear `grid.resample`, outside = `AIR_HU`) and uint8 TotalSegmentator
    ids (nearest).

    The windowing is applied per patch after the HU augmentations (`AugmentingSampler`); on the
    training CT (already RAS at 3 mm) both are exact copies, so windowing after resampling
    equals the pipeline's window-then-resample.
    """
    pre = member.preprocessing
    shape = tuple(int(s) for s in volume_hu.shape)
    g_aff, g_shape = model_grid(affine, shape, pre.target_spacing_mm)
    shifted = torch.from_numpy(np.ascontiguousarray(volume_hu)).to(torch.float32)[None] - AIR_HU
    hu = resample(shifted, affine, g_aff, g_shape)[0] + AIR_HU
    return hu.numpy(), nearest_resample(ts_labels.astype(np.uint8), affine, g_aff, g_shape)


def load_training_case(data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training CT: ``(X, Y, Z)`` int16 HU, uint8 TotalSegmentator v2 ids on the same grid
    (map with `totalseg_to_atlas`), affine."""
    ct = nib.load(str(data_dir / CT_FILE))
    seg = nib.load(str(data_dir / SEG_FILE))
    if ct.shape != seg.shape or not np.allclose(ct.affine, seg.affine, atol=1e-4):
        raise SystemExit("example CT and its segmentation are not on the same grid")
    hu = np.asarray(ct.dataobj).astype(np.int16)
    ts = np.asarray(seg.dataobj).astype(np.uint8)
    return hu, ts, np.asarray(ct.affine, dtype=np.float64)


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(N, 1, X, Y, Z)`` tensor (radius 2 sigma, zero padding)."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.reshape(shape))
    return x


class AugmentingSampler:
    """Organ-balanced random patches of a model-grid ``(X, Y, Z)`` HU volume and its
    TotalSegmentator ids, augmented (numpy RNG, seeded; torch ops are deterministic on CPU).

    Per patch, in this order:
    1. centre: with probability `FOREGROUND_P` near a voxel of an atlas organ drawn uniformly
       (+- patch/4), else anywhere; the un-zoomed patch starts on a voxel and lies inside the
       volume (centred where the volume is smaller than the patch);
    2. geometry: per-axis zoom ``scale`` and a rotation about the S (z) axis; image trilinear
       (outside = air), labels nearest (`grid_sample`); no flips (a left-right flip would swap
       the kidneys and put the liver on the spleen's side);
    3. contrast phase (probability ``contrast_p``): per-class HU offsets (`CONTRAST_HU`) and a
       generic soft-tissue shift, as an offset field blurred by ``offset_blur_vox``, added in
       HU; then Gaussian noise (HU);
    4. the pipeline's HU window to [0, 1], then global scale/shift and gamma, clamped;
    5. thin slab (probability ``slab_p``): a random z extent L in ``slab_vox`` at a random
       position in the patch is kept and placed as MONAI's sliding window pads a volume
       thinner than the window (constant 0, ``(64 - L) // 2`` before); labels 0 outside; the
       top slab slice is optionally dimmed (a series edge between two model-grid points).
    """

    def __init__(
        self, hu: np.ndarray, ts_labels: np.ndarray, patch: tuple[int, int, int], seed: int, aug: Augment = AUGMENT
    ) -> None:
        self.shape = hu.shape
        self.hu = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32) - AIR_HU)[None, None]
        self.ts = torch.from_numpy(ts_labels.astype(np.float32))[None, None]
        self.atlas_lut = torch.from_numpy(totalseg_to_atlas(np.arange(256)).astype(np.int64))
        atlas = totalseg_to_atlas(ts_labels)
        self.patch = patch
        self.aug = aug
        self.rng = np.random.default_rng(seed)
        self.organ_voxels = {k: np.argwhere(atlas == k) for k in range(1, NUM_ORGANS + 1)}
        self.organs = [k for k, v in self.organ_voxels.items() if len(v)]

    def _centre(self) -> np.ndarray:
        p = np.asarray(self.patch)
        if self.rng.random() < FOREGROUND_P:
            organ = self.organs[self.rng.integers(len(self.organs))]
            vox = self.organ_voxels[organ]
            centre = vox[self.rng.integers(len(vox))] + self.rng.integers(-p[0] // 4, p[0] // 4 + 1, size=3)
        else:
            centre = np.array([self.rng.integers(0, s) for s in self.shape])
        shape = np.asarray(self.shape)
        # integer start (voxel-aligned when not zoomed), inside the volume; centred if smaller
        start = np.where(shape >= p, np.clip(centre - p // 2, 0, np.maximum(shape - p, 0)), (shape - p) // 2)
        return start.astype(np.float64) + (p - 1) / 2

    def _grid(self, centre: np.ndarray) -> torch.Tensor:
        """``(1, *patch, 3)`` grid_sample coordinates (z, y, x order, align_corners=True)."""
        a = self.aug
        zoom = self.rng.uniform(*a.scale, size=3)
        t = math.radians(self.rng.uniform(-a.rotate_z_deg, a.rotate_z_deg))
        rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
        m = rot @ np.diag(zoom)
        axes = [np.arange(n, dtype=np.float64) - (n - 1) / 2 for n in self.patch]
        o = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (*patch, 3)
        src = o @ m.T + centre
        norm = 2.0 * src / (np.asarray(self.shape, dtype=np.float64) - 1.0) - 1.0
        return torch.from_numpy(norm[..., ::-1].astype(np.float32).copy())[None]

    def _offsets(self, ts: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
        """HU offset field of one simulated contrast phase for a ``(1, 1, *patch)`` patch."""
        table = torch.zeros(256, dtype=torch.float32)
        explicit = torch.zeros(256, dtype=torch.bool)
        for ids, low, high in CONTRAST_HU.values():
            value = float(self.rng.uniform(low, high))
            for i in ids:
                table[i] = value
                explicit[i] = True
        generic = float(self.rng.uniform(*SOFT_TISSUE_SHIFT))
        idx = ts.to(torch.int64)
        soft = (hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1]) & ~explicit[idx]
        offsets = table[idx] + generic * soft.to(torch.float32)
        return _gauss_blur(offsets, self.aug.offset_blur_vox)

    def sample(self, hu_window: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """One augmented ``patch`` float32 image in [0, 1] and its int64 atlas labels."""
        a = self.aug
        grid = self._grid(self._centre())
        hu = F.grid_sample(self.hu, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + AIR_HU
        ts = F.grid_sample(self.ts, grid, mode="nearest", padding_mode="zeros", align_corners=True)
        if self.rng.random() < a.contrast_p:
            hu = hu + self._offsets(ts, hu)
        sigma = self.rng.uniform(*a.noise_hu)
        noise = self.rng.standard_normal(size=hu.shape).astype(np.float32)
        hu = hu + sigma * torch.from_numpy(noise)
        x = window(hu, hu_window)
        x = x * self.rng.uniform(*a.intensity_scale) + self.rng.uniform(*a.intensity_shift)
        gamma = math.exp(self.rng.uniform(math.log(a.gamma[0]), math.log(a.gamma[1])))
        x = x.clamp(0.0, 1.0) ** gamma
        img = x[0, 0].numpy()
        lab = self.atlas_lut[ts[0, 0].to(torch.int64)].numpy()
        if self.rng.random() < a.slab_p:
            depth = self.patch[2]
            n = int(self.rng.integers(a.slab_vox[0], min(a.slab_vox[1], depth) + 1))
            z0 = int(self.rng.integers(0, depth - n + 1))
            h = (depth - n) // 2  # monai sliding_window_inference: diff // 2 before, constant 0
            img2 = np.zeros_like(img)
            lab2 = np.zeros_like(lab)
            img2[..., h : h + n] = img[..., z0 : z0 + n]
            lab2[..., h : h + n] = lab[..., z0 : z0 + n]
            if self.rng.random() < a.edge_dim_p:
                img2[..., h + n - 1] *= self.rng.uniform(0.3, 1.0)
            img, lab = img2, lab2
        return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(lab, dtype=np.int64)

    def batch(self, n: int, hu_window: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, 1, *patch)`` float32 images and ``(n, *patch)`` int64 atlas labels."""
        pairs = [self.sample(hu_window) for _ in range(n)]
        return torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None], torch.from_numpy(
            np.stack([p[1] for p in pairs])
        )


# ----------------------------------------------------------------------------- training


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean batch-pooled soft Dice over the channels present in ``target``;
    ``probs``/``target`` (N, C, ...). Absent channels are left to the BCE/CE term (a soft Dice
    of an empty target is ~0 for any non-zero prediction and only adds noise)."""
    dims = (0, *range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    tsum = target.sum(dims)
    dice = (2.0 * inter + eps) / (probs.sum(dims) + tsum + eps)
    present = tsum > 0
    if not bool(present.any()):
        return probs.sum() * 0.0
    return 1.0 - dice[present].mean()


def member_loss(logits: torch.Tensor, labels: torch.Tensor, activation: str) -> torch.Tensor:
    """Dice + BCE (sigmoid, 9 organ channels) or Dice over organs + CE (softmax, 10 channels).

    ``logits`` (N, C, X, Y, Z); ``labels`` (N, X, Y, Z) int64 atlas ids 0..9.
    """
    onehot = F.one_hot(labels, NUM_ORGANS + 1).permute(0, 4, 1, 2, 3).to(logits.dtype)
    if activation == "sigmoid":
        target = onehot[:, 1:]
        return soft_dice_loss(torch.sigmoid(logits), target) + F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.softmax(logits, dim=1)
    return soft_dice_loss(probs[:, 1:], onehot[:, 1:]) + F.cross_entropy(logits, labels)


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up over ``recipe.warmup`` steps, then cosine decay to 2 % of the peak."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def member_probs(net: torch.nn.Module, member: MemberConfig, image: np.ndarray) -> torch.Tensor:
    """Sliding-window ``(9, X', Y', Z')`` organ probabilities (the pipeline's member settings)."""
    from monai.inferers import sliding_window_inference

    pre = member.preprocessing
    with torch.inference_mode():
        logits = sliding_window_inference(
            torch.from_numpy(image)[None, None],
            roi_size=pre.patch_size,
            sw_batch_size=pre.sw_batch_size,
            predictor=net,
            overlap=pre.overlap,
            mode="gaussian",
        )[0]
    return torch.softmax(logits, 0)[1:] if member.activation == "softmax" else torch.sigmoid(logits)


def dice_per_organ(pred: np.ndarray, ref: np.ndarray) -> dict[int, float]:
    """Dice of each organ id 1..9 present in ``ref`` or ``pred`` (same-shape label maps)."""
    out = {}
    for k in range(1, NUM_ORGANS + 1):
        a, b = pred == k, ref == k
        total = int(a.sum()) + int(b.sum())
        if total:
            out[k] = 2.0 * float((a & b).sum()) / total
    return out


def half_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's state_dict with floating tensors as float16 (integer buffers unchanged)."""
    return {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).clone()
        for k, v in net.state_dict().items()
    }


def train_member(
    member: MemberConfig,
    recipe: Recipe,
    hu: np.ndarray,
    ts_labels: np.ndarray,
    aug: Augment = AUGMENT,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train one member from its seeded initialisation (or from the ``init`` state_dict) on the
    model-grid ``(X', Y', Z')`` HU volume and TotalSegmentator ids (`to_model_grid`); returns
    the net (eval mode) and a record."""
    torch.manual_seed(member.seed)
    net = build_member(member)
    if init is not None:
        net.load_state_dict(init)  # float16 tensors are cast into the float32 parameters
    net.train()
    sampler = AugmentingSampler(hu, ts_labels, member.preprocessing.patch_size, seed=member.seed + 1, aug=aug)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        x, y = sampler.batch(recipe.batch, member.preprocessing.hu_window)
        loss = member_loss(net(x), y, member.activation)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
        if (step + 1) % 50 == 0:
            print(
                f"  {member.name} step {step + 1}/{recipe.steps} loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    seconds = time.perf_counter() - t0
    net.eval()
    return net, {"train_seconds": round(seconds, 1), "final_loss": round(float(np.mean(losses[-20:])), 4)}


def update_manifest(path: Path, common: dict, name: str, record: dict) -> None:
    """Merge one member's record into ``training.json`` (locked: members may train in parallel
    processes, e.g. ``--members swin_unetr`` beside ``--members unet,dynunet``)."""
    fd = os.open(path.parent, os.O_RDONLY)  # lock the output directory itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        manifest = json.loads(path.read_text()) if path.is_file() else {}
        manifest.update(common)
        manifest.setdefault("members", {})[name] = record
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, default=Path("services/atlasflow/segmentation/weights"), help="output directory"
    )
    ap.add_argument("--members", default=",".join(RECIPES), help="comma-separated member names")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's steps (smoke runs)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="fine-tune from <INIT>/<member>.pt (FINETUNE_RECIPES) instead of training from scratch (RECIPES)",
    )
    ap.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = load_ensemble(ENSEMBLE)
    wanted = [n for n in args.members.split(",") if n]
    members = {m.name: m for m in cfg.members}
    if unknown := sorted(set(wanted) - set(members)):
        raise SystemExit(f"unknown members {unknown}; ensemble has {sorted(members)}")
    hu_native, ts_native, affine = load_training_case(args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    common = {
        "demo_only": True,
        "ensemble": ENSEMBLE,
        "training_ct": f"TotalSegmentator tests/reference_files/{CT_FILE}",
        "reference_labels": f"{SEG_FILE} (TotalSegmentator predictions) -> totalseg_to_atlas",
        "contrast_hu": {
            k: {"totalseg_ids": list(ids), "low": lo, "high": hi} for k, (ids, lo, hi) in CONTRAST_HU.items()
        },
        "soft_tissue_hu": {"range": list(SOFT_TISSUE_HU), "shift": list(SOFT_TISSUE_SHIFT)},
        "threads": args.threads,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "command": "python scripts/train_demo_weights.py --out services/atlasflow/segmentation/weights"
        + (f" --init {args.init}" if args.init is not None else ""),
    }
    for name in wanted:
        member = members[name]
        base = (FINETUNE_RECIPES if args.init is not None else RECIPES)[name]
        init = None
        init_record: dict = {"init": "seeded (from scratch)"}
        if args.init is not None:
            init_path = args.init / f"{name}.pt"
            init_blob = init_path.read_bytes()
            init = torch.load(init_path, map_location="cpu", weights_only=True)
            init_record = {
                "init": f"fine-tuned from {init_path.name}",
                "init_sha256": hashlib.sha256(init_blob).hexdigest(),
            }
        recipe = Recipe(**{**asdict(base), "steps": max(1, round(base.steps * args.steps_scale))})
        hu, ts = to_model_grid(hu_native, ts_native, affine, member)
        image = window(torch.from_numpy(hu), member.preprocessing.hu_window).numpy()
        labels = totalseg_to_atlas(ts)
        print(f"{name}: {member.architecture} seed {member.seed}, {recipe}", flush=True)
        net, record = train_member(member, recipe, hu, ts, init=init)
        record.update(init_record)
        t = time.perf_counter()
        pred = member_probs(net, member, image)
        # member-level label map on the model grid: >0.5, ties to the most probable organ
        best = pred.max(dim=0)
        pred_labels = torch.where(best.values > 0.5, best.indices + 1, 0).to(torch.uint8).numpy()
        dice = dice_per_organ(pred_labels, labels)
        record["member_dice_train_ct"] = {ORGANS[k]: round(v, 4) for k, v in dice.items()}
        record["eval_seconds"] = round(time.perf_counter() - t, 1)
        path = args.out / f"{name}.pt"
        torch.save(half_state_dict(net), path)
        blob = path.read_bytes()
        record.update(
            {
                "file": path.name,
                "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "seed_init": member.seed,
                "seed_sampler": member.seed + 1,
                "recipe": asdict(recipe),
                "augment": asdict(AUGMENT),
                "parameters": sum(p.numel() for p in net.parameters()),
            }
        )
        update_manifest(args.out / "training.json", common, name, record)
        print(
            f"{name}: trained in {record['train_seconds']:.1f} s, final loss {record['final_loss']:.4f}, "
            f"{len(blob) / 1e6:.2f} MB, member Dice on training CT "
            + ", ".join(f"{ORGANS[k]}={v:.3f}" for k, v in sorted(dice.items())),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
