"""Labels' typed settings: ``ATLASFLOW_LABELS_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.common.settings import ServiceSettings

PREFIX = "ATLASFLOW_LABELS_"


@dataclass(frozen=True)
class LabelsSettings(ServiceSettings):
    """ATLASFLOW_LABELS_* settings (see each field's comment)."""

    grpc_port: int = 50054
    # When set, exports may only be written inside this directory (the cluster mounts a
    # volume here; the root filesystem is read-only). Empty: any absolute file:// path.
    export_dir: str = ""
    # ATLASFLOW_LABELS_DATABASE_URL: empty = SQLite at <data_dir>/labels.sqlite3 (embedded);
    # "postgresql://user@host:5432/db" = PostgreSQL (cluster). Migrations run on start.
    database_url: str = ""
    # ATLASFLOW_LABELS_INGEST_TARGET: host:port of the ingest service's gRPC API, from which
    # DICOM SEG exports fetch the source CT instances (IngestService.StreamSeriesInstances).
    ingest_target: str = "127.0.0.1:50051"
    # ATLASFLOW_LABELS_RANKING_TARGET: host:port of the ranking service, told about every new
    # label version (RankingService.RecordLabelVersion) through the version-event outbox.
    ranking_target: str = "127.0.0.1:50053"
