"""`atlasflow demo`: the whole pipeline on the bundled CT, on the embedded defaults.

Starts Triton (PyTriton, CPU) and the four services, writes the bundled CT as a DICOM series,
sends it over DICOM C-STORE (dcmtk `storescu` with TCP_NODELAY when installed, else
pynetdicom), follows the study through ingest -> segmentation -> labels + ranking, prints the
ranked worklist, exports the dataset in the AbdomenAtlas layout, draws a PNG montage, and
shuts everything down. Everything it talks to is a public gRPC API, except the montage, which
reads the heatmap blob from the local blob directory (embedded deployment).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc

from atlasflow.cli.demo_series import DEFAULT_DEMO_NIFTI, write_demo_series
from atlasflow.cli.local import LocalDeployment
from atlasflow.cli.review import submit_review
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.organs import ORGANS
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc

DEMO_CT = DEFAULT_DEMO_NIFTI
SERIES_STATE = {v: k.removeprefix("SERIES_STATE_") for k, v in ingest_pb2.SeriesState.items()}
OP_STATE = {v: k.removeprefix("OPERATION_STATE_") for k, v in common_pb2.OperationState.items()}
STAGE = {v: k.removeprefix("JOB_STAGE_") for k, v in segmentation_pb2.JobStage.items()}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def send_cstore(files: list[Path], port: int, ae_title: str) -> None:
    """Send with dcmtk's storescu (TCP_NODELAY=1, DESIGN.md), or pynetdicom if it is absent."""
    storescu = shutil.which("storescu")
    if storescu:
        env = dict(os.environ, TCP_NODELAY="1")
        subprocess.run(
            [storescu, "-aet", "ATLASDEMO", "-aec", ae_title, "127.0.0.1", str(port), *map(str, files)],
            check=True,
            env=env,
        )
        return
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # generated at import time: invisible to mypy

    ae = AE(ae_title="ATLASDEMO")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise RuntimeError("association with the ingest SCP was rejected")
    try:
        for f in files:
            status = assoc.send_c_store(dcmread(f))
            if getattr(status, "Status", 0xFFFF) != 0:
                raise RuntimeError(f"C-STORE failed with status 0x{status.Status:04X}")
    finally:
        assoc.release()


def _operator(dep: LocalDeployment, service: str) -> grpc.Channel:
    """A channel to ``service`` as the demo's operator (role admin: follows the study, starts the
    round, exports), with a token of the stack's own issuer."""
    return dep.channel(service, token=dep.token_source("admin", "demo-operator"))


def _as_reviewer(dep: LocalDeployment, service: str, subject: str) -> grpc.Channel:
    return dep.channel(service, token=dep.token_source("reviewer", subject))


def wait_for_pipeline(dep: LocalDeployment, timeout_s: float = 600.0) -> tuple[str, str]:
    """Follow the study; return (case_id, segmentation job id)."""
    ingest = ingest_pb2_grpc.IngestServiceStub(_operator(dep, "ingest"))
    seg = segmentation_pb2_grpc.SegmentationServiceStub(_operator(dep, "segmentation"))
    labels = labels_pb2_grpc.LabelServiceStub(_operator(dep, "labels"))
    ranking = ranking_pb2_grpc.RankingServiceStub(_operator(dep, "ranking"))
    deadline = time.monotonic() + timeout_s
    last = ""
    committed = False
    while time.monotonic() < deadline:
        series = ingest.ListSeries(ingest_pb2.ListSeriesRequest()).series
        status = "waiting for the series"
        case_id = job_id = ""
        if series:
            s = series[0]
            case_id = s.case_id
            status = f"ingest: series {s.series_id} v{s.version} {SERIES_STATE[s.state]} ({s.instance_count} instances)"
            if s.state == ingest_pb2.SERIES_STATE_RECEIVING and not committed:
                ingest.CommitSeries(ingest_pb2.CommitSeriesRequest(series_id=s.series_id), timeout=300)
                committed = True
            if s.state == ingest_pb2.SERIES_STATE_FAILED:
                raise RuntimeError(f"series assembly failed: {s.failure_reason}")
            jobs = seg.ListSegmentationJobs(segmentation_pb2.ListSegmentationJobsRequest(case_id=s.case_id)).jobs
            if jobs:
                j = jobs[0]
                job_id = j.job_id
                status += f" | segmentation: {OP_STATE[j.state]} {STAGE[j.progress.stage]} {j.progress.fraction:.0%}"
                if j.state == common_pb2.OPERATION_STATE_FAILED:
                    raise RuntimeError(f"segmentation failed: {j.error_reason}")
                versions = labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=s.case_id)).versions
                try:
                    ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=s.case_id))
                    ranked = True
                except grpc.RpcError:
                    ranked = False
                status += f" | labels: {len(versions)} version(s) | ranking: {'ranked' if ranked else 'pending'}"
                if versions and ranked:
                    say(status)
                    return case_id, job_id
        if status != last:
            say(status)
            last = status
        time.sleep(0.5)
    raise TimeoutError("the pipeline did not finish in time")


def print_worklist(dep: LocalDeployment) -> list[ranking_pb2.WorklistItem]:
    ranking = ranking_pb2_grpc.RankingServiceStub(_operator(dep, "ranking"))
    resp = ranking.ListWorklist(ranking_pb2.ListWorklistRequest(page_size=20))
    print(
        f"\nRanked worklist ({resp.total_size} case(s); priority = attention ml + plausibility "
        "penalties over the organs the source did not label):"
    )
    print(f"{'rank':>4}  {'case':28s} {'priority':>9}  organs to review first (heatmap ml)")
    for item in resp.items:
        top = ", ".join(f"{ORGANS[o.organ]} {o.heatmap_ml:.1f}" for o in item.organs[:3])
        print(f"{item.rank:>4}  {item.case_id:28s} {item.priority:>9.1f}  {top}")
        for o in item.organs[:3]:
            where = ""
            if o.HasField("pointer"):
                where = f" [slices {o.pointer.slices.first}-{o.pointer.slices.last}]"
            if o.reasons:
                print(f"{'':45s}- {'; '.join(o.reasons[:2])}{where}")
    print()
    return list(resp.items)


def review_round(dep: LocalDeployment, case_id: str, timeout_s: float = 60.0) -> None:
    """One review round by a SIMULATED radiologist ("dr.demo"): start a round (top 5 %), lease
    the next case, confirm its first-listed organ as drawn (ReviseLabels with an all-zero XOR
    delta: a human decision without changes), complete the review as REVISED, and wait until
    ranking has heard of the new label version (the confirmed organ leaves the priority)."""
    # the operator (admin) starts the round; dr.demo (reviewer) works it
    rnd = (
        ranking_pb2_grpc.RankingServiceStub(_operator(dep, "ranking"))
        .StartRound(ranking_pb2.StartRoundRequest(budget_fraction=0.05, request_id=f"demo-round-{case_id}"))
        .round
    )
    ranking = ranking_pb2_grpc.RankingServiceStub(_as_reviewer(dep, "ranking", "dr.demo"))
    labels = labels_pb2_grpc.LabelServiceStub(_as_reviewer(dep, "labels", "dr.demo"))
    item = ranking.LeaseNextCase(ranking_pb2.LeaseNextCaseRequest()).item
    if item.case_id != case_id or not item.organs:
        say(f"review round {rnd.round_number}: nothing to review")
        return
    before, organ = item.priority, item.organs[0].organ
    drawn = "as drawn" if item.organs[0].volume_ml > 0 else "as drawn (absent: the models' doubt is dismissed)"
    head = labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=case_id)).versions[0]
    # the code path of `atlasflow review CASE --accept ORGAN` (cli/review.py): a confirmation
    # (all-zero XOR delta) as a new version, then CompleteReview
    version, _ = submit_review(
        labels,
        ranking,
        head,
        accept=[organ],
        outcome=ranking_pb2.REVIEW_OUTCOME_REVISED,
        request_id=f"demo-review-{head.version_id}",
    )
    deadline = time.monotonic() + timeout_s
    while True:
        now = ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=case_id)).item
        if now.label_version_id == version.version_id or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    say(
        f"review round {rnd.round_number} ({rnd.case_count} of {rnd.candidate_count} case(s)): "
        f"dr.demo (simulated) leased the case and confirmed {ORGANS[organ]} {drawn} -> label "
        f"version {version.version_id[:12]} (radiologist provenance for {ORGANS[organ]})"
    )
    say(
        f"ranking heard of it: priority {before:.1f} -> {now.priority:.1f} "
        f"({ORGANS[organ]} decided by a human), status "
        f"{ranking_pb2.WorklistStatus.Name(now.status).removeprefix('WORKLIST_STATUS_')}"
    )


def export(dep: LocalDeployment, out: Path, timeout_s: float = 300.0) -> None:
    labels = labels_pb2_grpc.LabelServiceStub(_operator(dep, "labels"))
    job = labels.ExportDataset(
        labels_pb2.ExportDatasetRequest(destination_uri=out.resolve().as_uri(), include_dicom_seg=True)
    ).job
    deadline = time.monotonic() + timeout_s
    while job.state in (common_pb2.OPERATION_STATE_QUEUED, common_pb2.OPERATION_STATE_RUNNING):
        if time.monotonic() > deadline:
            raise TimeoutError("export did not finish in time")
        time.sleep(0.3)
        job = labels.GetExportJob(labels_pb2.GetExportJobRequest(job_id=job.job_id)).job
    if job.state != common_pb2.OPERATION_STATE_SUCCEEDED:
        raise RuntimeError(f"export failed: {job.error_reason}")
    say(f"export: {job.progress.cases_done}/{job.progress.cases_total} case(s) written to {out}")
    for seg in job.dicom_seg_outcomes:
        state = labels_pb2.DicomSegState.Name(seg.state).removeprefix("DICOM_SEG_STATE_")
        detail = (
            (f"{seg.path}, {len(seg.organs)} segment(s), {seg.referenced_instance_count} source instances referenced")
            if seg.path
            else seg.reason
        )
        say(f"DICOM SEG ({state}): {detail}")


def weights_note(dep: LocalDeployment, job_id: str) -> bool:
    """Say whether the segmentation ran trained weights (the job's result, as the service
    reports it: the CLI does not read the ensemble definition itself); returns that flag."""
    seg = segmentation_pb2_grpc.SegmentationServiceStub(_operator(dep, "segmentation"))
    job = seg.GetSegmentationJob(segmentation_pb2.GetSegmentationJobRequest(job_id=job_id)).job
    trained = bool(job.result.weights_trained)
    if trained:
        say(
            "NOTE: DEMO-ONLY weights, trained on this very CT (services/atlasflow/segmentation/weights/"
            "README.md): the labels look right here and do not generalise to other scans."
        )
    else:
        say(
            "NOTE: the ensemble runs UNTRAINED (randomly initialised) weights: the labels "
            "and the attention map show the plumbing, not anatomy."
        )
    return trained


def run_demo(out: Path, *, keep_running: bool = False, rounds: int = 0, steps: int = 4) -> int:
    """The demo; with ``rounds`` > 0, then that many rounds of the loop through the services
    (`atlasflow.cli.demo_rounds`: ``out/rounds.json``, ``steps`` fine-tune steps per round)."""
    from atlasflow.cli.montage import render_montage

    t_start = time.monotonic()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    say(
        "atlasflow demo: bundled abdominal CT -> DICOM C-STORE -> ingest -> segmentation "
        "(Triton) -> labels + ranking -> export"
    )
    state_dir = out / "state"
    if state_dir.exists():
        shutil.rmtree(state_dir)
    dep = LocalDeployment.create(state_dir, auto_ports=True, quiet_period_s=30.0, export_root=out)
    try:
        say("starting Triton (PyTriton, CPU) and the services ...")
        dep.start()
        dep.wait_healthy(300)
        say(f"all services healthy ({time.monotonic() - t_start:.1f} s); logs in {state_dir / 'logs'}")
        files = write_demo_series(DEMO_CT, out / "dicom")
        t_send = time.monotonic()
        send_cstore(files, dep.ports["dicom"], "ATLASFLOW")
        say(f"sent {len(files)} CT instances by C-STORE in {time.monotonic() - t_send:.2f} s")
        case_id, job_id = wait_for_pipeline(dep)
        trained = weights_note(dep, job_id)
        print_worklist(dep)
        review_round(dep, case_id)
        export_dir = out / "export"
        export(dep, export_dir)
        item = (
            ranking_pb2_grpc.RankingServiceStub(_operator(dep, "ranking"))
            .GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=case_id))
            .item
        )
        # the export is de-identified: its case folder is the case's pseudonym (the manifest's only case)
        case_dir = export_dir / json.loads((export_dir / "manifest.json").read_text())["cases"][0]["case"]
        ct, affine = from_nifti_bytes((case_dir / "ct.nii.gz").read_bytes())
        labels, _ = from_nifti_bytes((case_dir / "combined_labels.nii.gz").read_bytes())
        heat, _ = from_nifti_bytes(LocalBlobStore(dep.blob_dir).get(item.heatmap.digest))
        title = f"atlasflow demo - case {case_id}" + (" - DEMO-ONLY weights" if trained else " - UNTRAINED models")
        png = render_montage(ct, labels, heat, affine, out / "montage.png", title=title)
        say(f"montage: {png}")
        say(
            f"dataset: {case_dir} (de-identified; ct.nii.gz, combined_labels.nii.gz, "
            f"segmentations/<organ>.nii.gz x {len(ORGANS)})"
        )
        if rounds > 0:
            from atlasflow.cli.demo_rounds import run_rounds

            run_rounds(dep, out, rounds, first_case=case_id, ct_path=DEMO_CT, steps=steps)
    except Exception as exc:
        say(f"demo failed: {exc}")
        for log in sorted((state_dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-5:]
            print(f"--- {log.name} (last lines)", *tail, sep="\n", file=sys.stderr)
        if not keep_running:
            dep.stop()
        return 1
    if keep_running:
        say(f"review app: {dep.gateway_url()}/app/ (the stack's CA: {dep.ca().ca_file})")
        say(f"  log in as dr.demo; the demo passwords are in {dep.auth_dir / 'demo-passwords.txt'}")
        say(f"services left running; stop them with: atlasflow down --state-dir {state_dir}")
    else:
        dep.stop()
        say("services stopped; run `atlasflow demo --keep-running` to click through the review app")
    say(f"demo finished in {time.monotonic() - t_start:.1f} s")
    return 0
