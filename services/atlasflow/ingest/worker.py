"""Ingest's background work: the assembler (quiet series versions -> volumes, hand-off queued
in the outbox) and the delivery of that hand-off to segmentation (run by the outbox dispatcher).
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from opentelemetry import context as otel_context
from opentelemetry import trace
from pydicom import dcmread

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import AtlasflowError
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.outbox import OutboxRow
from atlasflow.common.telemetry import context_from_traceparent, current_traceparent
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.assemble import Volume, assemble_series
from atlasflow.ingest.geometry import REPAIR
from atlasflow.ingest.store import IngestStore, SeriesVersion
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

#: outbox topic of the segmentation hand-off (payload: a serialised SegmentSeriesRequest)
SEGMENT_TOPIC = "segmentation.SegmentSeries"
#: seconds between two looks for quiet series versions
POLL_S = 0.5
#: failure_reason prefix of a series whose assembly raised something unexpected (the
#: exception's type follows; its message is never stored: it may quote patient data)
ASSEMBLY_FAILED = "ASSEMBLY_FAILED"
#: default of the ingest setting ``max_assembly_attempts``
MAX_ASSEMBLY_ATTEMPTS = 3


class Assembler:
    """Turns quiet (or committed) series versions into volumes and queues the hand-off."""

    def __init__(
        self,
        store: IngestStore,
        blobs: BlobStore,
        metrics: Metrics,
        quiet_period_s: float,
        *,
        max_attempts: int = MAX_ASSEMBLY_ATTEMPTS,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.metrics = metrics
        self.quiet_period_s = quiet_period_s
        self.max_attempts = max_attempts
        self.on_assembled: Callable[[], None] = lambda: None

    def assemble(self, sv: SeriesVersion) -> None:
        """Blocking: run in a worker thread.

        A series that cannot be assembled ends FAILED with a reason and never stops the
        assembler: an `AtlasflowError` gives its own reason; any other exception while reading,
        decoding, assembling or encoding the version's instances (crafted pixel attributes:
        OverflowError, ValueError, MemoryError, numpy's UFuncTypeError, a Pillow OSError, ...)
        gives ``ASSEMBLY_FAILED: <exception type>`` (never the message: it may quote the
        dataset). A FAILED version is not due for assembly again, after a restart neither.
        Failures of the service's own storage outside that step (draining the spool, writing the
        volume, the database) are not the series' fault: they propagate, the series stays
        RECEIVING, and the supervised loop reports NOT_SERVING and restarts (`atlasflow.common.app`).

        Each assembly is counted durably before it starts (`IngestStore.begin_assembly`): when
        the process dies in it (killed, out of memory, a crash in a decoder), the next start
        tries again, up to ``max_attempts``; then the version ends FAILED
        ``ASSEMBLY_ABANDONED_AFTER_<n>_ATTEMPTS`` instead of crash-looping the service.

        Replicas: `begin_assembly` also claims the version for this replica (None: another
        replica holds it, nothing to do); a heartbeat thread renews the claim every third of
        its duration while the assembly runs. Instances still in another replica's spool, or
        an instance that arrived during the assembly, give the claim (and the attempt) back:
        the version is assembled later, with all of them."""
        attempt = self.store.begin_assembly(sv.series_id, sv.version, self.max_attempts)
        if attempt is None:
            after = self.store.get_series_version(sv.series_id, sv.version)
            if after.state == "FAILED":
                log.error(
                    "series assembly abandoned",
                    extra={"fields": {"series_id": sv.series_id, "reason": after.failure_reason}},
                )
                self.metrics.count("series_failed")
            return
        stop = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(sv, stop), name=f"assembly-claim-{sv.series_id[:16]}", daemon=True
        )
        heartbeat.start()
        try:
            done = self._assemble(sv, attempt)
        except BaseException:
            # the service's own storage, not the series: this attempt does not count
            self.store.end_assembly_attempt(sv.series_id, sv.version)
            raise
        finally:
            stop.set()
            heartbeat.join()
        if not done:
            self.store.end_assembly_attempt(sv.series_id, sv.version)
            return
        self.on_assembled()

    def _heartbeat(self, sv: SeriesVersion, stop: threading.Event) -> None:
        """Renew this replica's claim on `sv` until `stop` (or the claim is lost)."""
        while not stop.wait(self.store.claim_s / 3):
            try:
                if not self.store.renew_claim(sv.series_id, sv.version):
                    log.warning("assembly claim lost", extra={"fields": {"series_id": sv.series_id}})
                    return
            except Exception:  # noqa: BLE001 - the database is away: the next beat tries again
                log.warning("assembly claim not renewed", extra={"fields": {"series_id": sv.series_id}})

    def _assemble(self, sv: SeriesVersion, attempt: int) -> bool:
        """True when the version ended ASSEMBLED or FAILED; False when it must wait (instances
        not in the blob store yet, or one more arrived meanwhile)."""
        token = otel_context.attach(context_from_traceparent(sv.traceparent))
        try:
            with tracer.start_as_current_span("ingest.assemble") as span:
                span.set_attribute("atlasflow.series_id", sv.series_id)
                span.set_attribute("atlasflow.series_version", sv.version)
                span.set_attribute("atlasflow.assembly_attempt", attempt)
                t_volume = time.perf_counter()
                digests = self.store.instance_digests(sv.series_id, sv.version)
                missing = self.store.missing_blobs(digests)
                if missing:  # still in another replica's spool: that replica drains it soon
                    log.info(
                        "series assembly waits for spooled instances",
                        extra={"fields": {"series_id": sv.series_id, "missing": len(missing)}},
                    )
                    return False
                try:
                    volume, nifti = self._build_volume(digests)
                except AtlasflowError as exc:
                    self._fail(sv, exc.reason)
                    return True
                except Exception as exc:  # noqa: BLE001 - any other failure is this series' alone
                    self._fail(sv, f"{ASSEMBLY_FAILED}: {type(exc).__name__}")
                    return True
                info = self.blobs.put(nifti)
                spacing = [float(x) for x in (volume.affine[:3, :3] ** 2).sum(axis=0) ** 0.5]
                geometry = {
                    "shape": [int(s) for s in volume.array.shape],
                    "affine": [float(x) for x in volume.affine.ravel()],
                    "spacing_mm": spacing,
                    "resampled": bool(volume.resampled),
                }
                span.set_attribute("atlasflow.resampled", bool(volume.resampled))
                request = segmentation_pb2.SegmentSeriesRequest(
                    case_id=sv.case_id,
                    series_id=sv.series_id,
                    series_version=sv.version,
                    volume=common_pb2.BlobRef(
                        digest=info.digest, size_bytes=info.size_bytes, media_type="application/x-nifti+gzip"
                    ),
                )
                if not self.store.mark_assembled(
                    sv.series_id,
                    sv.version,
                    info.digest,
                    info.size_bytes,
                    geometry,
                    SEGMENT_TOPIC,
                    request.SerializeToString(),
                    current_traceparent(),
                    instance_count=len(digests),
                ):
                    log.info(
                        "series changed during assembly; assembled again later",
                        extra={"fields": {"series_id": sv.series_id, "version": sv.version}},
                    )
                    return False
                for w in volume.warnings:
                    log.warning(
                        "series assembled with warning", extra={"fields": {"series_id": sv.series_id, "warning": w}}
                    )
                log.info(
                    "series assembled",
                    extra={"fields": {"series_id": sv.series_id, "version": sv.version, "shape": geometry["shape"]}},
                )
                self.metrics.count("series_assembled")
                self.metrics.observe_stage("assemble_volume", time.perf_counter() - t_volume)
                # first instance of the version received -> volume assembled and handed off
                self.metrics.observe_stage("receive_to_assembled", time.time() - sv.create_time)
                return True
        finally:
            otel_context.detach(token)

    def _build_volume(self, digests: list[str]) -> tuple[Volume, bytes]:
        """The volume of these instances and its NIfTI bytes (gzip)."""
        # Instances were validated on reception; here they are only read.
        datasets = [dcmread(io.BytesIO(self.blobs.get(d))) for d in digests]
        # Repairable geometry (gantry tilt, whole missing slices, multi-frame) is repaired
        # with a warning and flagged `resampled` (DICOM SEG must refuse).
        volume = assemble_series(datasets, policy=REPAIR)
        del datasets
        return volume, to_nifti_bytes(volume.array, volume.affine)

    def _fail(self, sv: SeriesVersion, reason: str) -> None:
        log.warning("series assembly failed", extra={"fields": {"series_id": sv.series_id, "reason": reason}})
        self.store.mark_failed(sv.series_id, sv.version, reason)
        self.metrics.count("series_failed")

    async def run(self) -> None:
        """The assembler loop (a `TaskLoop`): every `POLL_S`, drain an idle spool and assemble
        the series versions quiet for ``quiet_period_s``; blocking work runs in a thread."""
        while True:
            # Spooled bytes -> blob store once reception is idle (keeps file creation, the
            # slow part of a blob put, out of a C-STORE burst; see atlasflow.ingest.spool).
            await asyncio.to_thread(self.store.spool_drain.drain_if_idle, 1.0)
            for sv in await asyncio.to_thread(self.store.due_for_assembly, self.quiet_period_s):
                await asyncio.to_thread(self.assemble, sv)
            self.metrics.set_queue_depth("series_open", await asyncio.to_thread(self.store.receiving_count))
            await asyncio.sleep(POLL_S)


def segmentation_handoff(
    store: IngestStore, stub: segmentation_pb2_grpc.SegmentationServiceStub
) -> Callable[[OutboxRow], Awaitable[None]]:
    """The outbox handler of `SEGMENT_TOPIC`: SegmentSeries, then the version is DISPATCHED."""

    async def deliver(row: OutboxRow) -> None:
        request = segmentation_pb2.SegmentSeriesRequest.FromString(row.payload)
        await stub.SegmentSeries(request, timeout=30)
        await asyncio.to_thread(store.mark_dispatched, request.series_id, request.series_version)

    return deliver
