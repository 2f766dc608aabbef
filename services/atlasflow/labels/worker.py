"""The labels service's background loops: the export job runner and the version-event outbox.

`Exporter` runs export jobs one at a time (`run`, a coroutine on the service's event loop that
does all its work in a thread; `run_job` exports one job). With several replicas on one
database, a replica runs a job only while it holds the job's lease
(`LabelRepository.claim_export_job`), renewed by a heartbeat thread (`Heartbeat`) every third of
the lease; a replica that loses the lease (it stalled past the expiry and another replica took
the job over, or the job was cancelled) stops at the next case without touching the job, and a
replica that died leaves its job to the others once the lease expired. The DICOM SEG of a case is built with
`atlasflow.labels.case_seg.build_case_seg` from the source instances `sources` fetches
(`atlasflow.labels.ingest_sources.IngestSourceInstances` in the service), written with the
case, C-STOREd to the job's PACS destination, and its outcome committed to the label
repository (`record_export_outcome`). The job's SEG options live in the job's row
(`ExportJobRecord.options`, written with the job).

`version_events` is the common `OutboxDispatcher` over the repository's version events
(atlasflow.labels.events): each new label version is told to ranking
(RankingService.RecordLabelVersion), at least once, by whichever replica claimed the event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pydicom
from opentelemetry import trace

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import AtlasflowError, FailedPrecondition, Unavailable
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OutboxDispatcher, OutboxRow
from atlasflow.labels.case_seg import build_case_seg
from atlasflow.labels.deid import Pseudonymizer
from atlasflow.labels.dicom_seg import send_c_store
from atlasflow.labels.events import TOPIC, VersionEventStore, version_request
from atlasflow.labels.export import export_case, manifest_bytes, review_entry
from atlasflow.labels.export_jobs import (
    SEG_FAILED,
    SEG_SEND_FAILED,
    SEG_SENT,
    ExportOptions,
    PacsDestination,
    SegOutcome,
    deid_manifest,
)
from atlasflow.labels.export_store import S3Exports, open_destination
from atlasflow.labels.repository import DOMAIN, ExportJobRecord, LabelRepository

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


SourceFetcher = Callable[[str], Sequence[pydicom.Dataset]]


class LeaseLost(Exception):
    """This replica no longer holds the export job's lease: stop without touching the job."""


class Heartbeat:
    """Renews this replica's lease of one export job every `interval_s` seconds in a thread
    (`LabelRepository.renew_export_claim`); `lost` is set once the lease is gone. A renewal
    that fails (database briefly unavailable) is tried again at the next beat."""

    def __init__(self, repo: LabelRepository, job_id: str, interval_s: float) -> None:
        self.repo = repo
        self.job_id = job_id
        self.interval_s = interval_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"export-lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                held = self.repo.renew_export_claim(self.job_id)
            except Exception as exc:  # noqa: BLE001 - try again at the next beat; the lease may expire
                log.warning("export lease not renewed", extra={"fields": {"error": type(exc).__name__}})
                continue
            if not held:
                self.lost.set()
                return

    def check(self) -> None:
        """Raise LeaseLost when the lease is gone."""
        if self.lost.is_set():
            raise LeaseLost(self.job_id)

    def confirm(self) -> None:
        """Renew the lease now and raise LeaseLost unless it is still held: the last word
        before the manifest, so a job cancelled or taken over since the last beat writes none."""
        self.check()
        if not self.repo.renew_export_claim(self.job_id):
            self.lost.set()
            raise LeaseLost(self.job_id)


class Exporter:
    """Runs export jobs one at a time; a restart resumes QUEUED/RUNNING ones from the start
    (case files are rewritten atomically, so a resumed export converges to the same files;
    a SEG keeps its UIDs, derived from the label version).

    sources: fetches a CT volume's source instances (DICOM SEG exports;
    `atlasflow.labels.ingest_sources.IngestSourceInstances` in the service). Each case's SEG outcome is committed to the repository
    (`record_export_outcome`) as soon as the case is written (and sent), so a crash loses none;
    a resumed job replaces a case's outcome when it exports the case again.

    pseudonymizer: the keyed pseudonyms of de-identified exports (atlasflow.labels.deid;
    without one a de-identified job FAILS with DEID_NOT_CONFIGURED). A de-identified job
    names each case folder (and manifest "case"/"case_id") by the case's pseudonym, rewrites
    the CT's NIfTI header, and de-identifies the SEG (PS3.15 E, the job's options).
    pacs_destinations: the configured PACS by id (a job names one by id).
    export_s3: the server's S3 export prefixes and store (s3:// destinations; without it such a
    job FAILS with EXPORT_NOT_CONFIGURED). Files go through the destination's writer
    (atlasflow.labels.export_store.open_destination): a job first removes a manifest an earlier
    export left at its destination and writes its own last, so a cancelled, failed or
    taken-over job leaves none."""

    def __init__(
        self,
        repo: LabelRepository,
        blobs: BlobStore,
        metrics: Metrics,
        sources: SourceFetcher | None = None,
        *,
        pseudonymizer: Pseudonymizer | None = None,
        pacs_destinations: Mapping[str, PacsDestination] | None = None,
        export_s3: S3Exports | None = None,
    ) -> None:
        self.repo = repo
        self.blobs = blobs
        self.metrics = metrics
        self.sources = sources
        self.pseudonymizer = pseudonymizer
        self.pacs_destinations = dict(pacs_destinations or {})
        self.export_s3 = export_s3
        self.wake = asyncio.Event()

    def _fetch_sources(self, volume_digest: str) -> Sequence[pydicom.Dataset]:
        if self.sources is None:
            raise Unavailable("INGEST_UNAVAILABLE", "no ingest service is configured", domain=DOMAIN)
        return self.sources(volume_digest)

    def _send(self, seg: pydicom.Dataset, pacs: PacsDestination, outcome: SegOutcome) -> None:
        """C-STORE `seg`; success or warning statuses (0x0000, 0xBxxx) make `outcome` SENT."""
        try:
            status = send_c_store(seg, pacs.host, pacs.port, called_ae=pacs.called_ae, calling_ae=pacs.calling_ae)
        except AtlasflowError as exc:
            outcome.state, outcome.reason = SEG_SEND_FAILED, exc.reason
            return
        except Exception as exc:  # noqa: BLE001 - pynetdicom: no accepted context, socket errors
            outcome.state, outcome.reason = SEG_SEND_FAILED, "PACS_UNAVAILABLE"
            outcome.reason_metadata = {"error": type(exc).__name__}
            return
        outcome.c_store_status = status
        if status == 0 or 0xB000 <= status <= 0xBFFF:
            outcome.state = SEG_SENT
        else:
            outcome.state, outcome.reason = SEG_SEND_FAILED, "PACS_REFUSED"
            outcome.reason_metadata = {"status": f"0x{status:04X}"}

    def _send_to(self, seg: pydicom.Dataset, destination_id: str, outcome: SegOutcome) -> None:
        """`_send` to the configured destination `destination_id`; one no longer configured
        makes `outcome` SEND_FAILED (reason UNKNOWN_PACS_DESTINATION)."""
        pacs = self.pacs_destinations.get(destination_id)
        if pacs is None:
            outcome.state, outcome.reason = SEG_SEND_FAILED, "UNKNOWN_PACS_DESTINATION"
            outcome.reason_metadata = {"pacs_destination_id": destination_id}
            return
        self._send(seg, pacs, outcome)

    def run_job(self, job: ExportJobRecord, lease: Heartbeat | None = None) -> None:
        """Export `job` (blocking): each case's files (and SEG, sent to the job's PACS when it
        names one), its outcome committed as it is done, then the manifest; the job ends
        SUCCEEDED, or FAILED with the error's reason (DESTINATION_WRITE_FAILED for an OSError or
        an object store that refused the writes after its retries).
        lease: the heartbeat of this replica's lease of the job (`run`); when it is lost the
        export stops before the next case (and before finishing) and leaves the job as it is."""
        check = lease.check if lease is not None else (lambda: None)
        confirm = lease.confirm if lease is not None else (lambda: None)
        with tracer.start_as_current_span("labels.export") as span:
            span.set_attribute("atlasflow.export_job_id", job.job_id)
            span.set_attribute("atlasflow.cases_total", job.cases_total)
            try:
                options = ExportOptions.from_dict(job.options)
                span.set_attribute("atlasflow.include_dicom_seg", options.include_dicom_seg)
                span.set_attribute("atlasflow.identified", options.identified)
                if job.state == "QUEUED":
                    self.repo.update_export_job(job.job_id, state="RUNNING", cases_done=0)
                out = open_destination(job.destination_uri, self.export_s3)
                out.prepare()
                pseudo = None
                if not options.identified:
                    pseudo = self.pseudonymizer
                    if pseudo is None:
                        raise FailedPrecondition(
                            "DEID_NOT_CONFIGURED", "no de-identification key is configured", domain=DOMAIN
                        )
                deid = (pseudo, options.deid) if pseudo is not None else None
                entries = []
                for done, (case_id, version_id) in enumerate(job.versions, start=1):
                    check()
                    record = self.repo.get_version(version_id)
                    label_map = self.blobs.get(record.label_map_digest)
                    organ_provenance = {o: op.provenance for o, op in record.organ_provenance.items()}
                    organ_versions = {o: op.version_id for o, op in record.organ_provenance.items()}
                    seg = seg_bytes = outcome = None
                    case_name = pseudo.case(case_id) if pseudo is not None else case_id
                    if options.include_dicom_seg:
                        seg, seg_bytes, outcome = build_case_seg(
                            self._fetch_sources,
                            record.ct_digest,
                            label_map,
                            record.provenance,
                            version_id,
                            case_id=case_id,
                            organ_provenance=organ_provenance,
                            organ_versions=organ_versions,
                            deid=deid,
                        )
                    # what the files say of the case: its pseudonym when de-identified
                    manifest_outcome = None
                    if outcome is not None:
                        manifest_outcome = outcome.to_dict() | {"case_id": case_name}
                    entry = export_case(
                        out,
                        case_name,
                        self.blobs.get(record.ct_digest),
                        label_map,
                        record.provenance,
                        version_id,
                        organ_provenance=organ_provenance,
                        organ_versions=organ_versions,
                        case_id=case_name,
                        dicom_seg=seg_bytes,
                        dicom_seg_outcome=manifest_outcome,
                        rewrite_ct_header=pseudo is not None,
                    )
                    entry["review"] = review_entry(self.repo.history(case_id), version_id)
                    if outcome is not None:
                        if seg_bytes is not None:
                            outcome.path = entry["dicom_seg"]["path"]
                            outcome.sha256 = entry["dicom_seg"]["sha256"]
                            if seg is not None and options.pacs_destination_id:
                                self._send_to(seg, options.pacs_destination_id, outcome)
                            entry["dicom_seg"] = outcome.to_dict() | {"case_id": case_name}
                        self.repo.record_export_outcome(job.job_id, case_id, outcome.to_dict())
                        self.metrics.count(f"dicom_seg_{outcome.state.lower()}")
                        if outcome.state in (SEG_FAILED, SEG_SEND_FAILED) or outcome.reason:
                            log.warning(
                                "export: DICOM SEG of a case not written or not sent",
                                extra={
                                    "fields": {
                                        "job_id": job.job_id,
                                        "case_id": case_id,
                                        "state": outcome.state,
                                        "reason": outcome.reason,
                                    }
                                },
                            )
                    entries.append(entry)
                    self.repo.update_export_job(job.job_id, cases_done=done)
                confirm()
                out.write_manifest(manifest_bytes(entries, deidentification=deid_manifest(options)))
                self.repo.update_export_job(job.job_id, state="SUCCEEDED")
                self.metrics.count("exports_succeeded")
            except LeaseLost:
                log.warning("export stopped: the job's lease was lost", extra={"fields": {"job_id": job.job_id}})
                span.set_attribute("atlasflow.lease_lost", True)
            except AtlasflowError as exc:
                if exc.reason == "INVALID_STATE_TRANSITION":
                    # the job ended meanwhile (cancelled): its progress can no longer be recorded
                    log.warning("export stopped: the job was ended meanwhile", extra={"fields": {"job_id": job.job_id}})
                    span.set_attribute("atlasflow.lease_lost", True)
                    return
                log.error("export failed", extra={"fields": {"job_id": job.job_id, "reason": exc.reason}})
                self.repo.update_export_job(job.job_id, state="FAILED", error_reason=exc.reason)
            except OSError as exc:
                log.error("export failed", extra={"fields": {"job_id": job.job_id, "exc_type": type(exc).__name__}})
                self.repo.update_export_job(job.job_id, state="FAILED", error_reason="DESTINATION_WRITE_FAILED")

    def run_claimed(self, job: ExportJobRecord) -> None:
        """Run `job`, claimed by this replica, under a heartbeat of its lease (blocking); the
        lease is given back at the end whatever happened (a finished job was released already)."""
        lease_s = float(getattr(self.repo, "export_lease_s", 60.0))
        try:
            with Heartbeat(self.repo, job.job_id, max(0.05, lease_s / 3)) as lease:
                self.run_job(job, lease)
        finally:
            try:
                self.repo.release_export_claim(job.job_id)
            except Exception as exc:  # noqa: BLE001 - the lease expires anyway
                log.warning("export lease not released", extra={"fields": {"error": type(exc).__name__}})

    async def run(self) -> None:
        """The worker loop: claim the oldest QUEUED or RUNNING job no replica holds and run it,
        until none is left; then wait up to 2 s for `wake` (set when a job is created).
        Repository and job work run in a thread."""
        while True:
            while (job := await asyncio.to_thread(self.repo.claim_export_job)) is not None:
                await asyncio.to_thread(self.run_claimed, job)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), 2.0)
            except TimeoutError:
                pass


def version_events(repo: LabelRepository, blobs: BlobStore, ranking: Any, metrics: Metrics) -> OutboxDispatcher:
    """The outbox dispatcher that tells ranking about every new label version.

    ranking: a RankingService stub on an asyncio channel. Each event's request is built in a
    thread (`atlasflow.labels.events.version_request`: repository and blob reads), then sent
    with a 30 s deadline; the dispatcher retries failures with backoff."""

    async def to_ranking(row: OutboxRow) -> None:
        request = await asyncio.to_thread(version_request, repo, blobs, row.dedupe_key, int(row.payload))
        await ranking.RecordLabelVersion(request, timeout=30)

    return OutboxDispatcher(VersionEventStore(repo), None, {TOPIC: to_ranking}, metrics, poll_s=0.5)
