"""Fine-tune throughput of the ensemble trio on one GPU (issue 15's device script; run by
``benchmarks/gpu/finetune_throughput.sh``).

    python benchmarks/gpu/finetune_throughput.py [--device cuda] [--steps 30] [--warmup 5]
        [--batch-size 2] [--autocast bf16] [--crops-per-case 8] [--cases 4] [--json-out F]
    python benchmarks/gpu/finetune_throughput.py --dry-run     # CPU, tiny members, 3 steps

What runs: the product's own training step, `atlasflow.training.finetune.finetune_member`
(MONAI crop transforms ``SpatialPadd`` + ``RandCropByPosNegLabeld``, the masked Dice + CE loss,
AdamW, bf16 autocast with ``--autocast bf16``, deterministic algorithms as in the product), for
each member of the paper's trio at full size and at its reference patch size (U-Net 32..320 and
Swin UNETR feature 48 on 96^3 crops, DynUNet 32..320 on 128^3 crops: the members of
``benchmarks/bench_seg_gpu.py``, seeded weights, 1.5 mm grid), one member after the other on
one GPU, as one rank of the Kubernetes Job does.

Data: ``--cases`` synthetic abdomen phantoms (`atlasflow.testing.synthetic.phantom`, 1.5 mm,
``--size`` voxels) with nine ellipsoid "organs" inside the body, all decided (weight 1). The
content does not change the arithmetic of a step; the cases only feed the crop sampler.

Figures (per member, steps after ``--warmup``): median seconds per step (sampling + forward +
backward + optimiser, read from the member's ``log.jsonl``), the CPU crop sampling's share of
it (``sample_s_median``: `finetune.sample_batch` alone), crops per second, and peak GPU
memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, reset per member).
Cases per hour per GPU for the trio = 3600 / sum over members of (crops_per_case / crops per
second): the number of training cases one GPU fine-tunes per hour when each case contributes
``--crops-per-case`` random crops to each member (an explicit assumption, printed with the
figure: the campaign projection scales it).
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

SPACING = 1.5


def organ_masks(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """(9, X, Y, Z) uint8: nine non-overlapping ellipsoids inside the phantom's body."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    out = np.zeros((9, *shape), np.uint8)
    taken = np.zeros(shape, bool)
    centres = [(-0.4, 0.1), (0.4, 0.1), (0.0, 0.25), (-0.2, -0.2), (0.2, -0.2), (0.0, -0.05), (-0.5, -0.1),
               (0.5, -0.1), (0.0, 0.45)]  # fmt: skip
    for k, (cx, cy) in enumerate(centres):
        r = rng.uniform(0.1, 0.18)
        cz = rng.uniform(-0.3, 0.3)
        m = ((grid[0] - cx) / r) ** 2 + ((grid[1] - cy) / (r * 0.8)) ** 2 + ((grid[2] - cz) / (r * 2)) ** 2 <= 1
        m &= ~taken
        out[k] = m
        taken |= m
    return out


def member_data(member: Any, cases: int, size: tuple[int, int, int]) -> Any:
    """`finetune.MemberData` of ``cases`` phantoms, preprocessed as the pipeline does."""
    from atlasflow.segmentation.pipeline import preprocess
    from atlasflow.testing.synthetic import phantom
    from atlasflow.training.finetune import MemberData

    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    data = MemberData()
    for i in range(cases):
        image, _ = preprocess(torch.from_numpy(phantom(size, seed=i)), affine, member.preprocessing)
        shape = tuple(int(v) for v in image.shape[1:])
        data.images.append(image.contiguous())
        data.organs.append(torch.from_numpy(organ_masks(shape, seed=i)))
        data.weights.append(torch.ones(9, dtype=torch.float32))
    return data


def run(args: argparse.Namespace) -> dict[str, Any]:
    from atlasflow.common.blobstore import LocalBlobStore
    from atlasflow.segmentation.ensemble import load_ensemble
    from atlasflow.testing.synthetic import TINY_MEMBERS, write_ensemble
    from atlasflow.training.dataset import Manifest
    from atlasflow.training.finetune import Hyperparameters, finetune_member, sample_batch
    from bench_seg_gpu import FULL_MEMBERS

    device = torch.device(args.device)
    members_spec = TINY_MEMBERS if args.dry_run else FULL_MEMBERS
    size = tuple(args.size) if args.size else ((48, 44, 40) if args.dry_run else (200, 200, 160))
    steps = args.steps
    out: dict[str, Any] = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "steps": steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "autocast": args.autocast,
        "cases": args.cases,
        "volume": list(size),
        "crops_per_case": args.crops_per_case,
        "members": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        ens = load_ensemble(write_ensemble(Path(tmp), members_spec, 0.5, SPACING))
        for member in ens.members:
            patch = list(member.preprocessing.patch_size)
            hp = {
                "steps": steps,
                "batch_size": args.batch_size,
                "checkpoint_every": max(steps, 1),
                "autocast": args.autocast,
                "lr": 1e-4,
                "crop_size": patch,
            }
            manifest = Manifest(parent_version=ens.version, seed=0, hyperparameters=hp, train=(), holdout=())
            t = time.perf_counter()
            data = member_data(member, args.cases, size)
            prep_s = time.perf_counter() - t
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            run_dir = Path(tmp) / "run"
            result = finetune_member(
                member, manifest, "sha256:" + "0" * 64, LocalBlobStore(Path(tmp) / "blobs"), run_dir,
                device=str(device), data=data,
            )  # fmt: skip
            log = [json.loads(line) for line in (run_dir / member.name / "log.jsonl").read_text().splitlines()]
            timed = [e["seconds"] for e in log[args.warmup :]] or [e["seconds"] for e in log]
            step_s = statistics.median(timed)
            # the CPU part of a step: the MONAI crop sampling alone (the rest is the GPU's)
            hp_obj = Hyperparameters.from_dict(hp)
            samples = []
            for k in range(min(5, steps)):
                t = time.perf_counter()
                sample_batch(data, hp_obj, patch, 0, member.name, k)
                samples.append(time.perf_counter() - t)
            row = {
                "member": member.name,
                "architecture": member.architecture,
                "patch": patch,
                "params_m": round(
                    sum(p.numel() for p in torch.load(result.weights, weights_only=True).values()) / 1e6, 2
                ),
                "prepare_s": round(prep_s, 2),
                "step_s_median": round(step_s, 4),
                "crops_per_s": round(args.batch_size / step_s, 3),
                "sample_s_median": round(statistics.median(samples), 4),
                "final_loss": round(result.final_loss, 4),
                "total_s": round(result.seconds, 2),
            }
            if device.type == "cuda":
                row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
            out["members"].append(row)
            print(json.dumps(row), flush=True)
    seconds_per_case = sum(args.crops_per_case / m["crops_per_s"] for m in out["members"])
    out["trio_seconds_per_case"] = round(seconds_per_case, 3)
    out["cases_per_hour_per_gpu"] = round(3600.0 / seconds_per_case, 1)
    if device.type == "cuda":
        out["peak_allocated_gib_max"] = max(m["peak_allocated_gib"] for m in out["members"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=2, help="crops per step")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="bf16")
    parser.add_argument("--crops-per-case", type=int, default=8, help="crops per case per member (cases/hour)")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=3, help="phantom size (X Y Z voxels at 1.5 mm)")
    parser.add_argument("--dry-run", action="store_true", help="CPU harness check: tiny members, fp32, 3 steps")
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.autocast, args.cases = "cpu", "none", min(args.cases, 2)
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    result = run(args)
    print(
        f"device {result['gpu'] or result['device']}  autocast {result['autocast']}  batch {result['batch_size']}  "
        f"steps {result['steps']} (warm-up {result['warmup']})"
    )
    for m in result["members"]:
        mem = f"  peak {m['peak_allocated_gib']} GiB" if "peak_allocated_gib" in m else ""
        print(
            f"  {m['member']:<11} patch {m['patch']}  {m['step_s_median']:.3f} s/step "
            f"(crop sampling {m['sample_s_median']:.3f} s)  {m['crops_per_s']:.2f} crops/s{mem}"
        )
    print(
        f"trio: {result['trio_seconds_per_case']:.2f} s per case ({result['crops_per_case']} crops per member) = "
        f"{result['cases_per_hour_per_gpu']:.0f} cases/hour per GPU"
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
