"""`atlasflow serve training`: the run store, the executor thread and the TrainingService API.

`build_app` wires the run store (`atlasflow.training.runs.RunStore`, SQLite or PostgreSQL), the
executor (`atlasflow.training.executor.RunExecutor`, a `ThreadLoop`) that runs queued rounds
reading decisions from the label service as ``svc:training``
(`atlasflow.training.labels_source.LabelsDecisionSource`), the roll-out of promoted versions
(`atlasflow.training.rollout`), the servicer and the gRPC server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from atlasflow.common import db
from atlasflow.common.app import ServiceApp, ThreadLoop, build_service_server, run_service
from atlasflow.common.metrics import Metrics
from atlasflow.training import k8s_runner
from atlasflow.training.dataset import DecisionSource
from atlasflow.training.executor import ExecutorConfig, Rollout, RunExecutor
from atlasflow.training.labels_source import LabelsDecisionSource
from atlasflow.training.migrations import MIGRATIONS
from atlasflow.training.peers import ServicePeers
from atlasflow.training.reinfer import Peers
from atlasflow.training.runs import RunStore
from atlasflow.training.servicer import TrainingServicer
from atlasflow.training.settings import PREFIX, TrainingSettings
from atlasflow.training.v1 import training_pb2, training_pb2_grpc

_add_servicer: Callable[[TrainingServicer, grpc.aio.Server], None] = (
    training_pb2_grpc.add_TrainingServiceServicer_to_server
)


def state_dir_of(settings: TrainingSettings) -> Path:
    return Path(settings.state_dir or Path(settings.data_dir) / "state")


def open_store(settings: TrainingSettings) -> RunStore:
    if settings.database_url:
        return RunStore(settings.database_url)
    return RunStore(Path(settings.data_dir) / "training.sqlite3")


def upgrade_database(database: str) -> str:
    """Apply training's schema migrations to `database` (URL or SQLite path; what the service
    does on start); return the database's revision. `atlasflow db upgrade --service training`."""
    engine = db.create_engine(database)
    try:
        return db.upgrade(engine, MIGRATIONS)
    finally:
        engine.dispose()


async def build_app(
    settings: TrainingSettings,
    *,
    metrics: Metrics | None = None,
    source_factory: Callable[[], DecisionSource] | None = None,
    rollout: Rollout | None = None,
    tracer_provider: Any = None,
) -> ServiceApp:
    """The training service (built, not started); port 0 picks a free port.

    ``source_factory``: where decisions are read (default: the label service at
    ``labels_target`` with this service's token); ``rollout``: the hook run for a promoted
    version (default: `atlasflow.training.rollout.build_rollout` per the ``rollout`` setting;
    with segmentation and ranking targets, a promotion is followed by the re-inference of the
    undecided cases, `atlasflow.training.reinfer`)."""
    metrics = metrics or Metrics("training")
    store = await asyncio.to_thread(open_store, settings)
    blobs = settings.blob_store()
    if source_factory is None:

        def source_factory() -> DecisionSource:
            return LabelsDecisionSource(settings.labels_target, settings.token_source(), settings.client_tls())

    from atlasflow.training.rollout import build_rollout, rollout_mode

    peers_factory: Callable[[], Peers] | None = None
    if rollout_mode(settings) != "pointer" and settings.segmentation_target and settings.ranking_target:

        def peers_factory() -> Peers:
            return ServicePeers(
                settings.segmentation_target, settings.ranking_target, settings.token_source(), settings.client_tls()
            )

    if rollout is None:
        rollout = build_rollout(settings, peers_factory)
    executor = RunExecutor(
        store,
        source_factory,
        blobs,
        ExecutorConfig(
            state_dir=state_dir_of(settings),
            device=settings.device,
            n_boot=settings.n_boot,
            auto_min_new_decisions=settings.auto_min_new_decisions,
            auto_interval_s=settings.auto_interval_s,
        ),
        rollout=rollout,
        peers_factory=peers_factory,
        remote_finetune=k8s_runner.from_settings(settings, state_dir_of(settings)),
    )
    servicer = TrainingServicer(store, wake=executor.wake.set)

    def register(server: grpc.aio.Server) -> list[str]:
        _add_servicer(servicer, server)
        return [training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name]

    built = build_service_server(settings, register, metrics=metrics, tracer_provider=tracer_provider)
    loop = ThreadLoop("executor", executor.run, executor.request_stop, join_s=60.0)
    return ServiceApp(
        "training",
        built,
        background=[loop],
        closers=[store.close],
        parts={"store": store, "executor": executor, "servicer": servicer},
        metrics=metrics,
    )


def main() -> None:
    run_service("training", TrainingSettings.from_env(PREFIX), build_app)
