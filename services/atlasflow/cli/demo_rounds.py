"""`atlasflow demo --rounds N`: the active-learning loop through the services of the demo's stack.

Round 0 is the demo itself (the bundled CT: ingest -> segmentation -> ranking). Then the loop's
cases, the 64^3 boxes of the same CT (`atlasflow.cli.rounds.BOXES`), are sent as their own
DICOM series by C-STORE and follow the same path. The two held-out boxes are decided in full by
the simulated radiologist (every organ set to the reference labels: the gate's cases); round 0's
row measures the served ensemble's Dice on them before that.

Each round r = 1..N, every step a public gRPC call of the stack:

1. **review**: the operator (admin) starts a ranking round; the simulated radiologist
   ``dr.loop`` (a ``reviewer`` token of the stack's issuer) takes the top-ranked pending case(s)
   of the worklist with a lease (LeaseCase), replaces the top-listed organs with the reference
   labels (ReviseLabels with whole masks put in the stack's blob store, as ``atlasflow review
   --revise`` does) and completes the review (REVISED);
2. **train**: the operator starts a training run (StartTrainingRun: a small CPU step budget, the
   held-out boxes named) and follows it until it ends (GetTrainingRun): manifest, fine-tune,
   version, held-out evaluation and gate, promotion, roll-out as the training service does them;
3. **roll-out / reinfer / rank**: a promoted version is rolled out by the training service (the
   stack's ROLLOUT mode: segmentation activates it without a restart and re-segments the cases
   with undecided organs, highest-ranked first; with ``pointer`` only ``versions/CURRENT``
   moves and the served labels stay); the run ends after that re-inference (``reinfer`` counts).
   The demo reads the re-inference seconds from the promoted version's segmentation jobs, then
   waits until ranking holds every case's newest label version;
4. **measure**: a row of ``OUT/rounds.json`` (written atomically after each round): the current
   model version, whether the candidate was promoted and the gate's reason, the held-out Dice of
   the current model from the run's gate (organ kinds revised so far / the others), attention
   volume and cases above the review threshold from ranking's worklist, seconds per stage.

Reference labels: TotalSegmentator ``--fast`` labels of the CT (model output, not manual), the
demo weights were trained on this very CT: the figures show the loop's plumbing, not the paper's
effect (docs/training.md).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import grpc
import nibabel as nib
import numpy as np

from atlasflow.cli import rounds as measure
from atlasflow.cli.demo_series import write_demo_series
from atlasflow.cli.local import LocalDeployment
from atlasflow.cli.review import head_version, submit_review
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGANS
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from atlasflow.training.v1 import training_pb2, training_pb2_grpc

REVIEWER = "dr.loop"
DONE = {common_pb2.OPERATION_STATE_SUCCEEDED, common_pb2.OPERATION_STATE_FAILED, common_pb2.OPERATION_STATE_CANCELLED}
STAGES = ("review", "train", "gate", "rollout", "reinfer", "rank")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _poll(
    fetch: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float, what: str, every: float = 0.5
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout_s:.0f} s")
        time.sleep(every)


class LoopStack:
    """The demo stack's stubs: the operator (admin) and the simulated radiologist (reviewer)."""

    def __init__(self, dep: LocalDeployment) -> None:
        self.dep = dep
        admin = dep.token_source("admin", "demo-operator")
        reviewer = dep.token_source("reviewer", REVIEWER)
        self.ingest = ingest_pb2_grpc.IngestServiceStub(dep.channel("ingest", token=admin))
        self.seg = segmentation_pb2_grpc.SegmentationServiceStub(dep.channel("segmentation", token=admin))
        self.labels = labels_pb2_grpc.LabelServiceStub(dep.channel("labels", token=admin))
        self.ranking = ranking_pb2_grpc.RankingServiceStub(dep.channel("ranking", token=admin))
        self.training = training_pb2_grpc.TrainingServiceStub(dep.channel("training", token=admin))
        self.rev_labels = labels_pb2_grpc.LabelServiceStub(dep.channel("labels", token=reviewer))
        self.rev_ranking = ranking_pb2_grpc.RankingServiceStub(dep.channel("ranking", token=reviewer))
        self.blobs = LocalBlobStore(dep.blob_dir)  # embedded deployment: the stack's blob store

    def worklist(self) -> list[ranking_pb2.WorklistItem]:
        items: list[ranking_pb2.WorklistItem] = []
        token = ""
        while True:
            resp = self.ranking.ListWorklist(
                ranking_pb2.ListWorklistRequest(page_size=100, page_token=token), timeout=60
            )
            items.extend(resp.items)
            token = resp.next_page_token
            if not token:
                return items

    def ranked_heads(self, case_ids: list[str]) -> bool:
        """Whether ranking holds every case's newest label version."""
        for case_id in case_ids:
            head = head_version(self.labels, case_id)
            try:
                item = self.ranking.GetWorklistItem(
                    ranking_pb2.GetWorklistItemRequest(case_id=case_id), timeout=30
                ).item
            except grpc.RpcError:
                return False
            if item.label_version_id != head.version_id:
                return False
        return True


class Reference:
    """The reference label map of the bundled CT, sampled on a case's grid."""

    def __init__(self, path: Path = measure.REFERENCE_LABELS) -> None:
        self.labels, self.affine = measure.load_volume(path)

    def on(self, geometry: common_pb2.VolumeGeometry) -> np.ndarray:
        affine = np.asarray(geometry.affine, dtype=np.float64).reshape(4, 4)
        return measure.reference_on_grid(self.labels, self.affine, list(geometry.shape), affine)


def _centre(shape: Any, affine: np.ndarray) -> np.ndarray:
    return (np.asarray(affine) @ np.append((np.asarray(shape, dtype=np.float64) - 1) / 2, 1.0))[:3]


def send_boxes(stack: LoopStack, ct_path: Path, work: Path, timeout_s: float = 900.0) -> dict[str, str]:
    """Send the boxes of the CT as DICOM series (one study each), commit them, wait until each
    is segmented and ranked; returns box name -> case id (matched by the assembled volume's
    centre in patient space)."""
    from atlasflow.cli.demo import send_cstore

    hu, affine = measure.load_volume(ct_path)
    files: list[Path] = []
    centres: dict[str, np.ndarray] = {}
    for name, origin in measure.BOXES.items():
        box, box_affine = measure.crop_box(hu, affine, origin)
        nifti = work / "boxes" / f"{name}.nii.gz"
        nifti.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(box.astype(np.int16), box_affine), str(nifti))
        files += write_demo_series(nifti, work / "boxes" / name, seed_name=f"atlasflow-demo-loop/{name}")
        centres[name] = _centre(box.shape, box_affine)
    send_cstore(files, stack.dep.ports["dicom"], "ATLASFLOW")
    say(f"loop cases: sent {len(measure.BOXES)} boxes of the CT ({len(files)} instances) by C-STORE")
    cases: dict[str, str] = {}
    committed: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(cases) < len(measure.BOXES):
        if time.monotonic() > deadline:
            raise TimeoutError(f"loop cases: {len(cases)} of {len(measure.BOXES)} assembled in time")
        for s in stack.ingest.ListSeries(ingest_pb2.ListSeriesRequest(page_size=100), timeout=60).series:
            if s.state == ingest_pb2.SERIES_STATE_RECEIVING and s.series_id not in committed:
                stack.ingest.CommitSeries(ingest_pb2.CommitSeriesRequest(series_id=s.series_id), timeout=300)
                committed.add(s.series_id)
            if s.state == ingest_pb2.SERIES_STATE_FAILED:
                raise RuntimeError(f"series assembly failed: {s.failure_reason}")
            if not s.HasField("geometry") or s.case_id in cases.values():
                continue
            centre = _centre(list(s.geometry.shape), np.asarray(s.geometry.affine, dtype=np.float64).reshape(4, 4))
            for name, want in centres.items():
                if (
                    name not in cases
                    and tuple(s.geometry.shape) == (measure.BOX,) * 3
                    and np.allclose(centre, want, atol=0.5)
                ):
                    cases[name] = s.case_id
        time.sleep(0.5)
    ids = list(cases.values())

    def ready() -> bool:
        for case_id in ids:
            jobs = stack.seg.ListSegmentationJobs(
                segmentation_pb2.ListSegmentationJobsRequest(case_id=case_id), timeout=60
            ).jobs
            if any(j.state == common_pb2.OPERATION_STATE_FAILED for j in jobs):
                raise RuntimeError(f"segmentation of {case_id} failed: {jobs[0].error_reason}")
        return (
            stack.ranked_heads(ids)
            if all(
                stack.labels.ListLabelVersions(
                    labels_pb2.ListLabelVersionsRequest(case_id=c, page_size=1), timeout=60
                ).versions
                for c in ids
            )
            else False
        )

    _poll(ready, bool, max(1.0, deadline - time.monotonic()), "loop cases: segmentation and ranking", every=1.0)
    return cases


def holdout_dice(stack: LoopStack, ref: Reference, case_ids: list[str]) -> dict[int, float]:
    """Per organ, the mean Dice of the served AI labels on the held-out cases (round 0)."""
    rows = []
    for case_id in case_ids:
        head = head_version(stack.labels, case_id)
        labels, _ = from_nifti_bytes(stack.blobs.get(head.label_map.digest))
        # every organ, absent ones included: the gate's Dice on these cases counts all nine
        rows.append(measure.organ_dice(labels, ref.on(head.geometry), ORGANS))
    return measure.mean_per_organ(rows)


def revise(
    stack: LoopStack, ref: Reference, case_id: str, organs: list[int], request_id: str
) -> labels_pb2.LabelVersion:
    """dr.loop leases ``case_id``, replaces ``organs`` with the reference, completes the review."""
    stack.rev_ranking.LeaseCase(ranking_pb2.LeaseCaseRequest(case_id=case_id), timeout=30)
    head = head_version(stack.rev_labels, case_id)
    reference = ref.on(head.geometry)
    affine = np.asarray(head.geometry.affine, dtype=np.float64).reshape(4, 4)
    masks = {}
    for organ in organs:
        info = stack.blobs.put(to_nifti_bytes((reference == organ).astype(np.uint8), affine))
        masks[organ] = common_pb2.BlobRef(digest=info.digest, size_bytes=info.size_bytes)
    version, _ = submit_review(
        stack.rev_labels,
        stack.rev_ranking,
        head,
        masks=masks,
        outcome=ranking_pb2.REVIEW_OUTCOME_REVISED,
        request_id=request_id,
    )
    return version


def follow_run(stack: LoopStack, run_id: str, timeout_s: float) -> training_pb2.TrainingRun:
    last = [""]

    def fetch() -> training_pb2.TrainingRun:
        run = stack.training.GetTrainingRun(training_pb2.GetTrainingRunRequest(run_id=run_id), timeout=30).run
        stage = training_pb2.TrainingStage.Name(run.progress.stage).removeprefix("TRAINING_STAGE_").lower()
        if stage != last[0] and stage != "unspecified":
            say(f"  training run {run_id[:12]}: {stage} ({run.progress.fraction:.0%})")
            last[0] = stage
        return run

    return cast(training_pb2.TrainingRun, _poll(fetch, lambda r: r.state in DONE, timeout_s, "training run", every=1.0))


def reinfer_seconds(
    stack: LoopStack, run: training_pb2.TrainingRun, case_ids: list[str], timeout_s: float
) -> float | None:
    """The re-inference a promoted run started: its segmentation jobs (ensemble version = the
    promoted version) on ``case_ids``; waits until they are done (the training service follows
    them before the run ends: this returns at once then) and returns the seconds from the first
    job's creation to the last one's end. None when there is none (not promoted, or a roll-out
    that re-infers nothing, e.g. ``pointer``)."""
    if not run.promoted:
        return None

    def jobs() -> list[segmentation_pb2.SegmentationJob]:
        out = []
        for case_id in case_ids:
            out += [
                j
                for j in stack.seg.ListSegmentationJobs(
                    segmentation_pb2.ListSegmentationJobsRequest(case_id=case_id), timeout=60
                ).jobs
                if j.ensemble_version == run.version
            ]
        return out

    found = _poll(jobs, lambda js: all(j.state in DONE for j in js), timeout_s, "re-inference", every=1.0)
    if not found:
        return None
    first = min(j.create_time.ToDatetime() for j in found)
    last = max(j.update_time.ToDatetime() for j in found)
    return (last - first).total_seconds()


def run_rounds(
    dep: LocalDeployment,
    out: Path,
    rounds: int,
    *,
    first_case: str,
    ct_path: Path = measure.EXAMPLE_CT,
    steps: int = 4,
    cases_per_round: int = 1,
    organs_per_case: int = 3,
    threshold_ml: float = 1.0,
    timeout_s: float = 1800.0,
) -> list[dict[str, Any]]:
    """Round 0's row, then ``rounds`` rounds (module docstring); returns the rows, also in
    ``out/rounds.json``."""
    stack = LoopStack(dep)
    ref = Reference()
    path = out / "rounds.json"
    rows: list[dict[str, Any]] = []
    tag = uuid.uuid4().hex[:8]
    t = time.monotonic()
    boxes = send_boxes(stack, ct_path, out / "loop")
    holdout = [boxes[name] for name in measure.HOLDOUT]
    train_cases = [first_case] + [c for name, c in boxes.items() if name not in measure.HOLDOUT]
    t_cases = time.monotonic() - t
    job = stack.seg.ListSegmentationJobs(
        segmentation_pb2.ListSegmentationJobsRequest(case_id=first_case), timeout=60
    ).jobs[0]
    model_version = job.ensemble_version
    # round 0: the served ensemble on the held-out cases before anyone decided them
    base = holdout_dice(stack, ref, holdout)
    _, other = measure.split_dice(base, set())

    def attention() -> tuple[float, int]:
        # attention left: the organs no human has decided yet, of the training-side cases
        per_case = {
            i.case_id: [o.attention_ml for o in i.organs if o.organ not in i.human_decided_organs]
            for i in stack.worklist()
            if i.case_id not in holdout
        }
        return measure.attention_summary(per_case, threshold_ml)

    total, to_review = attention()
    rows.append(
        measure.round_row(
            round_number=0,
            model_version=model_version,
            promoted=False,
            gate_reason="",
            revised_dice=math.nan,
            other_dice=other,
            attention_ml=total,
            cases_to_review=to_review,
            seconds={"cases": time.monotonic() - t},
            holdout_cases=holdout,
            train_cases=train_cases,
        )
    )
    measure.write_rounds(path, rows)
    say(
        f"round 0: {len(boxes)} loop cases segmented and ranked in {t_cases:.1f} s; held-out Dice "
        f"of {model_version}: {other:.3f}; attention {total:.1f} ml over {len(train_cases)} cases"
    )
    # the gate's cases: every organ decided by the radiologist
    for case_id in holdout:
        revise(stack, ref, case_id, list(ORGANS), f"demo-loop-{tag}-holdout-{case_id}")
    say(f"held-out cases {', '.join(holdout)}: every organ decided by {REVIEWER} (the gate's cases)")
    revised_kinds: set[int] = set()
    for rnd in range(1, rounds + 1):
        seconds: dict[str, float | None] = dict.fromkeys(STAGES)
        t = time.monotonic()
        stack.ranking.StartRound(
            ranking_pb2.StartRoundRequest(budget_fraction=1.0, request_id=f"demo-loop-{tag}-{rnd}"), timeout=60
        )
        pending = [
            i
            for i in stack.worklist()
            if i.status == ranking_pb2.WORKLIST_STATUS_PENDING and i.case_id not in holdout and i.organs
        ][:cases_per_round]
        revised = []
        for item in pending:
            organs = [int(o.organ) for o in item.organs[:organs_per_case]]
            revise(stack, ref, item.case_id, organs, f"demo-loop-{tag}-{rnd}-{item.case_id}")
            revised += [(item.case_id, ORGANS[o]) for o in organs]
            revised_kinds.update(organs)
        seconds["review"] = time.monotonic() - t
        if not revised:
            say(f"round {rnd}: no pending case left to review; the loop stops")
            break
        say(f"round {rnd}: {REVIEWER} revised {', '.join(f'{c[:13]} {o}' for c, o in revised)} (reference labels)")
        t = time.monotonic()
        run = stack.training.StartTrainingRun(
            training_pb2.StartTrainingRunRequest(
                hyperparameters=training_pb2.Hyperparameters(
                    steps=steps, checkpoint_every=steps, crop_size=[32, 32, 32], members=["unet"]
                ),
                seed=rnd,
                holdout_case_ids=holdout,
                request_id=f"demo-loop-{tag}-train-{rnd}",
            ),
            timeout=60,
        ).run
        run = follow_run(stack, run.run_id, timeout_s)
        if run.state != common_pb2.OPERATION_STATE_SUCCEEDED:
            raise RuntimeError(
                f"training run {run.run_id} ended {common_pb2.OperationState.Name(run.state)}: {run.error_reason}"
            )
        st = dict(run.stage_seconds)
        seconds["train"] = sum(st.get(k, 0.0) for k in ("manifest", "finetune", "version"))
        seconds["gate"] = sum(st.get(k, 0.0) for k in ("evaluate", "gate"))
        # the run's "rollout" stage is the roll-out and the re-inference it follows; the jobs'
        # own times tell the re-inference apart
        seconds["reinfer"] = reinfer_seconds(stack, run, train_cases, timeout_s)
        rollout_s = st.get("rollout")
        seconds["rollout"] = None if rollout_s is None else max(0.0, rollout_s - (seconds["reinfer"] or 0.0))
        t = time.monotonic()
        _poll(lambda: stack.ranked_heads(train_cases), bool, timeout_s, "ranking of the new label versions")
        seconds["rank"] = time.monotonic() - t
        if run.promoted:
            model_version = run.version
        per_organ = {int(o.organ): (o.candidate if run.promoted else o.current) for o in run.gate.organs if o.cases > 0}
        revised_dice, other = measure.split_dice(per_organ, revised_kinds)
        total, to_review = attention()
        rows.append(
            measure.round_row(
                round_number=rnd,
                model_version=model_version,
                promoted=run.promoted,
                gate_reason=run.gate.reason,
                revised_dice=revised_dice,
                other_dice=other,
                attention_ml=total,
                cases_to_review=to_review,
                seconds=seconds,
                run_id=run.run_id,
                candidate=run.version,
                rollout=run.rollout,
                reinfer=(
                    {
                        "cases_queued": run.reinfer.cases_queued,
                        "cases_done": run.reinfer.cases_done,
                        "cases_failed": run.reinfer.cases_failed,
                    }
                    if run.HasField("reinfer")
                    else None
                ),
                revised=[[c, o] for c, o in revised],
            )
        )
        measure.write_rounds(path, rows)
        say(
            f"round {rnd}: candidate {run.version} {'promoted' if run.promoted else 'not promoted'} "
            f"({run.gate.reason[:100]}); revised Dice {revised_dice:.3f}, other {other:.3f}, "
            f"attention {total:.1f} ml, {to_review} case(s) to review"
        )
        if run.promoted:
            say(
                f"round {rnd}: roll-out {run.rollout or '-'}; re-inferred {run.reinfer.cases_done} of "
                f"{run.reinfer.cases_queued} undecided case(s)"
            )
    print(f"\nThe loop through the services ({path}):")
    print(measure.format_table(rows, ["cases", *STAGES]))
    print()
    return rows
