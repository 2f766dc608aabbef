"""Labels' typed settings: ``ATLASFLOW_LABELS_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.common.settings import ServiceSettings

PREFIX = "ATLASFLOW_LABELS_"


@dataclass(frozen=True)
class LabelsSettings(ServiceSettings):
    """ATLASFLOW_LABELS_* settings (see each field's comment)."""

    grpc_port: int = 50054
    # ATLASFLOW_LABELS_EXPORT_DIR: exports are written only inside this directory (the
    # cluster mounts a volume here; `atlasflow up`: <state-dir>/exports). Empty: exports are
    # refused (FAILED_PRECONDITION, EXPORT_NOT_CONFIGURED).
    export_dir: str = ""
    # ATLASFLOW_LABELS_EXPORT_S3_PREFIXES: the object-store prefixes exports may write to
    # (destination_uri s3://bucket/prefix at or below one of them), comma-separated
    # "s3://bucket[/prefix]"; the store is the blob store's (BLOB_S3_ENDPOINT_URL, _REGION,
    # _ADDRESSING_STYLE; credentials from boto3's standard chain). Empty: s3:// destinations are
    # refused (EXPORT_NOT_CONFIGURED). With it, EXPORT_DIR may stay empty (no file:// exports).
    export_s3_prefixes: str = ""
    # ATLASFLOW_LABELS_EXPORT_PACS_DESTINATIONS: the PACS an export may send its DICOM SEGs to,
    # by id: a JSON object {"<id>": {"host", "port", "called_ae", "calling_ae"}} or the path of
    # a file holding one (export_jobs.parse_pacs_destinations). Empty: none.
    export_pacs_destinations: str = ""
    # ATLASFLOW_LABELS_DEID_KEY_FILE: the secret key of the export pseudonyms (HMAC-SHA256,
    # atlasflow.labels.deid): a file of 16+ bytes (the chart mounts a Secret). Empty:
    # <data_dir>/deid.key, created (mode 0600) on first start. Keep it: another key gives
    # other pseudonyms, so new exports no longer link to earlier ones.
    deid_key_file: str = ""
    # ATLASFLOW_LABELS_DATABASE_URL: empty = SQLite at <data_dir>/labels.sqlite3 (embedded);
    # "postgresql://user@host:5432/db" = PostgreSQL (cluster). Migrations run on start.
    database_url: str = ""
    # ATLASFLOW_LABELS_EXPORT_LEASE_S: an export job is run by the replica holding its lease,
    # renewed every third of this while it runs; a replica that died leaves the job to another
    # after this long (seconds).
    export_lease_s: float = 60.0
    # ATLASFLOW_LABELS_EXPORT_MAX_CLAIMS: an export job whose replica died this many times (its
    # lease expired) is FAILED with LEASE_EXPIRED instead of taken again (0: no limit).
    export_max_claims: int = 3
    # ATLASFLOW_LABELS_EVENT_CLAIM_S: a version event claimed by a replica's outbox dispatcher
    # is left to it this long (seconds); a dead replica's events are delivered by another after.
    event_claim_s: float = 120.0
    # ATLASFLOW_LABELS_INGEST_TARGET: host:port of the ingest service's gRPC API, from which
    # DICOM SEG exports fetch the source CT instances (IngestService.StreamSeriesInstances).
    ingest_target: str = "127.0.0.1:50051"
    # ATLASFLOW_LABELS_RANKING_TARGET: host:port of the ranking service, told about every new
    # label version (RankingService.RecordLabelVersion) through the version-event outbox.
    ranking_target: str = "127.0.0.1:50053"
    # ATLASFLOW_LABELS_REVISE_REQUIRES_LEASE: ReviseLabels is accepted only from the reviewer
    # holding the case's lease in ranking (labels/ranking_leases.py). false only for an isolated
    # test of the label store without a ranking service (logged as a warning at start).
    revise_requires_lease: bool = True
