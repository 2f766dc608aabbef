"""Synthetic inputs for tests and benchmarks.

`make_case`: organ id -> uint8 ``(M, X, Y, Z)`` soft predictions (``p*255``) of M models, one
blurred ellipsoid per organ placed by `LAYOUT` with per-model jitter, boundary wobble and a
false-positive island in one model for liver and stomach (bench_attention, the attention oracle
tests). `phantom`: an ``(X, Y, Z)`` int16 HU body phantom; `TINY_MEMBERS` + `write_ensemble`: a
tiny seeded trio carried as state_dict checkpoints (bench_seg_gpu and its CPU dry run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

# organ id -> (centre as a fraction of the volume, radii as a fraction of the volume)
LAYOUT: dict[int, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    1: ((0.50, 0.55, 0.50), (0.025, 0.025, 0.40)),  # aorta: a long thin tube
    2: ((0.35, 0.40, 0.55), (0.04, 0.04, 0.06)),  # gall bladder
    3: ((0.68, 0.62, 0.45), (0.07, 0.07, 0.13)),  # kidney left (patient left = -x... layout only)
    4: ((0.32, 0.62, 0.42), (0.07, 0.07, 0.13)),  # kidney right
    5: ((0.33, 0.45, 0.65), (0.20, 0.18, 0.22)),  # liver
    6: ((0.55, 0.50, 0.50), (0.12, 0.04, 0.05)),  # pancreas
    7: ((0.44, 0.58, 0.50), (0.025, 0.025, 0.35)),  # postcava
    8: ((0.72, 0.55, 0.65), (0.08, 0.08, 0.11)),  # spleen
    9: ((0.62, 0.38, 0.68), (0.12, 0.10, 0.12)),  # stomach
}


def make_case(shape: tuple[int, int, int], n_models: int = 3, seed: int = 0) -> dict[int, npt.NDArray[Any]]:
    """Organ id -> uint8 ``(M, X, Y, Z)`` synthetic soft predictions on ``shape`` (see module doc).

    Only each organ's bounding box is computed (fast at 512x512x300)."""
    rng = np.random.default_rng(seed)
    sh = np.array(shape, dtype=np.float64)
    out: dict[int, npt.NDArray[Any]] = {}
    for k, (c, r) in LAYOUT.items():
        q = np.zeros((n_models, *shape), dtype=np.uint8)
        centre = np.array(c) * sh
        radii = np.maximum(np.array(r) * sh, 2.0)
        lo = np.maximum(np.floor(centre - 1.5 * radii - 4), 0).astype(int)
        hi = np.minimum(np.ceil(centre + 1.5 * radii + 4), sh).astype(int)
        axes = [np.arange(lo[a], hi[a], dtype=np.float32) for a in range(3)]
        for m in range(n_models):
            cm = centre + rng.normal(0, 0.6, 3) * (1 + (m == n_models - 1))
            rm = radii * rng.uniform(0.94, 1.06, 3)
            d = [((axes[a] - cm[a]) / rm[a]) ** 2 for a in range(3)]
            rr = np.sqrt(d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :])
            ph = rng.uniform(0, 2 * np.pi, 3)
            wob = (
                np.sin(axes[0] / 9 + ph[0])[:, None, None]
                + np.sin(axes[1] / 11 + ph[1])[None, :, None]
                + np.sin(axes[2] / 7 + ph[2])[None, None, :]
            ) * 0.08
            logit = (1.0 - rr + wob) * (6.0 * rng.uniform(0.8, 1.2))
            p = 1.0 / (1.0 + np.exp(-logit))
            p[rr > 1.35] = 0.0
            box = tuple(slice(lo[a], hi[a]) for a in range(3))
            q[m][box] = np.round(p * 255).astype(np.uint8)
            if m == 0 and k in (5, 9):  # a false-positive island near the organ in one model
                ic = np.clip(centre + radii * np.array([1.1, 0.3, 0.0]), 4, sh - 5).astype(int)
                ir = max(2, int(min(radii) * 0.3))
                sl = tuple(slice(max(0, ic[a] - ir), min(shape[a], ic[a] + ir)) for a in range(3))
                q[m][sl] = np.maximum(q[m][sl], 200)
        out[k] = q
    return out


TINY_MEMBERS: list[dict[str, Any]] = [
    {
        "name": "unet",
        "architecture": "monai.UNet",
        "activation": "sigmoid",
        "seed": 101,
        "patch": 32,
        "kwargs": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 9,
            "channels": [4, 8],
            "strides": [2],
            "num_res_units": 0,
        },
    },
    {
        "name": "swin_unetr",
        "architecture": "monai.SwinUNETR",
        "activation": "sigmoid",
        "seed": 202,
        "patch": 64,
        "kwargs": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 9,
            "feature_size": 12,
            "depths": [1, 1, 1, 1],
            "num_heads": [3, 3, 3, 3],
            "window_size": 4,
        },
    },
    {
        "name": "dynunet",
        "architecture": "monai.DynUNet",
        "activation": "softmax",
        "seed": 303,
        "patch": 32,
        "kwargs": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 10,
            "kernel_size": [3, 3, 3],
            "strides": [1, 2, 2],
            "upsample_kernel_size": [2, 2],
            "filters": [4, 8, 16],
        },
    },
]


def phantom(shape: tuple[int, int, int], seed: int = 0) -> npt.NDArray[Any]:
    """Synthetic abdomen ``(X, Y, Z)`` int16 HU: air, an elliptic body (~40 HU with noise)
    covering ~80% x 60% of the in-plane field, a denser core and a table under the back."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 <= 1.0
    core = ((x - 0.15) / 0.3) ** 2 + ((y + 0.05) / 0.25) ** 2 <= 1.0
    table = (y < -0.7) & (y > -0.78) & (np.abs(x) < 0.9)
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, dtype=np.int16)
    plane = np.where(body, 40, -1000).astype(np.int16)
    plane[core] = 120
    plane[table] = 300
    vol[:] = plane[:, :, None]
    vol += (rng.standard_normal(shape) * 15).astype(np.int16) * body[:, :, None]
    return vol


def write_ensemble(out: Path, members: list[dict[str, Any]], overlap: float, spacing_mm: float = 1.5) -> Path:
    """Ensemble JSON + one state_dict checkpoint per member (seeded weights) under ``out``;
    every member resamples to ``spacing_mm`` (isotropic, mm)."""
    from atlasflow.segmentation.ensemble import parse_ensemble
    from atlasflow.segmentation.models import build_member

    doc: dict[str, Any] = {
        "format": 1,
        "version": "bench-trio",
        "description": "benchmark only: seeded weights",
        "members": [],
    }
    for m in members:
        doc["members"].append(
            {
                "name": m["name"],
                "architecture": m["architecture"],
                "kwargs": m["kwargs"],
                "activation": m["activation"],
                "seed": m["seed"],
                "checkpoint": f"{m['name']}.pt",
                "preprocessing": {
                    "target_spacing_mm": [spacing_mm] * 3,
                    "hu_window": [-175.0, 250.0],
                    "patch_size": [m["patch"]] * 3,
                    "overlap": overlap,
                    "sw_batch_size": 4,
                },
            }
        )
    cfg = parse_ensemble({**doc, "members": [{**d, "checkpoint": None} for d in doc["members"]]}, base=out)
    for member in cfg.members:
        torch.save(build_member(member).state_dict(), out / f"{member.name}.pt")
    path = out / "bench-trio.json"
    path.write_text(json.dumps(doc))
    return path
