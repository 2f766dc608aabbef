"""`atlasflow serve segmentation`: job store, worker thread (calls Triton), gRPC server and the
outbox dispatcher that hands results to the label and ranking services.

`build_app` wires them the common way (`atlasflow.common.app`): the worker is a `ThreadLoop`,
the outbox dispatcher (handlers in `atlasflow.segmentation.worker`) a `TaskLoop` on the
server's event loop; stopping closes the peer channels, the prior source, the segmenters and
the job store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from atlasflow.common import db
from atlasflow.common.app import ServiceApp, TaskLoop, ThreadLoop, build_service_server, run_service
from atlasflow.common.clients import aio_channel
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OutboxDispatcher
from atlasflow.labels.v1 import labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2_grpc
from atlasflow.segmentation.activation import (
    CurrentVersionActivator,
    EnsembleRegistry,
    Loader,
    PyTritonLoader,
    ReadyCheckLoader,
    RegistryState,
    ServedVersionFollower,
    activate_via,
)
from atlasflow.segmentation.ensemble import load_ensemble
from atlasflow.segmentation.gauges import job_readings, triton_readings, version_readings
from atlasflow.segmentation.imported import resolve as resolve_imported
from atlasflow.segmentation.imported import served_model_name
from atlasflow.segmentation.jobs import DEFAULT_FILE, JobStore
from atlasflow.segmentation.migrations import MIGRATIONS
from atlasflow.segmentation.prior_source import RankingPrior
from atlasflow.segmentation.servicer import Activation, SegmentationServicer
from atlasflow.segmentation.settings import PREFIX, SegmentationSettings
from atlasflow.segmentation.triton_client import TritonSegmenter, ready_on_every_replica
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from atlasflow.segmentation.worker import (
    LABELS_TOPIC,
    RANKING_TOPIC,
    Segmenter,
    Worker,
    labels_handoff,
    ranking_handoff,
)

# The generated gRPC modules carry no annotations: their stubs and registration, typed here.
_LabelsStub: Callable[[grpc.aio.Channel], Any] = labels_pb2_grpc.LabelServiceStub
_RankingStub: Callable[[grpc.aio.Channel], Any] = ranking_pb2_grpc.RankingServiceStub
_add_servicer: Callable[[SegmentationServicer, grpc.aio.Server], None] = (
    segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server
)


async def build_app(
    settings: SegmentationSettings,
    *,
    metrics: Metrics | None = None,
    segmenters: Mapping[str, Segmenter] | None = None,
    tracer_provider: Any = None,
) -> ServiceApp:
    """Job store, worker thread, outbox dispatcher and gRPC server (built, not started); port 0
    picks a free port.

    ``segmenters``: ensemble version -> `Segmenter`; default one `TritonSegmenter` per
    configured ensemble at ``triton_url`` (model `triton_model_name(version)`). Either way the
    app closes them on stop (those with a ``close()``).
    """
    metrics = metrics or Metrics("segmentation")
    blobs = settings.blob_store()
    jobs = await asyncio.to_thread(
        lambda: JobStore(
            settings.database_url or Path(settings.data_dir) / DEFAULT_FILE,
            lease_s=settings.job_lease_s,
            max_claims=settings.max_attempts,  # a job whose lease keeps expiring fails LEASE_EXPIRED
        )
    )
    configs = [load_ensemble(e) for e in settings.ensembles()]
    versions = [c.version for c in configs]
    # imported models added to every ensemble (atlasflow.segmentation.imported): another
    # Triton model name, and the jobs list them as members
    imported = resolve_imported(settings.models_state_dir, settings.imported())
    member_names = {c.version: [m.name for m in c.members] + [m.label for m in imported] for c in configs}

    def make_segmenter(model_name: str) -> TritonSegmenter:
        return TritonSegmenter(
            settings.triton_url,
            model_name,
            timeout_s=settings.triton_timeout_s,
            shm=settings.triton_shm,
            tls=settings.triton_tls(),
            allow_plaintext=settings.triton_allow_plaintext,
            connect_retries=settings.triton_connect_retries,
        )

    if segmenters is None:
        segmenters = {c.version: make_segmenter(served_model_name(c.model_name, imported)) for c in configs}
    segmenters = dict(segmenters)
    # The served versions; ActivateEnsembleVersion swaps it (`activation.EnsembleRegistry`).
    registry = EnsembleRegistry(
        RegistryState(
            tuple(versions),
            dict(segmenters),
            member_names,
            {c.version: c.strategy for c in configs},
        ),
        imported,  # activated versions are served with the same members
    )
    loader: Loader
    if settings.activation == "repository":
        # on EVERY Triton replica behind the URL (the chart's headless Service: each pod)
        is_ready = ready_on_every_replica(
            settings.triton_url, settings.triton_tls(), allow_plaintext=settings.triton_allow_plaintext
        )
        loader = ReadyCheckLoader(is_ready, imported)  # the version's `__with_` model with members
    else:
        loader = PyTritonLoader(activate_via(make_segmenter, timeout_s=settings.triton_timeout_s))
    token, tls = settings.token_source(), settings.client_tls()
    labels_channel = aio_channel(settings.labels_target, settings.max_message_bytes, token=token, tls=tls)
    ranking_channel = aio_channel(settings.ranking_target, settings.max_message_bytes, token=token, tls=tls)
    dispatcher = OutboxDispatcher(
        jobs.outbox,
        None,
        {
            LABELS_TOPIC: labels_handoff(_LabelsStub(labels_channel)),
            RANKING_TOPIC: ranking_handoff(_RankingStub(ranking_channel)),
        },
        metrics,
    )
    loop = asyncio.get_running_loop()

    def wake_dispatcher() -> None:  # worker thread
        loop.call_soon_threadsafe(dispatcher.wake)

    prior = RankingPrior(
        settings.ranking_target, settings.prior_refresh_s, settings.max_message_bytes, token=token, tls=tls
    )
    # after a restart: the activated version recorded in the database (else versions/CURRENT) is
    # served again; with several replicas every one follows the record (activation.py)
    current = CurrentVersionActivator(registry, settings.versions_dir, loader, make_segmenter)
    follower = ServedVersionFollower(
        registry,
        jobs,
        settings.versions_dir,
        loader,
        make_segmenter,
        poll_s=settings.version_poll_s,
        current=current,
    )
    worker = Worker(
        jobs,
        blobs,
        segmenters,
        metrics,
        prior=prior,
        strategies={c.version: c.strategy for c in configs},
        members=member_names,
        max_attempts=settings.max_attempts,
        max_backoff_s=settings.max_backoff_s,
        retry_base_s=settings.retry_base_s,
        poll_s=settings.worker_poll_s,
        on_handoff=wake_dispatcher,
        registry=registry,
        claim_gate=follower.may_claim,
        bind_version=(
            (lambda name: registry.bind(settings.versions_dir, name, loader, make_segmenter))
            if settings.versions_dir
            else None
        ),
    )
    servicer = SegmentationServicer(
        jobs, blobs, worker, versions, Activation(registry, settings.versions_dir, loader, make_segmenter)
    )
    # scrape-time gauges (docs/runbooks.md): job queue, oldest running job, Triton, free disk
    metrics.add_source("jobs", lambda: job_readings(jobs))
    metrics.add_source("triton", lambda: triton_readings(registry.state.segmenters.values()), timeout_s=6.0)
    metrics.add_disk("state", settings.data_dir)
    metrics.add_source("ensemble_version", lambda: version_readings(follower))

    def register(server: grpc.aio.Server) -> list[str]:
        _add_servicer(servicer, server)
        return [segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"].full_name]

    built = build_service_server(settings, register, metrics=metrics, tracer_provider=tracer_provider)

    def close_segmenters() -> None:
        for seg in registry.state.segmenters.values():
            close = getattr(seg, "close", None)
            if close is not None:
                close()

    return ServiceApp(
        "segmentation",
        built,
        background=[
            ThreadLoop("segmentation-worker", worker.run_forever, worker.request_stop, join_s=30.0),
            TaskLoop("segmentation-outbox", dispatcher.run),
            ThreadLoop("segmentation-served-version", follower.run, follower.request_stop, join_s=10.0),
        ],
        # closed in reverse order: channels and prior source, segmenters, then the job store
        closers=[jobs.close, close_segmenters, prior.close, ranking_channel.close, labels_channel.close],
        parts={
            "jobs": jobs,
            "blobs": blobs,
            "worker": worker,
            "dispatcher": dispatcher,
            "segmenters": segmenters,
            "registry": registry,
            "current_version": follower,
        },
        ready_fields={"ensemble": settings.ensemble},
        metrics=metrics,
    )


def upgrade_database(database: str) -> str:
    """Apply segmentation's schema migrations to `database` (URL or SQLite path; what the
    service does on start); return the database's revision. `atlasflow db upgrade --service
    segmentation`."""
    engine = db.create_engine(database)
    try:
        return db.upgrade(engine, MIGRATIONS)
    finally:
        engine.dispose()


def main() -> None:
    run_service("segmentation", SegmentationSettings.from_env(PREFIX), build_app)
