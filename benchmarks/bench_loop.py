"""Rounds of the active-learning loop on the bundled example CT, with a simulated radiologist.

Cases are 64^3-voxel boxes of the TotalSegmentator example CT (tests/data/totalsegmentator,
3 mm; reference = its `--fast` labels mapped to the nine AbdomenAtlas organs: model output, not
manual). Round 0: the current ensemble labels every case (AI versions in a real SQLite labels
store); the held-out cases get every present organ decided by the radiologist (reference).
Each round: the radiologist revises the ``--revise`` train-case organs with the highest
attention (the pipeline's per-organ ``attention_ml``, i.e. the ranking's signal, not the
ranking service) using the reference; then one training round (`atlasflow.training.worker.
run_round`: manifest, fine-tune, version, held-out gate, promotion); then the promoted ensemble
re-infers the train cases (human organs are kept by label assembly) and the table row is
printed:

    round, model_version, promoted, revised_dice (held-out cases, organs of the kinds revised
    so far), other_dice (held-out, the other organs), attention_ml (sum over train cases),
    cases_to_review (train cases with attention_ml > --threshold-ml), seconds per stage.

CPU-sized defaults: a few fine-tune steps on 32^3 crops; the figures show the loop's plumbing,
not what a real epoch budget gives. ``--out DIR`` writes DIR/rounds.json.

    .venv/bin/python benchmarks/bench_loop.py --rounds 2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.organs import ORGANS
from atlasflow.labels.repository import Provenance
from atlasflow.labels.sqlite import SqliteLabelRepository
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.labels.writer import LabelWriter, MaskRevision
from atlasflow.segmentation.pipeline import EnsemblePipeline
from atlasflow.training.finetune import Hyperparameters
from atlasflow.training.versions import current_ensemble
from atlasflow.training.worker import run_round

REF = Path(__file__).resolve().parents[1] / "tests/data/totalsegmentator/tests/reference_files"
BOXES = {  # (x0, y0, z0) of 64^3 boxes
    "case-1": (0, 0, 48),
    "case-2": (50, 0, 48),
    "case-3": (0, 30, 30),
    "case-4": (50, 30, 30),
    "case-5": (20, 10, 40),
    "case-6": (40, 20, 20),
}
HOLDOUT = {"case-5", "case-6"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--revise", type=int, default=3, help="organs revised per round")
    ap.add_argument("--members", default="unet", help="comma-separated members to fine-tune ('' = all)")
    ap.add_argument("--threshold-ml", type=float, default=1.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    ct_img = nib.load(str(REF / "example_ct.nii.gz"))
    assert isinstance(ct_img, nib.Nifti1Image)
    hu_all = np.asarray(ct_img.dataobj).astype(np.int16)
    seg_img = nib.load(str(REF / "example_seg_fast_force_split.nii.gz"))
    assert isinstance(seg_img, nib.Nifti1Image)
    ref_all = totalseg_to_atlas(np.asarray(seg_img.dataobj))
    state = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    repo = SqliteLabelRepository(state / "labels.sqlite3")
    blobs = LocalBlobStore(state / "blobs")
    writer = LabelWriter(repo, blobs)
    cases = {}
    for cid, (x0, y0, z0) in BOXES.items():
        box = np.s_[x0 : x0 + 64, y0 : y0 + 64, z0 : z0 + 64]
        aff = np.asarray(ct_img.affine, dtype=np.float64).copy()
        aff[:3, 3] = aff[:3, :3] @ np.array([x0, y0, z0]) + aff[:3, 3]
        ct_digest = blobs.put(to_nifti_bytes(hu_all[box], aff)).digest
        cases[cid] = (hu_all[box], aff, ref_all[box], ct_digest)
    voxel_ml = float(abs(np.linalg.det(np.asarray(ct_img.affine)[:3, :3]))) / 1000.0

    def infer(version_ens_path: str) -> tuple[str, dict[str, np.ndarray]]:
        pipeline = EnsemblePipeline(version_ens_path)
        name = pipeline.config.version
        stats = {}
        for cid, (hu, aff, _, ct_digest) in cases.items():
            out = pipeline(hu, aff)
            lm = blobs.put(to_nifti_bytes(out.labels, aff)).digest
            writer.create(
                cid, lm, ct_digest, Provenance("ai", model_version=name, weights_trained=True), uuid.uuid4().hex
            )
            stats[cid] = out.organ_stats
        return name, stats

    t = time.perf_counter()
    name, stats = infer("abdomen-trio-v1")
    t_infer0 = time.perf_counter() - t
    for cid in HOLDOUT:  # the gate's cases: every present organ decided
        _, aff, ref, _ = cases[cid]
        for organ in ORGANS:
            head = repo.head(cid)
            assert head is not None
            digest = blobs.put(to_nifti_bytes((ref == organ).astype(np.uint8), aff)).digest
            writer.revise(cid, head.version_id, [MaskRevision(organ, mask_digest=digest)], uuid.uuid4().hex, "sim-rad")
    members = tuple(m for m in args.members.split(",") if m)
    hp = Hyperparameters(
        steps=args.steps, checkpoint_every=max(1, args.steps), crop_size=(32, 32, 32), lr=1e-3, members=members
    )
    revised_kinds: set[int] = set()
    rows = []
    print(f"state {state}; round-0 inference {t_infer0:.1f} s; voxel {voxel_ml * 1000:.0f} mm3", flush=True)
    header = "round model_version promoted revised_dice other_dice attention_ml cases_to_review revise_s train_s evaluate_s reinfer_s"
    print(header, flush=True)
    for rnd in range(1, args.rounds + 1):
        t = time.perf_counter()
        # the radiologist revises the highest-attention undecided organs of train cases
        candidates = []
        for cid, st in stats.items():
            if cid in HOLDOUT:
                continue
            head = repo.head(cid)
            assert head is not None
            for organ in ORGANS:
                if head.organ_provenance[organ].provenance.source == "ai":
                    candidates.append((float(st[organ - 1, 1]), cid, organ))
        for _, cid, organ in sorted(candidates, reverse=True)[: args.revise]:
            _, aff, ref, _ = cases[cid]
            head = repo.head(cid)
            assert head is not None
            digest = blobs.put(to_nifti_bytes((ref == organ).astype(np.uint8), aff)).digest
            writer.revise(cid, head.version_id, [MaskRevision(organ, mask_digest=digest)], uuid.uuid4().hex, "sim-rad")
            revised_kinds.add(organ)
        t_revise = time.perf_counter() - t
        result = run_round(repo, blobs, state, hp, seed=rnd, holdout_cases=HOLDOUT, n_boot=500)
        t = time.perf_counter()
        current = current_ensemble(state)
        name, stats = infer(str(current.source))
        t_reinfer = time.perf_counter() - t
        # held-out Dice of the current ensemble (evaluate() already ran it; recompute per organ kind)
        cur = np.array(result.holdout_dice["candidate" if result.promoted else "current"], dtype=float)
        cur[cur < 0] = np.nan
        kinds = [o - 1 for o in ORGANS if o in revised_kinds]
        others = [o - 1 for o in ORGANS if o not in revised_kinds]
        revised = float(np.nanmean(cur[:, kinds])) if kinds else float("nan")
        other = float(np.nanmean(cur[:, others])) if others else float("nan")
        attention = float(sum(st[:, 1].sum() for cid, st in stats.items() if cid not in HOLDOUT))
        to_review = sum(1 for cid, st in stats.items() if cid not in HOLDOUT and st[:, 1].sum() > args.threshold_ml)
        row: dict[str, Any] = {
            "round": rnd,
            "model_version": name,
            "promoted": result.promoted,
            "gate_reason": result.gate.reason if result.gate else "",
            "revised_dice": round(revised, 4),
            "other_dice": round(other, 4),
            "attention_ml": round(attention, 2),
            "cases_to_review": to_review,
            "seconds": {
                "revise": round(t_revise, 2),
                **{k: round(v, 2) for k, v in result.seconds.items()},
                "reinfer": round(t_reinfer, 2),
            },
        }
        rows.append(row)
        s: dict[str, float] = row["seconds"]
        print(
            f"{rnd} {name} {result.promoted} {revised:.3f} {other:.3f} {attention:.1f} {to_review} "
            f"{s['revise']:.1f} {s['finetune']:.1f} {s['evaluate']:.1f} {s['reinfer']:.1f}  ({row['gate_reason'][:80]})",
            flush=True,
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rounds.json").write_text(json.dumps(rows, indent=2) + "\n")

    return 0


if __name__ == "__main__":
    sys.exit(main())
