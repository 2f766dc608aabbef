"""``atlasflow rank``: offline attention maps and case priority, compatible with the reference
layout (AbdomenAtlas ``create_attention.py``).

    atlasflow rank ROOT --out OUT [--mode reference|enhanced|...] [--models M ...]
                   [--labelled FILE.csv] [--prior PRIOR.json] [--learn-prior [--save-prior P.json]]

Input: ``ROOT/<case>/backbones/<model>/soft_pred/<organ>.nii.gz`` for organ names aorta,
gall_bladder, kidney_left, kidney_right, liver, pancreas, postcava, spleen, stomach; values
float in [0, 1] or uint8 0..255; every file of a case on one grid (shape and affine). Models
default to every ``backbones/`` sub-directory (sorted); a missing organ file = organ absent.
``--labelled`` (optional) is a CSV ``case,organs`` naming the organs each case's source labels
(space-separated names): they get no attention (partial-label template).

Output: ``OUT/<case>/attention/<organ>.nii.gz`` (uint8 heatmap ``floor(heatmap*255)``, the
case's grid and affine, unlabelled organs only), ``OUT/priority.csv`` (columns ``case``,
``score``, ``organs``: organs space-separated by priority; rows by decreasing score) and
``OUT/findings.json`` (per case and organ: score, reasons, pointer, ml figures).

``--mode`` names a registered ranking strategy (`atlasflow.method.strategy.strategy_names`).
Scores: reference = total attention voxels (the reference script's priority); enhanced = sum
over organs of attention ml + plausibility penalties (ml-equivalents, see
`atlasflow.method.enhanced`). ``--learn-prior`` updates the prior (bundled, or ``--prior``)
with the ensemble masks of every case given before ranking (cases are then held in memory as
crops).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.spatialimages import SpatialImage

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.method.attention import CaseAttention, case_attention
from atlasflow.method.geometry import measure_masks
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import DEFAULT_STRATEGY, RankedCase, get_strategy, strategy_names

DOMAIN = "atlasflow.ranking"
log = logging.getLogger("atlasflow.ranking.offline")


def read_case(
    case_dir: Path, models: list[str] | None = None
) -> tuple[dict[int, torch.Tensor], np.ndarray, tuple[int, ...]]:
    """Soft predictions of one case: organ id -> uint8 ``(M, X, Y, Z)``, the affine, the shape."""
    bb = case_dir / "backbones"
    names = models or sorted(p.name for p in bb.iterdir() if p.is_dir()) if bb.is_dir() else []
    if not names:
        raise InvalidArgument(
            "NO_MODELS", "case has no backbones/<model> directories", domain=DOMAIN, metadata={"case": case_dir.name}
        )
    affine: np.ndarray | None = None
    shape: tuple[int, ...] | None = None
    probs: dict[int, torch.Tensor] = {}
    for k, organ in ORGANS.items():
        paths = [bb / m / "soft_pred" / f"{organ}.nii.gz" for m in names]
        if not any(p.exists() for p in paths):
            continue
        stack = []
        for p in paths:
            if not p.exists():
                raise InvalidArgument(
                    "MISSING_PREDICTION",
                    "a model lacks an organ the others have",
                    domain=DOMAIN,
                    metadata={"case": case_dir.name, "path": str(p.relative_to(case_dir))},
                )
            img = nib.load(str(p))
            assert isinstance(img, SpatialImage)  # a NIfTI file (nibabel's loaders of images with a grid)
            arr = np.asanyarray(img.dataobj)
            if shape is None or affine is None:
                shape, affine = arr.shape, np.asarray(img.affine, dtype=np.float64)
            elif arr.shape != shape or not np.allclose(img.affine, affine, atol=1e-4):
                raise InvalidArgument(
                    "GRID_MISMATCH",
                    "soft predictions of one case must share one grid",
                    domain=DOMAIN,
                    metadata={"case": case_dir.name, "path": str(p.relative_to(case_dir))},
                )
            if arr.dtype == np.uint8:
                q = arr
            else:
                a = np.asarray(arr, dtype=np.float32)
                if a.size and (float(a.min()) < -1e-6 or float(a.max()) > 1.0 + 1e-6):
                    raise InvalidArgument(
                        "BAD_PROBABILITY",
                        "float soft predictions must lie in [0, 1]",
                        domain=DOMAIN,
                        metadata={"case": case_dir.name},
                    )
                q = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
            stack.append(np.ascontiguousarray(q))
        probs[k] = torch.from_numpy(np.stack(stack))
    if affine is None or shape is None:
        raise InvalidArgument(
            "NO_PREDICTIONS", "case has no soft predictions", domain=DOMAIN, metadata={"case": case_dir.name}
        )
    return probs, affine, shape


def read_labelled(path: Path | None) -> dict[str, set[int]]:
    """CSV ``case,organs`` (organ names space-separated) -> case -> organ ids."""
    out: dict[str, set[int]] = {}
    if path is None:
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            names = (row.get("organs") or "").split()
            unknown = [n for n in names if n not in ORGAN_IDS]
            if unknown:
                raise InvalidArgument(
                    "UNKNOWN_ORGAN", "unknown organ name in --labelled", domain=DOMAIN, metadata={"organ": unknown[0]}
                )
            out[row["case"]] = {ORGAN_IDS[n] for n in names}
    return out


def _write_case(out_dir: Path, case: str, ca: CaseAttention, ranked: RankedCase, affine: np.ndarray) -> None:
    d = out_dir / case / "attention"
    d.mkdir(parents=True, exist_ok=True)
    for k, r in ca.organs.items():
        if r.labelled:
            continue
        u8 = np.zeros(ca.shape, dtype=np.uint8)
        if k in ranked.heatmap:
            box, h = ranked.heatmap[k]
            u8[box] = np.floor(np.clip(h, 0.0, 1.0) * 255.0).astype(np.uint8)
        (d / f"{ORGANS[k]}.nii.gz").write_bytes(to_nifti_bytes(u8, affine))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="atlasflow rank", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=strategy_names(), default=DEFAULT_STRATEGY, help="ranking strategy")
    ap.add_argument("--models", nargs="+", default=None, help="model directories (default: all, sorted)")
    ap.add_argument("--labelled", type=Path, default=None, help="CSV case,organs of source-labelled organs")
    ap.add_argument("--prior", type=Path, default=None, help="prior JSON (default: the bundled one)")
    ap.add_argument("--learn-prior", action="store_true", help="update the prior from the given cases first")
    ap.add_argument("--save-prior", type=Path, default=None, help="write the (learned) prior here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.root.is_dir():
        print(f"atlasflow rank: {args.root} is not a directory", file=sys.stderr)
        return 2
    cases = sorted(p.name for p in args.root.iterdir() if (p / "backbones").is_dir())
    if not cases:
        print(f"atlasflow rank: no <case>/backbones/ under {args.root}", file=sys.stderr)
        return 2
    labelled = read_labelled(args.labelled)
    strategy = get_strategy(args.mode)
    prior = PopulationPrior.load(args.prior)
    args.out.mkdir(parents=True, exist_ok=True)
    held: dict[str, tuple[CaseAttention, np.ndarray]] = {}

    def attend(case: str) -> tuple[CaseAttention, np.ndarray]:
        probs, affine, _ = read_case(args.root / case, args.models)
        return case_attention(probs, labelled.get(case, set())), affine

    try:
        if args.learn_prior:
            for case in cases:
                ca, affine = attend(case)
                masks = {
                    k: (r.box, r.ensemble.numpy())
                    for k, r in ca.organs.items()
                    if r.box is not None and r.ensemble is not None and bool(r.ensemble.any())
                }
                prior.update(measure_masks(masks, affine, ca.shape))
                held[case] = (ca, affine)
            log.info("prior updated from %d cases (%d in total)", len(cases), prior.cases)
        if args.save_prior:
            prior.save(args.save_prior)
        rows = []
        findings: dict[str, object] = {}
        for case in cases:
            t0 = time.perf_counter()
            ca, affine = held.pop(case) if case in held else attend(case)
            ranked = strategy.rank(ca, affine, prior=prior)
            _write_case(args.out, case, ca, ranked, affine)
            rows.append((case, ranked.score, " ".join(o.name for o in ranked.organs)))
            findings[case] = {
                "score": ranked.score,
                "organs": [
                    {
                        "organ": o.name,
                        "score": o.score,
                        "attention_ml": o.attention_ml,
                        "heatmap_ml": o.heatmap_ml,
                        "volume_ml": o.volume_ml,
                        "reasons": o.reasons,
                        "pointer": o.pointer,
                    }
                    for o in ranked.organs
                ],
            }
            log.info("%s: score %.1f (%.2f s)", case, ranked.score, time.perf_counter() - t0)
    except InvalidArgument as e:
        print(f"atlasflow rank: {e}", file=sys.stderr)
        return 2
    rows.sort(key=lambda r: -r[1])
    with open(args.out / "priority.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "score", "organs"])
        for case, score, organs in rows:
            w.writerow([case, f"{score:.6g}", organs])
    (args.out / "findings.json").write_text(json.dumps({"mode": args.mode, "cases": findings}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
