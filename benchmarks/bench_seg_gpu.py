"""GPU benchmark: atlasflow's pipeline function vs MONAI ``sliding_window_inference`` (fp32).

    python benchmarks/bench_seg_gpu.py [--device cuda] [--overlaps 0.5 0.75] [--runs 3]
        [--patch-batch 16] [--autocast bf16] [--no-crop] [--ablation] [--json]
    python benchmarks/bench_seg_gpu.py --dry-run        # CPU, tiny sizes, checks the harness

Setting (DESIGN.md "Performance anchors"): one abdominal CT on a 1.5 mm grid of
266x266x250 voxels (a synthetic body phantom: air at -1000 HU, an elliptic body of soft tissue
with a denser core, a table below it), the paper's trio at full size with seeded weights
carried as **state_dicts** (saved with ``torch.save(net.state_dict())`` and loaded through the
ensemble file; no TorchScript, the device's torch may be older):

- U-Net 32..320 channels (96^3 patches, sigmoid), Swin UNETR feature size 48 (96^3, sigmoid),
  DynUNet nnU-Net-like 32..320 filters (128^3 patches, softmax).

Baseline (the anchor's): per member, the HU window scaled to [0, 1] on the model grid, then
MONAI ``sliding_window_inference`` with fp32, ``sw_batch_size=4``, Gaussian blending, the same
overlap; summed over the three members. Inference only: no resampling, post-processing or
attention.

atlasflow: ``EnsemblePipeline(..., autocast, sw_batch_size=--patch-batch, overlap,
foreground_crop)`` called on the native volume: the whole function (preprocessing, three
members, native-grid masks, largest components, attention) and, separately, its members'
inference time (``timings_s['infer_*']``).

Prints, per overlap, the median of ``--runs`` (after one warm-up) of each and the speed-ups
baseline / atlasflow (whole function) and baseline / atlasflow (inference part). Goal >= 2x.
``--ablation`` adds bf16 + batch without cropping, to separate the two effects.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlasflow.testing.synthetic import TINY_MEMBERS, phantom, write_ensemble

SIZE = (266, 266, 250)
SPACING = 1.5

FULL_MEMBERS: list[dict[str, Any]] = [
    {
        "name": "unet",
        "architecture": "monai.UNet",
        "activation": "sigmoid",
        "seed": 101,
        "patch": 96,
        "kwargs": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 9,
            "channels": [32, 64, 128, 256, 320],
            "strides": [2, 2, 2, 2],
            "num_res_units": 2,
        },
    },
    {
        "name": "swin_unetr",
        "architecture": "monai.SwinUNETR",
        "activation": "sigmoid",
        "seed": 202,
        "patch": 96,
        "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 9, "feature_size": 48},
    },
    {
        "name": "dynunet",
        "architecture": "monai.DynUNet",
        "activation": "softmax",
        "seed": 303,
        "patch": 128,
        "kwargs": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 10,
            "kernel_size": [3, 3, 3, 3, 3, 3],
            "strides": [1, 2, 2, 2, 2, 2],
            "upsample_kernel_size": [2, 2, 2, 2, 2],
            "filters": [32, 64, 128, 256, 320, 320],
        },
    },
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_seconds(ensemble: Path, vol: np.ndarray, overlap: float, device: torch.device) -> float:
    """MONAI sliding_window_inference, fp32, sw_batch_size 4, Gaussian, per member; summed."""
    from monai.inferers import sliding_window_inference

    from atlasflow.segmentation.ensemble import load_ensemble
    from atlasflow.segmentation.models import load_member

    cfg = load_ensemble(ensemble)
    nets = [(m, load_member(m, device)) for m in cfg.members]
    lo, hi = cfg.members[0].preprocessing.hu_window
    image = ((torch.from_numpy(vol).to(device).float() - lo) / (hi - lo)).clamp_(0, 1)[None, None]
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for m, net in nets:
            out = sliding_window_inference(image, m.preprocessing.patch_size, 4, net, overlap=overlap, mode="gaussian")
            del out
    _sync(device)
    return time.perf_counter() - t0


def atlasflow_seconds(pipe: Any, vol: np.ndarray, affine: np.ndarray, device: torch.device) -> tuple[float, float]:
    """(whole pipeline function, its members' inference part) in seconds."""
    _sync(device)
    t0 = time.perf_counter()
    out = pipe(vol, affine)
    _sync(device)
    total = time.perf_counter() - t0
    return total, sum(v for k, v in out.timings_s.items() if k.startswith("infer_"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from atlasflow.segmentation.pipeline import EnsemblePipeline

    device = torch.device(args.device)
    shape = tuple(args.size) if args.size else ((48, 44, 40) if args.dry_run else SIZE)
    members = TINY_MEMBERS if args.dry_run else FULL_MEMBERS
    runs = 1 if args.dry_run else args.runs
    vol = phantom(shape)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    results: dict[str, Any] = {
        "device": str(device),
        "shape": list(shape),
        "runs": runs,
        "patch_batch": args.patch_batch,
        "autocast": args.autocast,
        "crop": not args.no_crop,
        "overlaps": {},
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    results["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as tmp:
        for overlap in args.overlaps:
            ens = write_ensemble(Path(tmp), members, overlap, SPACING)
            variants = {
                "atlasflow": dict(
                    autocast=args.autocast,
                    sw_batch_size=args.patch_batch,
                    overlap=overlap,
                    foreground_crop=not args.no_crop,
                )
            }
            if args.ablation:
                variants["atlasflow_no_crop"] = dict(
                    autocast=args.autocast, sw_batch_size=args.patch_batch, overlap=overlap, foreground_crop=False
                )
            row: dict[str, Any] = {}
            baseline_seconds(ens, vol, overlap, device)  # warm-up (cuDNN autotune, allocator)
            base = [baseline_seconds(ens, vol, overlap, device) for _ in range(runs)]
            row["baseline_fp32_sw4_s"] = statistics.median(base)
            for name, kw in variants.items():
                pipe = EnsemblePipeline(str(ens), device=str(device), **kw)
                atlasflow_seconds(pipe, vol, affine, device)  # warm-up
                samples = [atlasflow_seconds(pipe, vol, affine, device) for _ in range(runs)]
                total = statistics.median(s[0] for s in samples)
                infer = statistics.median(s[1] for s in samples)
                row[f"{name}_total_s"] = total
                row[f"{name}_infer_s"] = infer
                row[f"{name}_speedup_total"] = row["baseline_fp32_sw4_s"] / total
                row[f"{name}_speedup_infer"] = row["baseline_fp32_sw4_s"] / infer
                del pipe
            results["overlaps"][str(overlap)] = row
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--patch-batch", type=int, default=16)
    parser.add_argument("--autocast", choices=("none", "bf16"), default="bf16")
    parser.add_argument("--no-crop", action="store_true", help="no foreground (body) cropping")
    parser.add_argument("--ablation", action="store_true", help="also time bf16 + batch without cropping")
    parser.add_argument("--size", type=int, nargs=3, help="override the volume size (X Y Z voxels at 1.5 mm)")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU-sized harness check: tiny members and volume, 1 run"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.overlaps = args.overlaps[:2]
    r = run(args)
    print(
        f"device {r['device']} {r.get('gpu', '')} torch {r['torch']}  volume {tuple(r['shape'])} @ {SPACING} mm  "
        f"patch batch {r['patch_batch']} autocast {r['autocast']} crop {r['crop']}  median of {r['runs']}"
    )
    for ov, row in r["overlaps"].items():
        print(f"overlap {ov}: MONAI fp32 sw_batch 4 (trio, inference only) {row['baseline_fp32_sw4_s']:.3f} s")
        for name in ("atlasflow", "atlasflow_no_crop"):
            if f"{name}_total_s" in row:
                print(
                    f"  {name:18s} whole function {row[f'{name}_total_s']:.3f} s (speed-up {row[f'{name}_speedup_total']:.2f}x), "
                    f"inference part {row[f'{name}_infer_s']:.3f} s (speed-up {row[f'{name}_speedup_infer']:.2f}x)"
                )
    if args.json:
        print("RESULT " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
