"""Rounds of the active-learning loop on the bundled example CT, with a simulated radiologist.

Cases are 64^3-voxel boxes of the bundled example CT (`atlasflow.cli.rounds.BOXES`, 3 mm;
reference = its TotalSegmentator `--fast` labels mapped to the nine AbdomenAtlas organs,
`rounds.REFERENCE_LABELS`: model output, not manual). Round 0: the current ensemble labels every case (AI versions in a real SQLite labels
store); the held-out cases get every present organ decided by the radiologist (reference).
Each round: the radiologist revises the ``--revise`` train-case organs with the highest
attention (the pipeline's per-organ ``attention_ml``, i.e. the ranking's signal, not the
ranking service) using the reference; then one training round (`atlasflow.training.worker.
run_round`: manifest, fine-tune, version, held-out gate, promotion); then the promoted ensemble
re-infers the train cases (human organs are kept by label assembly) and the table row is
printed:

    round, model_version, promoted, revised_dice (held-out cases, per-organ mean Dice over the
    organ kinds revised so far), other_dice (held-out, the other organs), attention_ml (sum over
    train cases), cases_to_review (train cases with attention_ml > --threshold-ml), seconds per
    stage.

The measuring code (boxes, reference, Dice split, attention, rows, rounds.json, table) is
`atlasflow.cli.rounds`, shared with `atlasflow demo --rounds N`, which runs the same loop
through the services of the demo's stack. CPU-sized defaults: a few fine-tune steps on 32^3
crops; the figures show the loop's plumbing, not what a real epoch budget gives. ``--out DIR``
writes DIR/rounds.json (after each round).

    .venv/bin/python benchmarks/bench_loop.py --rounds 2 --steps 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from atlasflow.cli import rounds as measure
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.organs import ORGANS
from atlasflow.labels.repository import Provenance
from atlasflow.labels.sqlite import SqliteLabelRepository
from atlasflow.labels.writer import LabelWriter, MaskRevision
from atlasflow.segmentation.pipeline import EnsemblePipeline
from atlasflow.training.finetune import Hyperparameters
from atlasflow.training.versions import current_ensemble
from atlasflow.training.worker import run_round

HOLDOUT = set(measure.HOLDOUT)
ORGANS_BY_NAME = {name: organ for organ, name in ORGANS.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--revise", type=int, default=3, help="organs revised per round")
    ap.add_argument("--members", default="unet", help="comma-separated members to fine-tune ('' = all)")
    ap.add_argument("--threshold-ml", type=float, default=1.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    hu_all, ct_affine = measure.load_volume(measure.EXAMPLE_CT)
    ref_all, _ = measure.load_volume(measure.REFERENCE_LABELS)
    state = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    repo = SqliteLabelRepository(state / "labels.sqlite3")
    blobs = LocalBlobStore(state / "blobs")
    writer = LabelWriter(repo, blobs)
    cases = {}
    for cid, origin in measure.BOXES.items():
        hu, aff = measure.crop_box(hu_all.astype(np.int16), ct_affine, origin)
        ref, _ = measure.crop_box(ref_all, ct_affine, origin)
        ct_digest = blobs.put(to_nifti_bytes(hu, aff)).digest
        cases[cid] = (hu, aff, ref, ct_digest)
    voxel_ml = float(abs(np.linalg.det(ct_affine[:3, :3]))) / 1000.0

    holdout_dice0: dict[str, dict[int, float]] = {}

    def infer(version_ens_path: str) -> tuple[str, dict[str, np.ndarray]]:
        pipeline = EnsemblePipeline(version_ens_path)
        name = pipeline.config.version
        stats = {}
        for cid, (hu, aff, ref, ct_digest) in cases.items():
            out = pipeline(hu, aff)
            lm = blobs.put(to_nifti_bytes(out.labels, aff)).digest
            writer.create(
                cid, lm, ct_digest, Provenance("ai", model_version=name, weights_trained=True), uuid.uuid4().hex
            )
            stats[cid] = out.organ_stats
            if cid in HOLDOUT and not holdout_dice0.get(cid):  # round 0, before the radiologist decides them
                holdout_dice0[cid] = measure.organ_dice(out.labels, ref, ORGANS)
        return name, stats

    def undecided_attention(stats: dict[str, np.ndarray]) -> dict[str, list[float]]:
        """Per train case, the attention ml of the organs no human decided (what is left to review)."""
        out = {}
        for cid, st in stats.items():
            head = repo.head(cid)
            if cid in HOLDOUT or head is None:
                continue
            out[cid] = [float(st[o - 1, 1]) for o in ORGANS if head.organ_provenance[o].provenance.source == "ai"]
        return out

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
    print(f"state {state}; round-0 inference {t_infer0:.1f} s; voxel {voxel_ml * 1000:.0f} mm3", flush=True)
    _, other0 = measure.split_dice(measure.mean_per_organ(holdout_dice0.values()), set())
    attention0, to_review0 = measure.attention_summary(undecided_attention(stats), args.threshold_ml)
    rows: list[dict[str, Any]] = [
        measure.round_row(
            round_number=0,
            model_version=name,
            promoted=False,
            gate_reason="",
            revised_dice=float("nan"),
            other_dice=other0,
            attention_ml=attention0,
            cases_to_review=to_review0,
            seconds={"reinfer": t_infer0},
        )
    ]
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
        for cid, organ in measure.pick_revisions(candidates, args.revise):
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
        # held-out Dice of the current ensemble, per organ (the gate's means over held-out cases)
        gate_organs = result.gate.organs if result.gate else []
        per_organ = {
            ORGANS_BY_NAME[o.organ]: (o.candidate_mean if result.promoted else o.current_mean) for o in gate_organs
        }
        revised, other = measure.split_dice(per_organ, revised_kinds)
        attention, to_review = measure.attention_summary(undecided_attention(stats), args.threshold_ml)
        rows.append(
            measure.round_row(
                round_number=rnd,
                model_version=name,
                promoted=result.promoted,
                gate_reason=result.gate.reason if result.gate else "",
                revised_dice=revised,
                other_dice=other,
                attention_ml=attention,
                cases_to_review=to_review,
                seconds={"revise": t_revise, **result.seconds, "reinfer": t_reinfer},
            )
        )
        print(measure.format_table(rows[-1:]), flush=True)
        if args.out:
            measure.write_rounds(args.out / "rounds.json", rows)
    print()
    print(measure.format_table(rows, ["revise", "manifest", "finetune", "version", "evaluate", "reinfer"]), flush=True)

    return 0


if __name__ == "__main__":
    sys.exit(main())
