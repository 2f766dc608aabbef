#!/usr/bin/env python
"""DEMO-ONLY: train the ``abdomen-trio-v1`` members on ONE bundled CT and save their weights.

    .venv/bin/python scripts/train_demo_weights.py --out services/segmentation/weights

The weights this writes are a demonstration that the pipeline runs with trained members; they
are fitted to a single CT (TotalSegmentator's ``example_ct.nii.gz``, 122 x 101 x 112, 3 mm,
RAS) whose reference labels are themselves TotalSegmentator *predictions*
(``example_seg_fast_force_split.nii.gz``) mapped to the nine AbdomenAtlas-8K organs by
`atlasflow.labels.totalseg.totalseg_to_atlas`. They are not a clinical model and generalise
poorly (see ``services/segmentation/weights/README.md`` for the measured figures).

Training data: the model-grid image is built exactly as `EnsemblePipeline` builds it: HU
window ``hu_window`` scaled to [0, 1] and clamped, then `pipeline.resample` onto
`pipeline.model_grid` (RAS-aligned, ``target_spacing_mm``); the reference labels go through
the same resampling as one-hot channels followed by an argmax (exact here: the example CT is
already RAS at 3 mm, so both are pure copies).

Per member (architecture, kwargs, activation and seed from the ensemble JSON):
- random ``patch_size`` patches, organ-balanced (``FOREGROUND_P`` of the patches are centred
  near a voxel of an organ picked uniformly, the rest anywhere); intensity jitter (scale,
  shift, Gaussian noise) but NO flips: a left-right flip would swap kidney_left/kidney_right
  and put the liver on the spleen's side;
- loss: Dice + BCE on the 9 organ channels (sigmoid members) or Dice (organs) + CE over the 10
  channels (softmax member, channel 0 = background);
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

import nibabel as nib
import numpy as np
import monai
import torch
import torch.nn.functional as F

from atlasflow.common.organs import NUM_ORGANS, ORGANS
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.segmentation.ensemble import MemberConfig, load_ensemble
from atlasflow.segmentation.models import build_member
from atlasflow.segmentation.pipeline import model_grid, resample

ENSEMBLE = "abdomen-trio-v1"
# `shared/data` beside the repository (override: ATLASFLOW_SHARED_DATA, as tests/conftest.py)
SHARED_DATA = Path(os.environ.get("ATLASFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
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


# Sized for ~25 min in total on one CPU thread of the shared 2-core machine (one batch of two
# 64^3 patches: UNet ~0.35 s, SwinUNETR ~1.5 s, DynUNet ~0.7 s when not contended).
RECIPES: dict[str, Recipe] = {
    "unet": Recipe(steps=700, batch=2, lr=3e-3),
    "swin_unetr": Recipe(steps=450, batch=2, lr=2e-3),
    "dynunet": Recipe(steps=700, batch=2, lr=3e-3),
}


# ----------------------------------------------------------------------------- data


def window(hu: torch.Tensor, hu_window: tuple[float, float]) -> torch.Tensor:
    """HU -> [0, 1]: ``clamp((hu - low) / (high - low), 0, 1)`` in float32 (as the pipeline)."""
    lo, hi = hu_window
    return ((hu.to(torch.float32) - lo) / (hi - lo)).clamp_(0.0, 1.0)


def to_model_grid(
    volume_hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, member: MemberConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Native ``(X, Y, Z)`` HU volume + atlas label map (same grid, ``affine`` voxel -> RAS mm)
    -> the member's model grid: ``(X', Y', Z')`` float32 image in [0, 1] and uint8 labels.

    The image follows `EnsemblePipeline`'s preprocessing step for step; labels are resampled
    as 10 one-hot channels (trilinear, the same `resample`) and arg-maxed.
    """
    pre = member.preprocessing
    shape = tuple(int(s) for s in volume_hu.shape)
    g_aff, g_shape = model_grid(affine, shape, pre.target_spacing_mm)  # type: ignore[arg-type]
    image = resample(window(torch.from_numpy(np.ascontiguousarray(volume_hu)), pre.hu_window)[None], affine, g_aff, g_shape)[0]
    onehot = F.one_hot(torch.from_numpy(labels.astype(np.int64)), NUM_ORGANS + 1).permute(3, 0, 1, 2).to(torch.float32)
    lab = resample(onehot, affine, g_aff, g_shape).argmax(dim=0).to(torch.uint8)
    return image.numpy(), lab.numpy()


def load_training_case(data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training CT: ``(X, Y, Z)`` int16 HU, uint8 atlas labels on the same grid, affine."""
    ct = nib.load(str(data_dir / CT_FILE))
    seg = nib.load(str(data_dir / SEG_FILE))
    if ct.shape != seg.shape or not np.allclose(ct.affine, seg.affine, atol=1e-4):
        raise SystemExit("example CT and its segmentation are not on the same grid")
    hu = np.asarray(ct.dataobj).astype(np.int16)
    labels = totalseg_to_atlas(np.asarray(seg.dataobj))
    return hu, labels, np.asarray(ct.affine, dtype=np.float64)


class PatchSampler:
    """Organ-balanced random patches of a ``(X, Y, Z)`` image/label pair (numpy RNG, seeded)."""

    def __init__(self, image: np.ndarray, labels: np.ndarray, patch: tuple[int, int, int], seed: int) -> None:
        pad = [(0, max(0, p - s)) for p, s in zip(patch, image.shape)]
        self.image = np.pad(image, pad)
        self.labels = np.pad(labels, pad)
        self.patch = patch
        self.rng = np.random.default_rng(seed)
        self.organ_voxels = {k: np.argwhere(self.labels == k) for k in range(1, NUM_ORGANS + 1)}
        self.organs = [k for k, v in self.organ_voxels.items() if len(v)]

    def _start(self) -> tuple[int, ...]:
        shape = self.image.shape
        if self.rng.random() < FOREGROUND_P:
            organ = self.organs[self.rng.integers(len(self.organs))]
            vox = self.organ_voxels[organ]
            centre = vox[self.rng.integers(len(vox))] + self.rng.integers(-self.patch[0] // 4, self.patch[0] // 4 + 1, size=3)
            start = centre - np.asarray(self.patch) // 2
        else:
            start = np.array([self.rng.integers(0, s - p + 1) for s, p in zip(shape, self.patch)])
        return tuple(int(np.clip(st, 0, s - p)) for st, s, p in zip(start, shape, self.patch))

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, 1, *patch)`` float32 image (jittered) and ``(n, *patch)`` int64 labels."""
        xs, ys = [], []
        for _ in range(n):
            s = self._start()
            sl = tuple(slice(a, a + p) for a, p in zip(s, self.patch))
            x = self.image[sl] * self.rng.uniform(0.9, 1.1) + self.rng.uniform(-0.05, 0.05)
            x = x + self.rng.normal(0.0, 0.01, size=x.shape)
            xs.append(np.clip(x, 0.0, 1.0).astype(np.float32))
            ys.append(self.labels[sl].astype(np.int64))
        return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))


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
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).clone() for k, v in net.state_dict().items()}


def train_member(member: MemberConfig, recipe: Recipe, image: np.ndarray, labels: np.ndarray) -> tuple[torch.nn.Module, dict]:
    """Train one member from its seeded initialisation; returns the net (eval mode) and a record."""
    torch.manual_seed(member.seed)
    net = build_member(member).train()
    sampler = PatchSampler(image, labels, member.preprocessing.patch_size, seed=member.seed + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        x, y = sampler.batch(recipe.batch)
        loss = member_loss(net(x), y, member.activation)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
        if (step + 1) % 50 == 0:
            print(f"  {member.name} step {step + 1}/{recipe.steps} loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("services/segmentation/weights"), help="output directory")
    ap.add_argument("--members", default=",".join(RECIPES), help="comma-separated member names")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's steps (smoke runs)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = load_ensemble(ENSEMBLE)
    wanted = [n for n in args.members.split(",") if n]
    members = {m.name: m for m in cfg.members}
    if unknown := sorted(set(wanted) - set(members)):
        raise SystemExit(f"unknown members {unknown}; ensemble has {sorted(members)}")
    hu, ref, affine = load_training_case(args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    common = {
            "demo_only": True,
            "ensemble": ENSEMBLE,
            "training_ct": f"TotalSegmentator tests/reference_files/{CT_FILE}",
            "reference_labels": f"{SEG_FILE} (TotalSegmentator predictions) -> totalseg_to_atlas",
            "threads": args.threads,
            "torch": torch.__version__,
            "monai": monai.__version__,
            "python": platform.python_version(),
            "command": "python scripts/train_demo_weights.py --out services/segmentation/weights",
    }
    for name in wanted:
        member = members[name]
        base = RECIPES[name]
        recipe = Recipe(**{**asdict(base), "steps": max(1, round(base.steps * args.steps_scale))})
        image, labels = to_model_grid(hu, ref, affine, member)
        print(f"{name}: {member.architecture} seed {member.seed}, {recipe}", flush=True)
        net, record = train_member(member, recipe, image, labels)
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
