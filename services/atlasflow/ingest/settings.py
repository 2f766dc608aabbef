"""Ingest's typed settings: ``ATLASFLOW_INGEST_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.common.settings import ServiceSettings

PREFIX = "ATLASFLOW_INGEST_"


@dataclass(frozen=True)
class IngestSettings(ServiceSettings):
    """ATLASFLOW_INGEST_* settings (the DICOM ones are documented on `atlasflow.ingest.scp.ScpConfig`)."""

    grpc_port: int = 50051
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    ae_title: str = "ATLASFLOW"
    accepted_calling_aets: tuple[str, ...] = ()
    max_associations: int = 16
    max_associations_per_peer: int = 8  # per source IP address
    acse_timeout_s: float = 10.0  # see ScpConfig.acse_timeout_s
    check_called_aet: bool = True  # see ScpConfig.check_called_aet
    max_pdu: int = 128 * 1024  # bytes, 4096..16 MiB
    dicom_idle_timeout_s: float = 60.0
    dimse_timeout_s: float = 120.0
    dicom_plaintext: bool = True  # off: DICOM over TLS only
    # DICOM TLS (PEM files): cert + key set -> a TLS listener on dicom_tls_port; CA set ->
    # client certificates of that CA required
    dicom_tls_cert_file: str = ""
    dicom_tls_key_file: str = ""
    dicom_tls_ca_file: str = ""
    dicom_tls_port: int = 2762
    quiet_period_s: float = 5.0  # measured on the database's clock (replicas share one quiet period)
    # ATLASFLOW_INGEST_DATABASE_URL: empty = SQLite at <data_dir>/ingest.sqlite3 (embedded);
    # "postgresql://user:pass@host:5432/db" = PostgreSQL (replicas share it). Alembic migrations
    # run on start (atlasflow.ingest.migrations).
    database_url: str = ""
    # a replica's claim on the series version it assembles lasts this long without a heartbeat
    # (renewed every third of it); a killed replica's version is taken over after it, s
    assembly_claim_s: float = 60.0
    spool_segment_mb: int = 128  # zero-filled spool segments, 2 prepared ahead (spool.py)
    segmentation_target: str = "127.0.0.1:50052"
    upload_ttl_s: float = 7 * 86400  # incomplete resumable uploads older than this are purged
    max_instance_mb: int = 2048  # an uploaded instance larger than this is refused (INSTANCE_TOO_LARGE)
    # a series version whose assembly was started this many times (the process died in it each
    # time) ends FAILED (ASSEMBLY_ABANDONED_AFTER_<n>_ATTEMPTS) instead of being tried again
    max_assembly_attempts: int = 3
    # new instances are refused (0xA700 / RESOURCE_EXHAUSTED DISK_FULL) while the data or blob
    # directory has less free space than this, MiB; 0 turns the check off
    min_free_disk_mb: int = 1024
    # DeleteStudy (`atlasflow.ingest.deletion`): the services it purges; new instances of a
    # deleted study are refused (STUDY_DELETED) for this many days, then received as a new
    # study; a blob written or put again within the grace period is not deleted yet (s)
    labels_target: str = "127.0.0.1:50054"
    ranking_target: str = "127.0.0.1:50053"
    deleted_study_refuse_days: float = 30.0
    deletion_blob_grace_s: float = 300.0
